"""The Constellation portal: ``streamlit run streamlit_app.py`` (``make run`` starts it).

This entry point configures logging, signs the visitor in (cookie or form), and lists
every page explicitly with ``st.navigation``. The menu shows the pages the visitor's
role may use; the others stay registered but hidden, so that a link to one shows that
page's own refusal instead of a blank "page not found". Each page checks the role
itself, and the engine checks it again.
"""

from __future__ import annotations

import logging

import streamlit as st

from engine import Settings
from engine.accounts import Role, has_role
from portal import auth

logging.basicConfig(level=Settings.from_env().log_level,
                    format="%(asctime)s %(levelname)s %(name)s: %(message)s")

st.set_page_config(page_title="Constellation", page_icon=":material/hub:", layout="wide")

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


auth.start()
user = auth.current_user()
if user is not None:
    with st.sidebar:
        st.caption(f"Signed in as **{user.name}** ({', '.join(sorted(user.role_set))})")
    auth.logout_button()
    user = auth.current_user()  # None again if "Sign out" was just pressed

visible = [path for path, _, _, roles in PAGES if _allowed(user, roles)]
# The first visible page is the default: Sign in, Projects or Join cluster.
default = visible[0]
pages = [st.Page(path, title=title, icon=icon, default=(path == default),
                 visibility="visible" if path in visible else "hidden")
         for path, title, icon, _ in PAGES]
st.navigation(pages).run()
