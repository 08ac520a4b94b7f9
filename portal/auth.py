"""Signing in and out, over the accounts in the store.

The engine decides who may sign in (``engine.logins.authenticate``: the lock, the
password, a disabled account); streamlit-authenticator keeps the signed-in state of the
session and sets, reads and deletes the sign-in cookie (an HS256 token of the user name
and its expiry, signed with the cookie key).

Two things the authenticator does not do are done here:

- **Signing out ends the session on the server.** ``logins.end_sessions`` records the
  time; a cookie issued before it (its issue time is its expiry minus ``COOKIE_DAYS``) no
  longer signs in, and a session that began before it ends at its next run. So a copy of
  the cookie taken before Sign out is worthless after it, in any browser.
- **No "Continue" after signing in.** The cookie is set by a component in the browser
  after the run that signed in; a ``st.rerun`` or ``st.switch_page`` in that run would
  drop the component, and the cookie with it. So that run only says "Signed in", and the
  component's own rerun, which comes once the cookie is set, opens the page.

The signed-in account is looked up again on every run (and every fragment refresh), so
disabling or signing out elsewhere takes effect at once.
"""

from __future__ import annotations

import logging
import threading
import time

import streamlit as st
import streamlit_authenticator as stauth
from streamlit_authenticator.utilities import LoginError

from engine import accounts, logins
from engine.accounts import Role
from engine.errors import Forbidden
from engine.models import User
from portal import errors, state

logger = logging.getLogger(__name__)

COOKIE_NAME = "constellation_auth"
COOKIE_DAYS = 7.0
_COOKIE_SECONDS = COOKIE_DAYS * 24 * 3600
_STARTED = "_session_started"  # when this session signed in (a cookie's issue time, or the form's)
# This run's authenticator and credentials. Not in st.session_state: a session's state
# outlives the run, and a stale authenticator would carry stale credentials. Each
# session's script runs on its own thread, so a thread-local holds exactly this run's.
_run = threading.local()

# What each role is for, and how to get it, for a signed-in user who lacks it.
_WHAT_ROLES_DO = {
    Role.RESEARCHER: "researchers, who run their scripts over datasets",
    Role.VOLUNTEER: "volunteers, who lend their machines' spare CPUs and earn credit",
    Role.ADMIN: "admins, who manage users, projects and nodes",
}


def _configured_cookie_key() -> str | None:
    try:
        return st.secrets.get("cookie_key")
    except FileNotFoundError:  # no .streamlit/secrets.toml
        return None


def start() -> None:
    """Build this run's authenticator and sign in from a valid, current cookie, if any."""
    store, settings = state.store(), state.settings()
    credentials = logins.login_credentials(store)
    # login_sleep_time=0: version 0.4.2 reads the cookie from the request, no need to wait.
    authenticator = stauth.Authenticate(
        credentials, cookie_name=COOKIE_NAME,
        cookie_key=logins.cookie_key(settings, _configured_cookie_key()),
        cookie_expiry_days=COOKIE_DAYS, auto_hash=False, login_sleep_time=0)
    _run.authenticator, _run.credentials = authenticator, credentials
    if st.session_state.get("authentication_status"):
        try:
            logins.signed_in_user(store, st.session_state["username"],
                                    since=st.session_state.get(_STARTED, 0.0))
        except Forbidden as exc:  # disabled, or signed out in another browser, meanwhile
            authenticator.logout(location="unrendered")
            errors.show(exc)
        return
    token = authenticator.cookie_controller.get_cookie()
    if not token:
        return
    issued = float(token["exp_date"]) - _COOKIE_SECONDS
    if not logins.session_current(store, token["username"], issued):
        # Signed out (or disabled) since this cookie was issued. The authenticator reads the
        # cookie from the request that opened the session, so it would find it again on
        # every run: "logout" makes it ignore the cookie for the rest of this session.
        logger.info("portal: a sign-in cookie of %s from before its sign-out was refused",
                    token["username"])
        st.session_state["logout"] = True
        authenticator.cookie_controller.delete_cookie()
        return
    try:
        authenticator.login(location="unrendered")
    except LoginError:
        # A validly signed cookie of an account without a password (or removed): the
        # visitor stays anonymous, and the cookie goes.
        authenticator.cookie_controller.delete_cookie()
        return
    st.session_state[_STARTED] = issued


def current_user() -> User | None:
    """The signed-in, enabled account whose session has not ended, or None."""
    if not st.session_state.get("authentication_status") or not st.session_state.get("username"):
        return None
    try:
        return logins.signed_in_user(state.store(), st.session_state["username"],
                                       since=st.session_state.get(_STARTED, 0.0))
    except Forbidden:
        return None


def require(*roles: Role) -> User:
    """The current user if they hold one of ``roles``; otherwise explain and stop the page.

    A visitor who is not signed in gets the sign-in form right here, so that a link to a
    page (``/projects?id=12``) still leads to that page once they have signed in.
    """
    user = current_user()
    try:
        return accounts.require_role(user, *roles)
    except Forbidden:
        wanted = " or ".join(r.value for r in roles)
        if user is None:
            article = "an" if wanted[0] in "aeiou" else "a"
            st.warning(f"Sign in with {article} {wanted} account to use this page.",
                       icon=":material/lock:")
            sign_in_form(key="sign_in_here")
        else:
            st.warning(how_to_get(user, roles), icon=":material/lock:")
        st.stop()


def how_to_get(user: User, roles: tuple[Role, ...]) -> str:
    """Why ``user`` may not use a page for ``roles``, and how to get such a role."""
    role = roles[0]
    mine = ", ".join(sorted(user.role_set)) or "no role"
    text = (f"This page is for {_WHAT_ROLES_DO[role]}. Your account {errors.plain(user.name)} "
            f"has the {mine} role.")
    if role is Role.ADMIN:
        return text + (" Admin accounts are made by the operator, on the command line "
                       "(`python -m engine user add NAME --role admin`).")
    return text + (f" To be a {role.value} too, ask an admin to add the role to your account "
                   f"(Admin > Users), or register another account as a {role.value} "
                   f"(or \"Both\").")


def sign_in_form(key: str = "sign_in") -> None:
    """The sign-in form. In the run that signs in, it says so and stops the page there
    (see the module docstring); otherwise the page goes on below it."""
    with st.form(key, enter_to_submit=True):
        st.subheader("Sign in")
        name = st.text_input("User name", key=f"{key}_name", max_chars=64,
                             autocomplete="username")
        password = st.text_input("Password", type="password", key=f"{key}_password",
                                 autocomplete="current-password")
        submitted = st.form_submit_button("Sign in", type="primary")
    if not submitted:
        return
    try:
        # The authenticator's form stripped the password too; no password may end in a space.
        user = logins.authenticate(state.store(), name, password.strip())
    except Forbidden as exc:
        st.error(errors.sentence(exc), icon=":material/lock:")
        return
    signed_in(user)


def signed_in(user: User) -> None:
    """Sign ``user`` into this session, set the sign-in cookie, say so, and end this run
    (the next run, which the cookie's component starts, opens the page)."""
    authenticator = _run.authenticator
    # A user registered in this run is not in the credentials the authenticator was built with.
    _run.credentials["usernames"].setdefault(user.name, {
        "email": user.email, "name": user.name, "password": user.password_hash,
        "roles": sorted(user.role_set), "failed_login_attempts": 0})
    st.session_state[_STARTED] = time.time()
    st.session_state["logout"] = None
    authenticator.authentication_controller.login(token={"username": user.name})
    authenticator.cookie_controller.set_cookie()
    logger.info("user %s: signed in", user.name)
    st.success(f"Signed in as {user.name}.", icon=":material/check_circle:")
    st.caption("Opening your page…")
    st.stop()


def logout_button() -> None:
    _run.authenticator.logout(button_name="Sign out", location="sidebar", key="sign_out",
                              callback=_signed_out)


def _signed_out(info: dict) -> None:
    if info.get("username"):
        logins.end_sessions(state.store(), info["username"])
    st.session_state.pop(_STARTED, None)


def client_address() -> str | None:
    """The visitor's IP address; None on the portal's own machine (and under AppTest)."""
    address = st.context.ip_address
    return address if isinstance(address, str) else None


def home(user: User) -> str:
    """The page a user lands on: their projects, or the join page for volunteers only."""
    return "app_pages/projects.py" if accounts.has_role(user, Role.RESEARCHER) else "app_pages/join.py"
