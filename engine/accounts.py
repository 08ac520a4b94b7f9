"""Users and roles: accounts, their passwords, volunteer approval, and the checks every
engine call makes for the acting user.

Passwords are hashed with bcrypt (the same ``$2b$`` hashes streamlit-authenticator checks).
User names are lower case, because the portal's sign-in form lower-cases what is typed.
Signing in (the sign-in limit, sessions, the sign-in cookie's key) is ``engine.logins``,
which builds on this module.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import bcrypt
from sqlalchemy import func, select

from engine.errors import Forbidden, InvalidRequest, NotFound
from engine.models import Project, User
from engine.settings import Settings
from engine.status import NodeRole
from engine.store import Store

logger = logging.getLogger(__name__)

# The command line's own account: the owner of projects submitted without --owner, and the
# actor of every CLI command. It has no password, so nobody can sign in as it; `init` and
# `serve` create it, so that nobody can register the name first.
LOCAL_ADMIN = "admin"
# The machine's own operator as the actor of a registry call (the CLI): sees every node.
OPERATOR = "operator"
# Names the engine itself uses for parties and node owners ("head" is the operator's trusted
# party: a volunteer called "head" would have their results accepted unverified).
ENGINE_NAMES = frozenset({NodeRole.HEAD.value, NodeRole.UNCLAIMED.value, OPERATOR})
RESERVED_NAMES = ENGINE_NAMES | {LOCAL_ADMIN}
MIN_PASSWORD_CHARS = 8
# Self-service registration: at most this many accounts per client address per window.
# Behind a reverse proxy every visitor has the proxy's address, so the limit is site-wide.
MAX_REGISTRATIONS_PER_ADDRESS = 10
REGISTRATION_WINDOW_SECONDS = 60 * 60
LOCAL_ADDRESS = "local"  # what Streamlit reports for a browser on the portal's own machine
# bcrypt uses only the first 72 bytes; longer passwords would silently collide.
MAX_PASSWORD_BYTES = 72


class Role(enum.StrEnum):
    RESEARCHER = "researcher"
    VOLUNTEER = "volunteer"
    ADMIN = "admin"


SELF_SERVICE_ROLES = frozenset({Role.RESEARCHER, Role.VOLUNTEER})


@dataclass(frozen=True)
class UserView:
    """What ``user list --json`` prints and the Admin page shows."""

    name: str
    email: str
    roles: list[str]
    disabled: bool
    created_at: str
    note: str = ""  # what an account is, when it is not self-evident (the CLI's own account)

    def to_dict(self) -> dict:
        return asdict(self)


# -- passwords -------------------------------------------------------------------------


def hash_password(password: str) -> str:
    """A bcrypt hash of ``password`` after checking the password rules."""
    _check_password(password)
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt()).decode()


def check_password(password: str, password_hash: str) -> bool:
    if not password_hash or len(password.encode()) > MAX_PASSWORD_BYTES:
        return False
    try:
        return bcrypt.checkpw(password.encode(), password_hash.encode())
    except ValueError:  # not a bcrypt hash
        return False


def _check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD_CHARS:
        raise InvalidRequest(f"a password needs at least {MIN_PASSWORD_CHARS} characters")
    if len(password.encode()) > MAX_PASSWORD_BYTES:
        raise InvalidRequest(f"a password can have at most {MAX_PASSWORD_BYTES} bytes")
    if password != password.strip():
        # The sign-in form strips what is typed; such a password could never match.
        raise InvalidRequest("a password cannot start or end with a space")


# -- users -----------------------------------------------------------------------------


def user_named(session, name: str) -> User | None:
    """The account called ``name`` in ``session``, or None."""
    return session.execute(select(User).where(User.name == name)).scalar_one_or_none()


def get_user(store: Store, name: str) -> User:
    with store.session() as session:
        return _by_name(session, name)


LOCAL_ADMIN_NOTE = ("the command line's own account: it owns projects submitted without "
                    "--owner and acts for every CLI command; it has no password, so nobody "
                    "can sign in with it")


def local_admin(store: Store) -> User:
    """The CLI's own account (``LOCAL_ADMIN``): an admin without a password, created on first
    use (``init`` and ``serve`` create it, so the name is never free for a visitor).

    An ``admin`` account without the admin role (one registered before the name was
    reserved) is refused rather than acted for: it belongs to whoever registered it.
    """
    with store.session() as session:
        user = user_named(session, LOCAL_ADMIN)
        if user is None:
            user = User(name=LOCAL_ADMIN, email="", password_hash="",
                        roles=f"{Role.ADMIN},{Role.RESEARCHER}", created_at=time.time())
            session.add(user)
            session.flush()
            logger.info("user %s: created as the command line's own account", LOCAL_ADMIN)
        if Role.ADMIN.value not in user.role_set:
            raise Forbidden(
                f"the account {LOCAL_ADMIN!r} is not the command line's own account (it is not an "
                f"admin: someone registered the name); pass --owner, or make it the command "
                f"line's own again with `python -m engine user reclaim-admin`")
        return user


def reclaim_local_admin(store: Store) -> User:
    """Make ``LOCAL_ADMIN`` the command line's own account again, when someone registered
    the name before it was reserved: the admin role, no password (so whoever registered it
    can no longer sign in), its sessions ended. Its projects stay, now the operator's."""
    with store.session() as session:
        user = user_named(session, LOCAL_ADMIN)
        if user is not None:
            user.roles = f"{Role.ADMIN},{Role.RESEARCHER}"
            user.password_hash = ""
            user.disabled = False
            user.sessions_valid_after = time.time()
    logger.warning("user %s: reclaimed as the command line's own account", LOCAL_ADMIN)
    return local_admin(store)


def create_user(store: Store, name: str, roles: set[Role], *, email: str = "",
                password_hash: str = "", registered_from: str | None = None,
                volunteer_approved: bool = False) -> User:
    if not name or len(name) > 64 or not name.replace("-", "").replace("_", "").isalnum() \
            or not name.isascii():
        raise InvalidRequest("a user name is 1-64 letters, digits, '-' or '_'")
    if name in ENGINE_NAMES:
        raise InvalidRequest(f"the user name {name!r} is reserved (the engine uses it for nodes)")
    if not roles:
        raise InvalidRequest("a user needs at least one role")
    email = email.strip()
    if email and ("@" not in email or len(email) > 254 or any(c.isspace() for c in email)):
        raise InvalidRequest(f"{email!r} is not an email address")
    with store.session() as session:
        if session.execute(select(User.id).where(User.name == name)).first():
            raise InvalidRequest(f"the user name {name!r} is taken")
        user = User(name=name, email=email, password_hash=password_hash,
                    roles=",".join(sorted(Role(r).value for r in roles)), created_at=time.time(),
                    registered_from=registered_from, volunteer_approved=volunteer_approved)
        session.add(user)
        session.flush()
        return user


def add_user(store: Store, name: str, roles: set[Role], *, password: str,
             email: str = "") -> User:
    """Create an account with any roles, admin included (the CLI's ``user add``). The
    operator added it, so a volunteer added this way is approved (``volunteer_approval``)."""
    user = create_user(store, name.strip().lower(), set(roles), email=email,
                       password_hash=hash_password(password), volunteer_approved=True)
    logger.info("user %s: added with roles %s", user.name, user.roles)
    return user


def register_user(store: Store, name: str, email: str, password: str,
                  roles: set[Role], *, address: str | None = None,
                  now: float | None = None) -> User:
    """Self-service registration: researcher and/or volunteer, never admin.

    ``address`` is the visitor's (None for the portal's own machine); at most
    ``MAX_REGISTRATIONS_PER_ADDRESS`` accounts are registered from one address per
    ``REGISTRATION_WINDOW_SECONDS``.
    """
    roles = {Role(r) for r in roles}
    if not roles:
        raise InvalidRequest("choose a role: researcher, volunteer or both")
    if not roles <= SELF_SERVICE_ROLES:
        raise Forbidden("the admin role is granted only from the command line")
    if not email.strip():
        raise InvalidRequest("an email address is required")
    name = name.strip().lower()
    if name in RESERVED_NAMES:
        raise InvalidRequest(f"the user name {name!r} is reserved; choose another")
    address = (address or LOCAL_ADDRESS)[:64]
    now = time.time() if now is None else now
    with store.session() as session:
        recent = session.execute(select(func.count()).select_from(User).where(
            User.registered_from == address,
            User.created_at > now - REGISTRATION_WINDOW_SECONDS)).scalar_one()
    if recent >= MAX_REGISTRATIONS_PER_ADDRESS:
        logger.warning("registration: refused from %s (%d accounts in the window)", address, recent)
        raise InvalidRequest(
            f"too many accounts were registered from your address in the last "
            f"{REGISTRATION_WINDOW_SECONDS // 60} minutes; try again later, or ask an admin")
    user = create_user(store, name, roles, email=email, password_hash=hash_password(password),
                       registered_from=address)
    logger.info("user %s: registered with roles %s", user.name, user.roles)
    return user


def _view(user: User) -> UserView:
    local = user.name == LOCAL_ADMIN and not user.password_hash
    return UserView(name=user.name, email=user.email, roles=sorted(user.role_set),
                    disabled=bool(user.disabled),
                    created_at=datetime.fromtimestamp(user.created_at, timezone.utc)
                    .isoformat(timespec="seconds"),
                    note=LOCAL_ADMIN_NOTE if local else "")


def list_users(store: Store, actor: User) -> list[UserView]:
    """Every account, oldest first (admins only)."""
    require_role(actor, Role.ADMIN)
    with store.session() as session:
        return [_view(u) for u in session.execute(select(User).order_by(User.id)).scalars()]


def disable_user(store: Store, actor: User, name: str) -> None:
    """Disable an account: it can no longer sign in or act, and its sessions end. Admins
    only; not oneself."""
    require_role(actor, Role.ADMIN)
    if name == actor.name:
        raise InvalidRequest("you cannot disable your own account")
    with store.session() as session:
        user = _by_name(session, name)
        user.disabled = True
        user.sessions_valid_after = time.time()
    logger.info("user %s: disabled by %s", name, actor.name)


def enable_user(store: Store, actor: User, name: str) -> None:
    """Enable a disabled account again; it signs in anew (its old sessions stay ended)."""
    require_role(actor, Role.ADMIN)
    with store.session() as session:
        _by_name(session, name).disabled = False
    logger.info("user %s: enabled by %s", name, actor.name)


def grant_role(store: Store, actor: User, name: str, role: Role) -> User:
    """Give an account one more role (admins only; the admin role too)."""
    require_role(actor, Role.ADMIN)
    role = Role(role)
    with store.session() as session:
        user = _by_name(session, name)
        user.roles = ",".join(sorted(user.role_set | {role.value}))
    logger.info("user %s: granted the %s role by %s", name, role.value, actor.name)
    return user


# -- volunteer approval ----------------------------------------------------------------
#
# The join command holds the cluster token, and every holder of the token can do anything
# Ray allows (docs/security.md). With the ``volunteer_approval`` setting on, a volunteer sees
# it only once an admin approved them; off (the default), on registering. Self-registered
# accounts start unapproved; accounts the operator adds (``user add``) and accounts that
# were volunteers when the store was upgraded to schema version 5 are approved.

def approve_volunteer(store: Store, actor: User, name: str) -> None:
    """Let volunteer ``name`` see the join command while ``volunteer_approval`` is on
    (admins only). Approving an approved volunteer changes nothing."""
    require_role(actor, Role.ADMIN)
    with store.session() as session:
        user = _by_name(session, name)
        if Role.VOLUNTEER.value not in user.role_set and not is_admin(user):
            raise InvalidRequest(f"{name} is not a volunteer; add the volunteer role first")
        user.volunteer_approved = True
    logger.info("user %s: approved as a volunteer by %s", name, actor.name)


def require_may_join(store: Store, settings: Settings, name: str) -> None:
    """Refuse (Forbidden) to show ``name`` the join command while ``volunteer_approval`` is
    on and no admin has approved them. Admins and the head are never refused; with the
    setting off nobody is. A name with no account is NotFound, as in ``join_command``."""
    if not settings.volunteer_approval or name == NodeRole.HEAD:
        return
    with store.session() as session:
        user = user_named(session, name)
    if user is None:
        raise NotFound(f"no volunteer named {name!r}")
    if is_admin(user) or user.volunteer_approved:
        return
    raise Forbidden(f"an admin must approve {name} as a volunteer before they can join the "
                    f"cluster (volunteer_approval is on); until then the join command, which "
                    f"holds the cluster token, is not shown")


def awaiting_approval(store: Store, settings: Settings, actor: User) -> list[UserView]:
    """Enabled volunteers whose join command waits for an admin's approval, oldest first
    (admins only). Nobody waits while ``volunteer_approval`` is off."""
    require_role(actor, Role.ADMIN)
    if not settings.volunteer_approval:
        return []
    with store.session() as session:
        users = session.execute(select(User).where(User.volunteer_approved.is_(False),
                                                   User.disabled.is_(False))
                                .order_by(User.id)).scalars().all()
    return [_view(u) for u in users if Role.VOLUNTEER.value in u.role_set and not is_admin(u)]


def _by_name(session, name: str) -> User:
    user = user_named(session, name)
    if user is None:
        raise NotFound(f"no user named {name!r}")
    return user


# -- authorisation ---------------------------------------------------------------------


def is_admin(user: User) -> bool:
    return Role.ADMIN.value in user.role_set


def has_role(user: User | None, *roles: Role) -> bool:
    """Whether ``user`` is signed in, enabled and holds one of ``roles`` (admins hold all)."""
    try:
        require_role(user, *roles)
    except Forbidden:
        return False
    return True


def require_role(user: User | None, *roles: Role) -> User:
    """The user, if signed in, enabled, and holding one of ``roles`` (admins hold all)."""
    if user is None:
        raise Forbidden("sign in first")
    if user.disabled:
        raise Forbidden(f"the account {user.name!r} is disabled")
    if is_admin(user) or any(r.value in user.role_set for r in roles):
        return user
    raise Forbidden(f"this needs the {' or '.join(r.value for r in roles)} role")


def visible_project(session, user: User | None, project_id: int) -> Project:
    """The project if ``user`` owns it or is an admin; otherwise the same NotFound as a missing id."""
    require_role(user, Role.RESEARCHER)
    project = session.get(Project, project_id)
    if project is None or not (is_admin(user) or project.owner_id == user.id):
        raise NotFound(f"project {project_id} not found")
    return project
