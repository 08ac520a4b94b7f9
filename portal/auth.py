"""Signing in and out with streamlit-authenticator, over the accounts in the store.

Each run builds the authenticator from ``engine.accounts.login_credentials``: disabled
accounts are absent (so neither the form nor an old cookie signs them in) and locked
accounts arrive with their failure count at the limit (so the form refuses them).
Wrong passwords the form sees are written back to the store, where the limit lives.
The signed-in account is looked up again on every run, so disabling takes effect at once.
"""

from __future__ import annotations

import logging
import threading

import streamlit as st
import streamlit_authenticator as stauth
from streamlit_authenticator.utilities import LoginError

from engine import accounts
from engine.accounts import Role
from engine.errors import Forbidden
from engine.models import User
from portal import errors, state

logger = logging.getLogger(__name__)

COOKIE_NAME = "constellation_auth"
COOKIE_DAYS = 7.0
# This run's authenticator and credentials. Not in st.session_state: a session's state
# outlives the run, and a stale authenticator would carry stale failure counts. Each
# session's script runs on its own thread, so a thread-local holds exactly this run's.
_run = threading.local()


def _configured_cookie_key() -> str | None:
    try:
        return st.secrets.get("cookie_key")
    except FileNotFoundError:  # no .streamlit/secrets.toml
        return None


def start() -> None:
    """Build this run's authenticator and sign in from a valid cookie, if there is one."""
    store, settings = state.store(), state.settings()
    credentials = accounts.login_credentials(store)
    # login_sleep_time=0: version 0.4.2 reads the cookie from the request, no need to wait.
    authenticator = stauth.Authenticate(
        credentials, cookie_name=COOKIE_NAME,
        cookie_key=accounts.cookie_key(settings, _configured_cookie_key()),
        cookie_expiry_days=COOKIE_DAYS, auto_hash=False, login_sleep_time=0)
    _run.authenticator, _run.credentials = authenticator, credentials
    try:
        authenticator.login(location="unrendered")
    except LoginError:
        # A validly signed cookie of an account that was disabled or removed: the visitor
        # stays anonymous, and the cookie goes.
        authenticator.cookie_controller.delete_cookie()
    if st.session_state.get("authentication_status"):
        try:
            accounts.signed_in_user(store, st.session_state["username"])
        except Forbidden as exc:
            authenticator.logout(location="unrendered")
            errors.show(exc)


def authenticator() -> stauth.Authenticate:
    return _run.authenticator


def current_user() -> User | None:
    """The signed-in, enabled account, or None."""
    if not st.session_state.get("authentication_status") or not st.session_state.get("username"):
        return None
    try:
        return accounts.signed_in_user(state.store(), st.session_state["username"])
    except Forbidden:
        return None


def require(*roles: Role) -> User:
    """The current user if they hold one of ``roles``; otherwise explain and stop the page."""
    user = current_user()
    try:
        return accounts.require_role(user, *roles)
    except Forbidden as exc:
        wanted = " or ".join(r.value for r in roles)
        if user is None:
            article = "an" if wanted[0] in "aeiou" else "a"
            st.warning(f"Sign in with {article} {wanted} account to use this page.",
                       icon=":material/lock:")
            st.page_link("app_pages/login.py", label="Sign in", icon=":material/login:")
        else:
            errors.show(exc)
        st.stop()


def login_form() -> User | None:
    """The sign-in form; returns the user once signed in. Records wrong passwords."""
    credentials = _run.credentials["usernames"]
    try:
        authenticator().login(location="main", max_login_attempts=accounts.MAX_FAILED_LOGINS,
                              fields={"Form name": "Your account", "Username": "User name",
                                      "Password": "Password", "Login": "Sign in"},
                              key="sign_in")
    except LoginError:
        st.error(f"Too many failed sign-ins for this account. Try again in "
                 f"{accounts.LOGIN_WINDOW_SECONDS // 60} minutes.", icon=":material/lock:")
        return None
    store = state.store()
    for name, entry in credentials.items():
        # The form counts this run's failure in its copy; the store keeps the real count.
        if 0 < entry.get("failed_login_attempts", 0) < accounts.MAX_FAILED_LOGINS:
            accounts.record_login_failure(store, name)
    if st.session_state.get("authentication_status") is False:
        st.error("Wrong user name or password.", icon=":material/error:")
        return None
    user = current_user()
    if user is not None:
        accounts.clear_login_failures(store, user.name)
    return user


def logout_button() -> None:
    authenticator().logout(button_name="Sign out", location="sidebar", key="sign_out")


def home(user: User) -> str:
    """The page a user lands on: their projects, or the join page for volunteers only."""
    return "app_pages/projects.py" if accounts.has_role(user, Role.RESEARCHER) else "app_pages/join.py"
