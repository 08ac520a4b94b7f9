"""Whole-project downloads, streamed by an HTTP route of the portal's own.

A ``st.download_button`` sends its file through the session's websocket, whole: the file
is built in the portal's memory first, and a project of 60 rows × 9 MB grew the portal to
6.2 GB, then Streamlit refused the 540 MB message and the download produced nothing
(issue #13). So the Results page links to ``GET /download/<project>.csv`` (or ``.json``),
a route served beside the app (``streamlit_app.py`` builds the ``st.App`` that carries
it), which streams ``engine.export.export_chunks`` as it is made: the portal holds about
one row of results per download, whatever the project's size.

**Who may download.** The route runs outside any Streamlit session, so it cannot ask who
is signed in, and it believes nothing the client sends except a token it verifies. The
Results page, which knows the signed-in account, puts in each link a token it signs:
HMAC-SHA256, with the secret ``<data_dir>/secrets/download_key`` (made on first use, mode
0600, like the cookie key), over the account's id and name, the project, the format,
when the link was made and when it expires (the ``download_link_minutes`` setting; the
page makes new links every ``refresh_seconds``, a third of that, so an open page always
has working ones, and a link copied elsewhere stops working soon). At request time the route
checks the signature, the expiry, the project and format against the path, and then the
account as it is now: it exists, is enabled, has not signed out since the link was made
(``logins.signed_in_user`` with the link's time, as a session is checked), and owns the
project or is an admin (``export_chunks`` checks that, as every engine call does).
Anything else gets 403 (the link) or 404 (the project, exactly as a missing one), with a
one-line message and no data.

At most ``downloads_per_account`` downloads of one account, and ``downloads_at_once`` in
all, run at once (429 beyond; both are settings), since each holds up to a row of results
in memory.

This module never imports Streamlit: the route runs in the server, not in a session.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import json
import logging
import threading
import time
from typing import AsyncIterator, Callable, Iterator

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from engine import Settings, Store, logins
from engine.errors import ConstellationError, Forbidden, NotFound
from engine.export import FORMATS, export_chunks
from engine.keys import data_secret
from engine.models import User

logger = logging.getLogger(__name__)

PATH = "/download/{project_id:int}.{fmt}"
# The Results page renews its links this many times in a link's life, so that a link it
# shows has at least two thirds of its time left.
RENEWALS_PER_LINK = 3
_KEY = "download_key"
_MAX_TOKEN_CHARS = 1024
_MEDIA_TYPES = {"csv": "text/csv; charset=utf-8", "json": "application/json"}


# -- links -----------------------------------------------------------------------------


def link(settings: Settings, user: User, project_id: int, fmt: str,
         now: float | None = None) -> str:
    """The URL path that downloads ``project_id`` as ``fmt`` for ``user``, for
    ``download_link_minutes``."""
    return f"/download/{project_id}.{fmt}?token={token(settings, user, project_id, fmt, now)}"


def token(settings: Settings, user: User, project_id: int, fmt: str,
          now: float | None = None) -> str:
    """``<claims>.<hmac>``: the claims as URL-safe base64 of JSON, the HMAC in hex."""
    issued = int((time.time() if now is None else now) * 1000)
    claims = {"u": user.id, "n": user.name, "p": project_id, "f": fmt,
              "i": issued, "e": issued + settings.download_link_seconds * 1000}
    body = base64.urlsafe_b64encode(json.dumps(claims, separators=(",", ":")).encode())
    body_text = body.rstrip(b"=").decode("ascii")
    return f"{body_text}.{_mac(settings, body_text)}"


def _mac(settings: Settings, body: str) -> str:
    key = bytes.fromhex(data_secret(settings, _KEY))
    return hmac.new(key, b"constellation-download\n" + body.encode("ascii"), hashlib.sha256).hexdigest()


def refresh_seconds(settings: Settings) -> float:
    """How often the Results page makes new links."""
    return settings.download_link_seconds / RENEWALS_PER_LINK


def links_html(settings: Settings, user: User, project_id: int) -> str:
    """The Results page's two download links, as HTML. Only digits, the fixed labels and
    tokens (base64url and hex) go into it: nothing a user wrote."""
    anchors = "".join(
        f'<a href="{link(settings, user, project_id, fmt)}" download="project-{project_id}.{fmt}" '
        f'role="button">Download {fmt.upper()}</a>' for fmt in ("csv", "json"))
    return _STYLE + f'<div class="constellation-downloads">{anchors}</div>'


# Close to Streamlit's own secondary buttons.
_STYLE = """<style>
.constellation-downloads { display: flex; gap: 0.75rem; flex-wrap: wrap; }
.constellation-downloads a { display: inline-flex; align-items: center; min-height: 2.5rem;
  padding: 0.25rem 0.75rem; border: 1px solid rgba(49, 51, 63, 0.2); border-radius: 0.5rem;
  color: inherit; text-decoration: none; }
.constellation-downloads a:hover { border-color: #3b5bdb; color: #3b5bdb; }
</style>"""


# -- checking a link -------------------------------------------------------------------


def authorized(store: Store, settings: Settings, token_text: str | None, project_id: int,
               fmt: str, now: float | None = None) -> User:
    """The account a valid, current link for this download was made for; Forbidden if the
    link is missing, malformed, forged, for another download or expired, or if its account
    no longer exists, is disabled or has signed out since. (Ownership is export's check.)"""
    if not token_text or len(token_text) > _MAX_TOKEN_CHARS or token_text.count(".") != 1:
        raise Forbidden("this download needs a link from the Results page")
    body, mac = token_text.split(".")
    if not hmac.compare_digest(mac.encode("ascii", "replace"), _mac(settings, body).encode()):
        raise Forbidden("this download link is not valid")
    try:  # signed by us, so well formed; checked all the same
        claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        user_id, name, issued, expires = claims["u"], claims["n"], claims["i"], claims["e"]
        linked = (claims["p"], claims["f"])
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise Forbidden("this download link is not valid") from None
    if linked != (project_id, fmt):
        raise Forbidden("this download link is for another download")
    if (time.time() if now is None else now) * 1000 > expires:
        raise Forbidden("this download link has expired; open the Results page again for a new one")
    user = logins.signed_in_user(store, name, since=issued / 1000)
    if user.id != user_id:
        raise Forbidden("this account no longer exists; sign in again")
    return user


# -- the route -------------------------------------------------------------------------


class _Slots:
    """How many downloads run, per account and in all."""

    def __init__(self):
        self._lock = threading.Lock()
        self._running: dict[int, int] = {}

    def take(self, settings: Settings, user_id: int) -> Callable[[], None]:
        with self._lock:
            if (self._running.get(user_id, 0) >= settings.downloads_per_account
                    or sum(self._running.values()) >= settings.downloads_at_once):
                raise _Busy()
            self._running[user_id] = self._running.get(user_id, 0) + 1
        return functools.partial(self._give_back, user_id)

    def _give_back(self, user_id: int) -> None:
        with self._lock:
            self._running[user_id] -= 1
            if not self._running[user_id]:
                del self._running[user_id]


class _Busy(Exception):
    pass


_slots = _Slots()


@functools.lru_cache(maxsize=4)
def _store(database_url: str, data_dir: str) -> Store:
    return Store(Settings.from_env().replace(db_url=database_url, data_dir=data_dir))


async def download(request: Request) -> Response:
    project_id, fmt = request.path_params["project_id"], request.path_params["fmt"]
    if fmt not in FORMATS:
        return _refusal(404, f"no such download: {fmt!r} (csv or json)")
    settings = Settings.from_env()
    store = _store(settings.database_url, settings.data_dir)
    try:
        user = await run_in_threadpool(authorized, store, settings,
                                       request.query_params.get("token"), project_id, fmt)
        release = _slots.take(settings, user.id)
    except _Busy:
        return _refusal(429, "too many downloads at once; try again when one has finished",
                        {"Retry-After": "30"})
    except ConstellationError as exc:
        return _translated(exc, project_id)
    try:
        chunks = await run_in_threadpool(export_chunks, store, user, project_id, fmt)
    except ConstellationError as exc:
        release()
        return _translated(exc, project_id)
    except BaseException:
        release()
        raise
    logger.info("portal: %s downloads project %s as %s", user.name, project_id, fmt)
    headers = {"Content-Disposition": f'attachment; filename="project-{project_id}.{fmt}"',
               "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff",
               "Referrer-Policy": "no-referrer"}
    if request.method == "HEAD":
        chunks.close()
        release()
        return Response(status_code=200, media_type=_MEDIA_TYPES[fmt], headers=headers)
    return StreamingResponse(_body(chunks, release), media_type=_MEDIA_TYPES[fmt], headers=headers)


async def _body(chunks: Iterator[str], release: Callable[[], None]) -> AsyncIterator[bytes]:
    """The export's pieces, each made in a worker thread (they read the database), until
    the end or until the client goes away; then its database sessions close."""
    try:
        while True:
            piece = await run_in_threadpool(next, chunks, None)
            if piece is None:
                return
            yield piece.encode("utf-8")
    finally:
        chunks.close()
        release()


def _translated(exc: ConstellationError, project_id: int) -> Response:
    """The HTTP interface's translator of engine errors: a status and one line, no data."""
    if isinstance(exc, NotFound):
        return _refusal(404, str(exc))
    if isinstance(exc, Forbidden):
        logger.info("portal: a download of project %s was refused: %s", project_id, exc)
        return _refusal(403, str(exc))
    return _refusal(400, str(exc))


def _refusal(status: int, text: str, headers: dict[str, str] | None = None) -> Response:
    return PlainTextResponse(text[:1].upper() + text[1:] + ".\n", status_code=status,
                             headers={"Cache-Control": "no-store", **(headers or {})})


def routes() -> list[Route]:
    """The portal's own routes, served beside Streamlit's."""
    return [Route(PATH, download, methods=["GET"])]
