"""The Constellation portal: ``streamlit run streamlit_app.py`` (``make run`` starts it).

This entry point configures logging, signs the visitor in (cookie or form), and lists
every page explicitly with ``st.navigation``. The menu shows the pages the visitor's
role may use; the others stay registered but hidden, so that a link to one shows that
page's own refusal (with a sign-in form for a visitor) instead of "page not found".

Every page answers at its own path (``/projects``, ``/join``, ...): the root path is a
hidden page that sends each visitor on to theirs (Sign in, Projects or Join cluster),
keeping the query string. Streamlit serves its default page only at ``/``, so no real
page may be the default: a typed ``/projects?id=12`` would find nothing.

The file is also the server: ``streamlit run`` reads it, finds the ``st.App`` assigned to
``app`` at the end, imports it as a module and serves that App, which adds the portal's
own HTTP routes (``portal.downloads``: whole-project downloads, streamed) beside
Streamlit's. Imported that way its ``__name__`` is ``streamlit_app`` and it only builds
the App; each session's run of the script (and AppTest's) is ``__main__`` and draws the
pages.
"""

from __future__ import annotations

import logging
from pathlib import Path

import streamlit as st

from engine import Settings
from engine.accounts import Role, has_role
from portal import downloads

logging.basicConfig(level=Settings.from_env().log_level,
                    format="%(asctime)s %(levelname)s %(name)s: %(message)s")

# A local file: a ":material/...:" page icon makes every browser fetch the favicon from
# fonts.gstatic.com. Streamlit serves its own fonts (and the Material Symbols font) itself.
FAVICON = str(Path(__file__).parent / "portal" / "static" / "favicon.png")

# (file, title, icon, who may use it). None means anonymous visitors only.
PAGES = (
    ("app_pages/login.py", "Sign in", ":material/login:", None),
    ("app_pages/register.py", "Register", ":material/person_add:", None),
    ("app_pages/projects.py", "Projects", ":material/monitoring:", (Role.RESEARCHER,)),
    ("app_pages/submit.py", "Submit", ":material/upload:", (Role.RESEARCHER,)),
    ("app_pages/results.py", "Results", ":material/table_view:", (Role.RESEARCHER,)),
    ("app_pages/join.py", "Join cluster", ":material/add_link:", (Role.VOLUNTEER,)),
    ("app_pages/leaderboard.py", "Leaderboard", ":material/leaderboard:", ()),
    ("app_pages/admin.py", "Admin", ":material/admin_panel_settings:", (Role.ADMIN,)),
)


def _allowed(user, roles) -> bool:
    if roles is None:
        return user is None
    return not roles or has_role(user, *roles)


def _landing() -> None:
    """``/``: on to the visitor's own page, with the query string (``/?id=3`` included)."""
    user = auth.current_user()
    target = "app_pages/login.py" if user is None else auth.home(user)
    st.switch_page(target, query_params=st.query_params.to_dict())


def _run() -> None:
    st.set_page_config(page_title="Constellation", page_icon=FAVICON, layout="wide")
    with errors.contained():
        auth.start()
        user = auth.current_user()
        if user is not None:
            with st.sidebar:
                st.caption(f"Signed in as **{errors.plain(user.name)}** "
                           f"({', '.join(sorted(user.role_set))})")
            auth.logout_button()
            user = auth.current_user()  # None again if "Sign out" was just pressed
        pages = [st.Page(_landing, title="Constellation", url_path="start", default=True,
                         visibility="hidden")]
        pages += [st.Page(path, title=title, icon=icon,
                          visibility="visible" if _allowed(user, roles) else "hidden")
                  for path, title, icon, roles in PAGES]
        st.navigation(pages).run()


if __name__ == "__main__":  # a session's run of the script
    # Only here: streamlit-authenticator declares its browser components when first imported,
    # and Streamlit registers (and serves) a component only if that import is in a session.
    from portal import auth, errors
    _run()
else:  # imported by `streamlit run` (engine serve), to serve the App
    app = st.App(__file__, routes=downloads.routes())
