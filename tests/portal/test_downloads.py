"""Whole-project downloads, streamed by the portal's own route (issue #13 item 6).

A project of 60 rows × 9 MB once grew the portal to 6.2 GB when its Results page was
opened; Streamlit refused the 540 MB message and the CSV download produced nothing. Now
the Results page links to ``/download/<id>.csv|json`` with a token signed for the
signed-in account, and the route streams ``engine.export.export_chunks``.

The light tests run the route's real code over real HTTP (uvicorn on a free port, in this
process) on real SQLite (and PostgreSQL for the export's size-bounded reads), and the
Results page under AppTest. The slow test runs the whole stack (``engine serve``) and
downloads a project filled to its storage quota with rows of 9 MB, watching the portal
process's memory.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import threading
import time
import tracemalloc
import urllib.error
import urllib.request
from contextlib import contextmanager

import pytest

from support import free_port, on_backend, short_tempdir
from support.downloads import (MB, PASSWORD, ROW_CHARS, Failed, add_people, big_output, exported,
                               fetch, project_of)
from engine import accounts, export, logins
from engine.accounts import Role
from engine.export import export_chunks
from engine.settings import Settings
from engine.quota import StorageQuota
from engine.status import ProjectStatus
from engine.store import Store
from portal import downloads


# -- the export, in pieces, bounded by size ----------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def any_store(request, data_dir):
    store = Store(on_backend(request, data_dir, project_storage_mb=0, user_storage_mb=0))
    add_people(store)
    yield store
    store.engine.dispose()


MIXED = [7, Failed("ValueError: short"), {"a": 1, "b": "=x"}, "x" * 5000,
         Failed("ValueError: " + "e" * 3000),
         ["y" * 1500, 2], None, {"a": "z" * 40_000, "c": 3}, "=2+3", "w" * 1200, 8.5]


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_pieces_are_the_export_and_long_texts_are_read_in_bounded_groups(any_store, fmt, monkeypatch):
    """Small rows, long outputs, long errors, dict outputs and rows without a result: the
    pieces make exactly the export's text, with long texts read a few at a time (bounds
    made small here so that every path is taken)."""
    pid = project_of(any_store, "ada", MIXED, rows=len(MIXED) + 3)
    whole = exported(any_store, pid, fmt)
    monkeypatch.setattr(export, "_INLINE_CHARS", 100)
    monkeypatch.setattr(export, "_BATCH_CHARS", 6000)
    monkeypatch.setattr(export, "_YIELD", 4)
    monkeypatch.setattr(export, "CHUNK_CHARS", 1000)
    assert exported(any_store, pid, fmt) == whole
    pieces = list(export_chunks(any_store, accounts.get_user(any_store, "ada"), pid, fmt))
    assert "".join(pieces) == whole
    assert max(map(len, pieces)) <= 1000 and len(pieces) > len(whole) // 1000
    if fmt == "json":
        rows = json.loads(whole)
        assert [r["output"] for r in rows[:len(MIXED)]] == \
            [None if isinstance(v, Failed) else v for v in MIXED]
        assert rows[4]["error"] == MIXED[4] and rows[-1]["status"] == "pending"
    else:
        table = list(csv.reader(io.StringIO(whole)))
        assert len(table) == 1 + len(MIXED) + 3 and table[1 + 3][2] == "x" * 5000


def test_who_may_export_is_checked_before_the_first_piece(any_store):
    pid = project_of(any_store, "ada", [1, 2])
    bob = accounts.get_user(any_store, "bob")
    from engine.errors import Forbidden, InvalidRequest, NotFound

    with pytest.raises(NotFound):
        export_chunks(any_store, bob, pid, "csv")  # raised by the call, not by iterating
    with pytest.raises(Forbidden):
        export_chunks(any_store, accounts.get_user(any_store, "vic"), pid, "json")
    with pytest.raises(InvalidRequest):
        export_chunks(any_store, accounts.get_user(any_store, "ada"), pid, "xlsx")


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_an_export_holds_about_one_row_whatever_the_projects_size(store, fmt):
    """12 rows of 9 MB (108 MB): the export's pieces are made holding a few rows at most.
    (Before, 5,000 rows' texts were read at once: the whole project.)"""
    add_people(store)
    pid = project_of(store, "ada", [big_output(i) for i in range(12)])
    ada = accounts.get_user(store, "ada")
    tracemalloc.start()
    try:
        pieces = export_chunks(store, ada, pid, fmt)
        total, last = 0, ""
        for piece in pieces:
            total += len(piece)
            last = (last + piece)[-200:]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    stored = len(json.dumps(big_output(0)))  # a row's output as stored
    assert total > 12 * ROW_CHARS
    assert "end of row 11" in last
    print(f"{fmt}: {total / MB:.0f} M characters exported of {12 * stored / MB:.0f} M stored; "
          f"peak traced memory {peak / MB:.1f} MB")
    assert peak < 4 * stored  # the project is 12 rows


# -- links and the route ----------------------------------------------------------------


@pytest.fixture
def people(settings, monkeypatch):
    """The route's environment (it reads settings from it, as the portal does) and people."""
    monkeypatch.setenv("CONSTELLATION_DATA_DIR", settings.data_dir)
    store = Store(settings)
    add_people(store)
    return store


@contextmanager
def route_server():
    """The portal's routes on a free port, served by uvicorn as the portal serves them."""
    import uvicorn
    from starlette.applications import Starlette

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(Starlette(routes=downloads.routes()), host="127.0.0.1",
                                           port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def user(store, name):
    return accounts.get_user(store, name)


def test_the_owner_and_an_admin_download_the_export_through_the_route(people, settings):
    pid = project_of(people, "ada", MIXED)
    with route_server() as url:
        for who in ("ada", "root"):
            for fmt in ("csv", "json"):
                status, headers, body = fetch(url + downloads.link(settings, user(people, who), pid, fmt))
                assert status == 200, body
                assert body.decode() == exported(people, pid, fmt)
                assert headers["content-disposition"] == f'attachment; filename="project-{pid}.{fmt}"'
                assert headers["cache-control"] == "no-store"
        status, headers, body = fetch(url + downloads.link(settings, user(people, "ada"), pid, "csv")
                                      .replace(".csv?", ".xlsx?"))
        assert status == 404


def forged(settings, token: str, **changes) -> str:
    """The token with its claims changed and its signature kept."""
    import base64

    body, mac = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims.update(changes)
    new_body = base64.urlsafe_b64encode(json.dumps(claims, separators=(",", ":")).encode())
    return new_body.rstrip(b"=").decode() + "." + mac


def refusals(store, settings, pid: int, other_pid: int) -> dict[str, str]:
    """name -> a link that must be refused (made now; the account-changing ones are made
    before their change, by the caller)."""
    ada, bob = user(store, "ada"), user(store, "bob")
    good = downloads.token(settings, ada, pid, "csv")
    other_key = Settings(data_dir=str(short_tempdir("cr-key-")))
    return {
        "no token": f"/download/{pid}.csv",
        "an empty token": f"/download/{pid}.csv?token=",
        "garbage": f"/download/{pid}.csv?token=not-a-token",
        "a forged signature": f"/download/{pid}.csv?token={good.split('.')[0]}.{'0' * 64}",
        "claims changed to bob": f"/download/{pid}.csv?token={forged(settings, good, u=bob.id, n='bob')}",
        "an expiry pushed back": f"/download/{pid}.csv?token={forged(settings, good, e=10 ** 15)}",
        "signed with another key": downloads.link(other_key, ada, pid, "csv"),
        "expired": downloads.link(settings, ada, pid, "csv",
                                  now=time.time() - settings.download_link_seconds - 1),
        "bob's token for ada's project": downloads.link(settings, bob, pid, "csv"),
        "a volunteer's token": downloads.link(settings, user(store, "vic"), pid, "csv"),
        "the csv token on json": f"/download/{pid}.json?token={good}",
        "another project's token": f"/download/{pid}.csv?token={downloads.token(settings, ada, other_pid, 'csv')}",
        "this token on another project": f"/download/{other_pid}.csv?token={good}",
    }


def test_every_link_but_a_valid_current_one_is_refused_with_no_data(people, settings):
    pid = project_of(people, "ada", [{"secret": "ada's data"}] * 3)
    other = project_of(people, "ada", [1])
    with route_server() as url:
        for what, path in refusals(people, settings, pid, other).items():
            status, _, body = fetch(url + path)
            assert status in (403, 404), (what, status)
            assert b"ada's data" not in body and len(body) < 200, (what, body)
            if what == "bob's token for ada's project":
                assert status == 404 and body == f"Project {pid} not found.\n".encode()
        status, _, body = fetch(url + downloads.link(settings, user(people, "ada"), pid, "csv"))
        assert status == 200 and b"ada's data" in body  # the same request, with a valid link


CHANGES = ["disabled", "disabled and enabled again", "signed out", "no longer a researcher",
           "name taken by a new account"]


@pytest.mark.parametrize("change", CHANGES)
def test_a_link_stops_working_when_its_account_changes(people, settings, change):
    """A link made before its owner was disabled (even if enabled again), signed out, lost
    the researcher role, or whose name now belongs to another account, is refused; one made
    after signing in again works."""
    from sqlalchemy import update

    from engine.models import User

    pid = project_of(people, "ada", [{"secret": "ada's data"}])
    before = downloads.link(settings, user(people, "ada"), pid, "json")
    root = user(people, "root")
    with route_server() as url:
        assert fetch(url + before)[0] == 200
        if change.startswith("disabled"):
            accounts.disable_user(people, root, "ada")
            if change.endswith("again"):
                accounts.enable_user(people, root, "ada")
        elif change == "signed out":
            logins.end_sessions(people, "ada")
        else:
            with people.session() as session:
                if change == "no longer a researcher":
                    session.execute(update(User).where(User.name == "ada").values(roles="volunteer"))
                else:
                    session.execute(update(User).where(User.name == "ada").values(name="ada-old"))
            if change == "name taken by a new account":
                accounts.add_user(people, "ada", {Role.ADMIN}, password=PASSWORD)
        status, _, body = fetch(url + before)
        assert status == 403 and b"ada's data" not in body, (status, body)
        if change == "signed out":
            time.sleep(0.01)  # a link made after signing out: after, by the clock
            assert fetch(url + downloads.link(settings, user(people, "ada"), pid, "json"))[0] == 200


def test_downloads_at_once_are_limited_per_account(people, settings, monkeypatch):
    """Each download holds up to a row in memory, so one account runs at most
    ``downloads_per_account`` at once (3 here, not the default, as the route reads it from
    the environment); the next is refused until one ends."""
    monkeypatch.setenv("CONSTELLATION_DOWNLOADS_PER_ACCOUNT", "3")
    pid = project_of(people, "ada", [big_output(i)[:2 * MB] for i in range(10)])  # 20 MB
    ada = user(people, "ada")
    with route_server() as url:
        open_ones = [urllib.request.urlopen(url + downloads.link(settings, ada, pid, "json"), timeout=60)
                     for _ in range(3)]
        for answer in open_ones:
            assert answer.status == 200 and answer.read(1000).startswith(b"[")
        status, headers, body = fetch(url + downloads.link(settings, ada, pid, "json"))
        assert status == 429 and headers["retry-after"] == "30" and not body.startswith(b"[")
        assert fetch(url + downloads.link(settings, user(people, "root"), pid, "csv"))[0] == 200
        for answer in open_ones:
            answer.close()
        deadline = time.monotonic() + 60
        while fetch(url + downloads.link(settings, ada, pid, "csv"))[0] == 429:
            assert time.monotonic() < deadline, "a closed download kept its place"
            time.sleep(0.2)


def test_the_download_limits_are_settings_of_at_least_one():
    """A link that expires at once or a limit of no downloads would refuse every download."""
    assert Settings.from_env({"CONSTELLATION_DOWNLOAD_LINK_MINUTES": "2"}).download_link_seconds == 120
    assert downloads.refresh_seconds(Settings(download_link_minutes=15)) == 5 * 60
    for name in ("download_link_minutes", "downloads_per_account", "downloads_at_once"):
        with pytest.raises(ValueError, match=f"{name} \\(CONSTELLATION_{name.upper()}\\) must be at least 1"):
            Settings(**{name: 0})


# -- the Results page's links ------------------------------------------------------------


def test_the_results_page_links_to_the_route_with_a_token_for_the_signed_in_user(people, settings):
    import re

    from portal_pages import open_page, signed_in

    pid = project_of(people, "ada", [1, 2, 3])
    at = open_page(signed_in("ada"), "app_pages/results.py", id=pid)
    assert not at.get("download_button")  # nothing built in the portal's memory
    html = "".join(h.proto.body for h in at.get("html"))
    links = dict(re.findall(r'href="(/download/\d+\.(?:csv|json)\?token=[^"]+)" download="([^"]+)"', html))
    assert sorted(links.values()) == [f"project-{pid}.csv", f"project-{pid}.json"]
    for path in links:
        project, fmt = re.match(r"/download/(\d+)\.(\w+)", path).groups()
        token = path.split("token=")[1]
        assert downloads.authorized(people, settings, token, int(project), fmt).name == "ada"
    assert re.search(r'role="button">Download CSV</a>', html)
    # Another researcher sees no project there, and no link.
    at = open_page(signed_in("bob"), "app_pages/results.py", id=pid)
    assert not at.get("html")


# -- the whole stack: a project filled to its quota ---------------------------------------


def portal_pid(supervisor_pid: int) -> int:
    """The portal process (``streamlit run``) among the supervisor's children."""
    for child in open(f"/proc/{supervisor_pid}/task/{supervisor_pid}/children").read().split():
        if b"streamlit" in open(f"/proc/{child}/cmdline", "rb").read():
            return int(child)
    raise AssertionError("no portal process under the supervisor")


def memory_kb(pid: int) -> dict[str, int]:
    fields = {}
    for line in open(f"/proc/{pid}/status"):
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


QUOTA_MB = 256


@pytest.mark.slow
def test_a_project_filled_to_its_quota_downloads_whole_with_the_portal_memory_bounded(tmp_path):
    """The finding, end to end: rows of 9 MB up to the project's 256 MB quota, downloaded as
    CSV and JSON over HTTP from ``engine serve``. Both files are complete, and the portal's
    peak memory grows by a small part of the project's size."""
    import pandas

    from support.served_portal import served_portal

    data_dir = short_tempdir("cr-dl-")
    try:
        settings = Settings(data_dir=str(data_dir), project_storage_mb=QUOTA_MB)
        store = Store(settings)
        add_people(store)
        rows = QUOTA_MB * MB // (ROW_CHARS + 200)  # 28 rows of 9 MB: as many as the quota holds
        # Both projects are made before the stack starts, so that its dispatcher never runs them.
        pid = project_of(store, "ada", [big_output(i) for i in range(rows)],
                         quota=StorageQuota.from_settings(settings))
        small = project_of(store, "ada", [1, 2, 3])
        with store.session() as session:
            from engine.models import Project

            project = session.get(Project, pid)
            stored, status = project.stored_bytes, project.status
        assert status == ProjectStatus.COMPLETE.value and stored > (QUOTA_MB - 10) * MB, (status, stored)
        with served_portal(data_dir, startup_seconds=240) as served:
            portal = portal_pid(served.pid)
            ada = accounts.get_user(store, "ada")
            # First a small download, so that what the route loads is in the baseline.
            assert fetch(served.url + downloads.link(settings, ada, small, "csv"))[0] == 200
            before = memory_kb(portal)
            sizes = {}
            for fmt in ("csv", "json"):
                target = tmp_path / f"project.{fmt}"
                with urllib.request.urlopen(served.url + downloads.link(settings, ada, pid, fmt),
                                            timeout=600) as answer, open(target, "wb") as out:
                    assert answer.status == 200
                    shutil.copyfileobj(answer, out, 1 << 20)
                sizes[fmt] = target.stat().st_size
            after = memory_kb(portal)
            # Refused without a valid link, as in the light tests, here on the served portal.
            for what, path in refusals(store, settings, pid, small).items():
                status, _, body = fetch(served.url + path)
                assert status in (403, 404) and b"end of row" not in body, (what, status)
        table = pandas.read_csv(tmp_path / "project.csv", dtype=str, keep_default_na=False)
        assert len(table) == rows and list(table["x"]) == [str(i) for i in range(rows)]
        assert list(table["output"]) == [big_output(i) for i in range(rows)]
        assert table["label"].iloc[-1] == f"'=cell {rows - 1}"  # formulas escaped, as export does
        with open(tmp_path / "project.json") as handle:
            records = json.load(handle)
        assert [r["row"] for r in records] == list(range(rows))
        assert records[-1]["output"] == big_output(rows - 1)
        growth_mb = (after["VmHWM"] - before["VmRSS"]) / 1000
        print(f"project: {stored / MB:.0f} MB stored in {rows} rows; downloaded CSV "
              f"{sizes['csv'] / MB:.0f} MB and JSON {sizes['json'] / MB:.0f} MB; portal RSS before "
              f"{before['VmRSS'] / 1000:.0f} MB, peak after {after['VmHWM'] / 1000:.0f} MB: "
              f"growth {growth_mb:.0f} MB")
        assert growth_mb < stored / MB / 4
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
