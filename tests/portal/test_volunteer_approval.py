"""The ``volunteer_approval`` setting (issue 12): when it is on, a new volunteer sees the join
command only after an admin approves them. Real SQLite; the portal under AppTest; the CLI
as a subprocess."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from engine import accounts
from engine.accounts import Role
from engine.errors import Forbidden, InvalidRequest, NotFound
from engine.models import SCHEMA_VERSION
from engine.settings import Settings
from engine.store import Store
from support import cli
from portal_pages import PASSWORD, open_page, signed_in, texts


@pytest.fixture
def approval(settings) -> Settings:
    return settings.replace(volunteer_approval=True)


def _register(store, name: str, roles=frozenset({Role.VOLUNTEER})):
    return accounts.register_user(store, name, f"{name}@x.org", PASSWORD, set(roles))


def _admin(store):
    return accounts.add_user(store, "root", {Role.ADMIN}, password=PASSWORD)


# -- the engine --------------------------------------------------------------------------


def test_the_setting_is_off_by_default_and_read_from_the_environment():
    assert Settings().volunteer_approval is False
    assert Settings.from_env({}).volunteer_approval is False
    assert Settings.from_env({"CONSTELLATION_VOLUNTEER_APPROVAL": "on"}).volunteer_approval is True


def test_with_approval_off_every_volunteer_may_join_at_once(store, settings):
    _register(store, "vera")
    accounts.require_may_join(store, settings, "vera")  # does not raise
    assert accounts.awaiting_approval(store, settings, _admin(store)) == []


def test_with_approval_on_a_new_volunteer_waits_until_an_admin_approves(store, approval):
    _register(store, "vera")
    root = _admin(store)
    with pytest.raises(Forbidden, match="an admin must approve vera as a volunteer before"):
        accounts.require_may_join(store, approval, "vera")
    assert [u.name for u in accounts.awaiting_approval(store, approval, root)] == ["vera"]
    accounts.approve_volunteer(store, root, "vera")
    accounts.require_may_join(store, approval, "vera")
    assert accounts.awaiting_approval(store, approval, root) == []
    accounts.approve_volunteer(store, root, "vera")  # again: nothing changes


def test_admins_the_head_and_operator_added_volunteers_are_never_held_back(store, approval):
    accounts.create_user(store, "boss", {Role.ADMIN})  # an admin nobody approved
    accounts.add_user(store, "vic", {Role.VOLUNTEER}, password=PASSWORD)  # the operator added vic
    for name in ("boss", "head", "vic"):
        accounts.require_may_join(store, approval, name)
    with pytest.raises(NotFound):
        accounts.require_may_join(store, approval, "nobody")


def test_only_admins_approve_and_only_volunteers_are_approved(store, approval):
    vera = _register(store, "vera")
    ada = _register(store, "ada", {Role.RESEARCHER})
    both = _register(store, "both", {Role.RESEARCHER, Role.VOLUNTEER})
    for actor in (vera, ada, both, None):
        with pytest.raises(Forbidden):
            accounts.approve_volunteer(store, actor, "vera")
        with pytest.raises(Forbidden):
            accounts.awaiting_approval(store, approval, actor)
    with pytest.raises(Forbidden):
        accounts.require_may_join(store, approval, "vera")
    root = _admin(store)
    with pytest.raises(InvalidRequest, match="not a volunteer"):
        accounts.approve_volunteer(store, root, "ada")
    with pytest.raises(NotFound):
        accounts.approve_volunteer(store, root, "nobody")
    # A disabled volunteer is not in the queue (a rogue driver's, say: review comes first).
    accounts.disable_user(store, root, "both")
    assert [u.name for u in accounts.awaiting_approval(store, approval, root)] == ["vera"]


def test_a_version_4_database_keeps_its_volunteers_approved(store, settings, approval):
    _register(store, "vera")
    _register(store, "ada", {Role.RESEARCHER})
    with store.session() as session:
        session.execute(text("ALTER TABLE users DROP COLUMN volunteer_approved"))
        session.execute(text("UPDATE meta SET value = '4' WHERE key = 'schema_version'"))
    store.engine.dispose()
    migrated = Store(approval)
    assert migrated.schema_version() == SCHEMA_VERSION
    # vera was contributing before the upgrade: turning the setting on does not cut her off.
    accounts.require_may_join(migrated, approval, "vera")
    # A researcher given the volunteer role later, and anyone registering now, need approval.
    root = _admin(migrated)
    accounts.grant_role(migrated, root, "ada", Role.VOLUNTEER)
    _register(migrated, "newbie")
    assert [u.name for u in accounts.awaiting_approval(migrated, approval, root)] == ["ada", "newbie"]
    migrated.engine.dispose()


def test_the_cli_approves_a_volunteer(settings, store, approval):
    _register(store, "vera")
    _register(store, "ada", {Role.RESEARCHER})
    done = cli(settings, "approve-volunteer", "vera")
    assert done.returncode == 0, done.stderr
    assert "volunteer vera approved" in done.stdout
    accounts.require_may_join(store, approval, "vera")
    assert cli(settings, "approve-volunteer", "ada").returncode == 2
    assert cli(settings, "approve-volunteer", "nobody").returncode == 3


# -- the portal ------------------------------------------------------------------------------


def _command(at) -> str | None:
    return next((c.value for c in at.code if "RAY_AUTH_TOKEN=" in c.value), None)


def test_the_join_page_shows_the_command_only_once_an_admin_approved(portal, monkeypatch):
    monkeypatch.setenv("CONSTELLATION_VOLUNTEER_APPROVAL", "true")
    _register(portal, "vera")
    mine = open_page(signed_in("vera"), "app_pages/join.py")
    assert _command(mine) is None
    assert not any(b.label == "Rotate my signature" for b in mine.button)
    [waiting] = [i for i in texts(mine, "info") if "Waiting for an admin's approval" in i]
    assert "An admin must approve vera as a volunteer before they can join the cluster" in waiting
    # vic was added by the operator: approved, the command is there.
    assert _command(open_page(signed_in("vic"), "app_pages/join.py")) is not None

    admin = open_page(signed_in("root"), "app_pages/admin.py")
    assert any(i.startswith("**1 volunteer waiting for your approval.**") for i in texts(admin, "info"))
    assert admin.selectbox(key="approve_choice").options == ["vera"]
    admin.button(key="approve_volunteer").click()
    admin.run()
    assert any("Volunteer vera is approved" in s for s in texts(admin, "success"))
    assert not any("waiting for your approval" in i for i in texts(admin, "info"))

    mine.run()
    assert "RAY_AUTH_MODE=token" in _command(mine)
    assert not any("Waiting for an admin's approval" in i for i in texts(mine, "info"))
    assert any(b.label == "Rotate my signature" for b in mine.button)


def test_with_approval_off_a_new_volunteer_sees_the_command_and_nobody_waits(portal):
    _register(portal, "vera")
    assert _command(open_page(signed_in("vera"), "app_pages/join.py")) is not None
    admin = open_page(signed_in("root"), "app_pages/admin.py")
    assert not any("waiting for your approval" in i for i in texts(admin, "info"))
    with pytest.raises(KeyError):
        admin.selectbox(key="approve_choice")
