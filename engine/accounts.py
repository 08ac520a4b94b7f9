"""Users and roles, and the checks every engine call makes for the acting user."""

from __future__ import annotations

import enum
import logging
import time

from sqlalchemy import select

from engine.errors import Forbidden, InvalidRequest, NotFound
from engine.models import Project, User
from engine.store import Store

logger = logging.getLogger(__name__)

LOCAL_ADMIN = "admin"


class Role(str, enum.Enum):
    RESEARCHER = "researcher"
    VOLUNTEER = "volunteer"
    ADMIN = "admin"

    def __str__(self) -> str:
        return self.value


def get_user(store: Store, name: str) -> User:
    with store.session() as session:
        user = session.execute(select(User).where(User.name == name)).scalar_one_or_none()
    if user is None:
        raise NotFound(f"no user named {name!r}")
    return user


def local_admin(store: Store) -> User:
    """The CLI's default owner: a local admin account, created on first use, with no password."""
    with store.session() as session:
        user = session.execute(select(User).where(User.name == LOCAL_ADMIN)).scalar_one_or_none()
        if user is None:
            user = User(name=LOCAL_ADMIN, email="", password_hash="",
                        roles=f"{Role.ADMIN},{Role.RESEARCHER}", created_at=time.time())
            session.add(user)
            session.flush()
            logger.info("user %s: created as the local admin", LOCAL_ADMIN)
        return user


def create_user(store: Store, name: str, roles: set[Role], *, email: str = "",
                password_hash: str = "") -> User:
    if not name or len(name) > 64 or not name.replace("-", "").replace("_", "").isalnum():
        raise InvalidRequest("a user name is 1-64 letters, digits, '-' or '_'")
    with store.session() as session:
        if session.execute(select(User.id).where(User.name == name)).first():
            raise InvalidRequest(f"the user name {name!r} is taken")
        user = User(name=name, email=email, password_hash=password_hash,
                    roles=",".join(sorted(r.value for r in roles)), created_at=time.time())
        session.add(user)
        session.flush()
        return user


def is_admin(user: User) -> bool:
    return Role.ADMIN.value in user.role_set


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
