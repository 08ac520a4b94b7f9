"""Signing in: the sign-in limit, sessions, and what the portal's authenticator needs.

Failed sign-ins are counted per user name in the store (the ``login_failures`` table), so
the limit holds across sessions, browsers and portal restarts. A session or sign-in cookie
is current while its account exists, is enabled and has not signed out since it was
issued (``users.sessions_valid_after``). The accounts themselves, their passwords and
roles are ``engine.accounts``.
"""

from __future__ import annotations

import logging
import time

from sqlalchemy import delete, select

from engine.accounts import check_password, user_named
from engine.errors import Forbidden
from engine.keys import data_secret
from engine.models import LoginFailures, User
from engine.settings import Settings
from engine.store import Store

logger = logging.getLogger(__name__)

# Five wrong passwords within the window lock the name for the rest of the window.
MAX_FAILED_LOGINS = 5
LOGIN_WINDOW_SECONDS = 15 * 60


def login_lock_remaining(store: Store, name: str, now: float | None = None) -> float:
    """Seconds until ``name`` may try to sign in again (0 when it is not locked)."""
    now = time.time() if now is None else now
    with store.session() as session:
        row = session.get(LoginFailures, name)
        if row is None or row.failures < MAX_FAILED_LOGINS:
            return 0.0
        return max(0.0, row.window_started + LOGIN_WINDOW_SECONDS - now)


def record_login_failure(store: Store, name: str, now: float | None = None) -> int:
    """Count a wrong password for ``name``; returns the failures in the current window."""
    now = time.time() if now is None else now
    with store.session() as session:
        row = session.get(LoginFailures, name)
        if row is None:
            row = LoginFailures(name=name, failures=0, window_started=now)
            session.add(row)
        elif now - row.window_started >= LOGIN_WINDOW_SECONDS:
            row.failures, row.window_started = 0, now
        row.failures += 1
        failures = row.failures
    if failures >= MAX_FAILED_LOGINS:
        logger.warning("user %s: sign-in locked after %d failed attempts", name, failures)
    return failures


def clear_login_failures(store: Store, name: str) -> None:
    with store.session() as session:
        session.execute(delete(LoginFailures).where(LoginFailures.name == name))


def authenticate(store: Store, name: str, password: str) -> User:
    """The user if ``password`` is right and the account may sign in; else Forbidden.

    A wrong name and a wrong password give the same message. A locked name is refused
    before the password is checked. A disabled account is told that it is disabled only
    after the right password, so that nothing tells a stranger which names exist.
    """
    name = name.strip().lower()
    remaining = login_lock_remaining(store, name)
    if remaining > 0:
        raise Forbidden(f"too many failed sign-ins; try again in {_minutes(remaining)}")
    with store.session() as session:
        user = user_named(session, name)
    if user is None or not check_password(password, user.password_hash):
        record_login_failure(store, name)
        raise Forbidden("wrong user name or password")
    if user.disabled:
        raise Forbidden(f"the account {name!r} is disabled; an admin can enable it again")
    clear_login_failures(store, name)
    return user


def end_sessions(store: Store, name: str, now: float | None = None) -> None:
    """Sign ``name`` out everywhere: every session and sign-in cookie issued until now stops
    signing in (``session_current``). The portal's Sign out calls this."""
    with store.session() as session:
        user = user_named(session, name)
        if user is not None:
            user.sessions_valid_after = time.time() if now is None else now
    logger.info("user %s: signed out; earlier sessions end", name)


def session_current(store: Store, name: str, issued_at: float) -> bool:
    """Whether a session or cookie of ``name`` issued at ``issued_at`` may still sign in: the
    account exists, is enabled, and has not signed out (or been disabled) since."""
    with store.session() as session:
        user = user_named(session, name)
    return user is not None and not user.disabled and issued_at > (user.sessions_valid_after or 0.0)


def signed_in_user(store: Store, name: str, since: float | None = None) -> User:
    """The account behind a session or cookie, refused if it was disabled meanwhile, or (for
    a session that began at ``since``) if it signed out after that."""
    with store.session() as session:
        user = user_named(session, name)
    if user is None:
        raise Forbidden("this account no longer exists; sign in again")
    if user.disabled:
        raise Forbidden(f"the account {name!r} is disabled")
    if since is not None and since <= (user.sessions_valid_after or 0.0):
        raise Forbidden("this session ended (the account signed out); sign in again")
    return user


def login_credentials(store: Store, now: float | None = None) -> dict:
    """Accounts that may sign in, in streamlit-authenticator's ``credentials`` shape.

    Disabled accounts and accounts without a password are left out. A locked account
    carries ``failed_login_attempts = MAX_FAILED_LOGINS``, so the form refuses it
    when called with ``max_login_attempts=MAX_FAILED_LOGINS``.
    """
    now = time.time() if now is None else now
    with store.session() as session:
        users = session.execute(
            select(User).where(User.disabled.is_(False), User.password_hash != "")).scalars().all()
        failures = {row.name: row for row in session.execute(select(LoginFailures)).scalars()}
    usernames = {}
    for user in users:
        row = failures.get(user.name)
        locked = (row is not None and row.failures >= MAX_FAILED_LOGINS
                  and now - row.window_started < LOGIN_WINDOW_SECONDS)
        usernames[user.name] = {
            "email": user.email, "name": user.name, "password": user.password_hash,
            "roles": sorted(user.role_set),
            "failed_login_attempts": MAX_FAILED_LOGINS if locked else 0,
        }
    return {"usernames": usernames}


def _minutes(seconds: float) -> str:
    minutes = max(1, round(seconds / 60))
    return f"{minutes} minute" + ("" if minutes == 1 else "s")


def cookie_key(settings: Settings, configured: str | None = None) -> str:
    """The key that signs sign-in cookies: ``configured`` (from secrets.toml) if given,
    else one generated once into ``<data_dir>/secrets/cookie_key`` (mode 0600)."""
    if configured:
        return configured
    return data_secret(settings, "cookie_key")
