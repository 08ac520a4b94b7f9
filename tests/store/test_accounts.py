"""Accounts: bcrypt passwords, registration rules, sign-in limits, disabling, the CLI."""

import json
import os
import stat
import subprocess
import time

import pytest
from sqlalchemy import inspect

from support import engine_env, python
from engine import accounts, logins
from engine.accounts import Role
from engine.errors import Forbidden, InvalidRequest, NotFound


def test_the_login_failures_table_is_created_with_the_store(store):
    assert "login_failures" in inspect(store.engine).get_table_names()


def test_registration_hashes_with_bcrypt_and_lower_cases_the_name(store):
    user = accounts.register_user(store, "Ada", "ada@example.org", "correct horse",
                                  {Role.RESEARCHER, Role.VOLUNTEER})
    assert user.name == "ada" and user.role_set == {"researcher", "volunteer"}
    assert user.password_hash.startswith("$2b$") and "correct horse" not in user.password_hash
    assert logins.authenticate(store, "ADA", "correct horse").id == user.id


@pytest.mark.parametrize("name, email, password, roles, error", [
    ("ada", "ada@example.org", "short", {Role.RESEARCHER}, InvalidRequest),
    ("ada", "ada@example.org", "x" * 73, {Role.RESEARCHER}, InvalidRequest),
    ("ada", "ada@example.org", " padded password", {Role.RESEARCHER}, InvalidRequest),
    ("ada", "not-an-email", "long enough", {Role.RESEARCHER}, InvalidRequest),
    ("ada", "", "long enough", {Role.RESEARCHER}, InvalidRequest),
    ("a da", "ada@example.org", "long enough", {Role.RESEARCHER}, InvalidRequest),
    ("ada", "ada@example.org", "long enough", set(), InvalidRequest),
    ("ada", "ada@example.org", "long enough", {Role.ADMIN}, Forbidden),
    ("ada", "ada@example.org", "long enough", {Role.RESEARCHER, Role.ADMIN}, Forbidden),
])
def test_registration_refuses_bad_input_and_the_admin_role(store, name, email, password, roles, error):
    with pytest.raises(error):
        accounts.register_user(store, name, email, password, roles)
    with pytest.raises(NotFound):
        accounts.get_user(store, name.strip().lower())


def test_a_taken_name_is_refused(store):
    accounts.register_user(store, "ada", "a@x.org", "long enough", {Role.RESEARCHER})
    with pytest.raises(InvalidRequest, match="taken"):
        accounts.register_user(store, "ADA", "b@x.org", "long enough", {Role.VOLUNTEER})


def test_wrong_passwords_lock_the_name_for_the_window(store):
    accounts.register_user(store, "ada", "a@x.org", "long enough", {Role.RESEARCHER})
    for _ in range(logins.MAX_FAILED_LOGINS):
        with pytest.raises(Forbidden, match="wrong user name or password"):
            logins.authenticate(store, "ada", "wrong password")
    # Now even the right password is refused until the window ends.
    with pytest.raises(Forbidden, match="too many failed sign-ins"):
        logins.authenticate(store, "ada", "long enough")
    assert logins.login_credentials(store)["usernames"]["ada"]["failed_login_attempts"] == \
        logins.MAX_FAILED_LOGINS
    later = time.time() + logins.LOGIN_WINDOW_SECONDS + 1
    assert logins.login_lock_remaining(store, "ada", now=later) == 0
    assert logins.login_credentials(store, now=later)["usernames"]["ada"]["failed_login_attempts"] == 0


def test_a_success_clears_earlier_failures(store):
    accounts.register_user(store, "ada", "a@x.org", "long enough", {Role.RESEARCHER})
    for _ in range(logins.MAX_FAILED_LOGINS - 1):
        with pytest.raises(Forbidden):
            logins.authenticate(store, "ada", "wrong password")
    logins.authenticate(store, "ada", "long enough")
    with pytest.raises(Forbidden, match="wrong user name"):
        logins.authenticate(store, "ada", "wrong password")
    logins.authenticate(store, "ada", "long enough")  # one failure only: not locked


def test_disabled_users_cannot_sign_in_or_act(store):
    admin = accounts.add_user(store, "root", {Role.ADMIN}, password="long enough")
    ada = accounts.register_user(store, "ada", "a@x.org", "long enough", {Role.RESEARCHER})
    with pytest.raises(Forbidden):
        accounts.disable_user(store, ada, "root")  # not an admin
    accounts.disable_user(store, admin, "ada")
    with pytest.raises(Forbidden, match="disabled"):
        logins.authenticate(store, "ada", "long enough")
    with pytest.raises(Forbidden, match="disabled"):
        logins.signed_in_user(store, "ada")
    with pytest.raises(Forbidden, match="disabled"):
        accounts.require_role(accounts.get_user(store, "ada"), Role.RESEARCHER)
    assert "ada" not in logins.login_credentials(store)["usernames"]
    with pytest.raises(InvalidRequest):
        accounts.disable_user(store, admin, "root")
    with pytest.raises(NotFound):
        accounts.disable_user(store, admin, "nobody")


def test_role_checks(store):
    volunteer = accounts.register_user(store, "vic", "v@x.org", "long enough", {Role.VOLUNTEER})
    admin = accounts.add_user(store, "root", {Role.ADMIN}, password="long enough")
    assert accounts.has_role(volunteer, Role.VOLUNTEER)
    assert not accounts.has_role(volunteer, Role.RESEARCHER)
    assert not accounts.has_role(None, Role.VOLUNTEER)
    assert accounts.has_role(admin, Role.RESEARCHER) and accounts.has_role(admin, Role.VOLUNTEER)
    with pytest.raises(Forbidden):
        accounts.list_users(store, volunteer)
    assert [u.name for u in accounts.list_users(store, admin)] == ["vic", "root"]


def test_cookie_key_is_generated_once_with_mode_0600(settings):
    first = logins.cookie_key(settings)
    assert len(first) >= 32 and logins.cookie_key(settings) == first
    path = settings.data_path / "secrets" / "cookie_key"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert logins.cookie_key(settings, "from-secrets-toml") == "from-secrets-toml"


def cli(settings, *args, stdin=""):
    return subprocess.run([python(), "-m", "engine", *args], env=engine_env(settings), input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_cli_adds_lists_and_disables_users(settings, store):
    done = cli(settings, "user", "add", "Root", "--role", "admin", "--email", "r@x.org",
               "--password-stdin", stdin="long enough\n")
    assert done.returncode == 0, done.stderr
    assert logins.authenticate(store, "root", "long enough").role_set == {"admin"}
    done = cli(settings, "user", "add", "ada", "--role", "researcher", "--role", "volunteer",
               "--password-stdin", stdin="short\n")
    assert done.returncode == 2 and "at least 8 characters" in done.stderr
    assert cli(settings, "user", "add", "ada", "--role", "researcher", "--password-stdin",
               stdin="long enough\n").returncode == 0
    listed = {u["name"]: u for u in json.loads(cli(settings, "user", "list", "--json").stdout)}
    assert listed["ada"]["roles"] == ["researcher"] and listed["ada"]["disabled"] is False
    assert listed["root"]["email"] == "r@x.org"
    assert cli(settings, "user", "disable", "ada").returncode == 0
    assert json.loads(cli(settings, "user", "list", "--json").stdout)[1]["disabled"] is True
    assert cli(settings, "user", "disable", "nobody").returncode == 3
    assert "password" not in cli(settings, "user", "list").stdout


# -- the command line's own account, reserved names ---------------------------------------


@pytest.mark.parametrize("name", ["admin", "Admin", "head", "unclaimed", "operator"])
def test_registration_refuses_reserved_names(store, name):
    with pytest.raises(InvalidRequest, match="reserved"):
        accounts.register_user(store, name, "x@x.org", "long enough", {Role.VOLUNTEER})
    with pytest.raises(NotFound):
        accounts.get_user(store, name.lower())


def test_the_engine_names_of_parties_cannot_be_user_names_at_all(store):
    # A volunteer called "head" would be the operator's trusted party: their results would
    # settle rows without replication.
    with pytest.raises(InvalidRequest, match="reserved"):
        accounts.add_user(store, "head", {Role.VOLUNTEER}, password="long enough")


def test_the_local_admin_is_an_admin_without_a_password(store):
    admin = accounts.local_admin(store)
    assert admin.name == accounts.LOCAL_ADMIN and admin.role_set == {"admin", "researcher"}
    with pytest.raises(Forbidden, match="wrong user name or password"):
        logins.authenticate(store, "admin", "")
    assert "admin" not in logins.login_credentials(store)["usernames"]
    [view] = accounts.list_users(store, admin)
    assert "command line's own account" in view.note


def test_an_admin_name_someone_registered_is_not_acted_for(store):
    # As a database from before the name was reserved may hold it.
    accounts.create_user(store, "admin", {Role.RESEARCHER}, password_hash=accounts.hash_password("x" * 8))
    with pytest.raises(Forbidden, match="not the command line's own account"):
        accounts.local_admin(store)


def test_disabled_accounts_can_be_enabled_and_roles_granted(store):
    root = accounts.add_user(store, "root", {Role.ADMIN}, password="long enough")
    ada = accounts.register_user(store, "ada", "a@x.org", "long enough", {Role.RESEARCHER})
    accounts.disable_user(store, root, "ada")
    with pytest.raises(Forbidden):
        accounts.enable_user(store, ada, "ada")
    accounts.enable_user(store, root, "ada")
    assert logins.authenticate(store, "ada", "long enough").name == "ada"
    accounts.grant_role(store, root, "ada", Role.VOLUNTEER)
    assert accounts.get_user(store, "ada").role_set == {"researcher", "volunteer"}
    with pytest.raises(NotFound):
        accounts.enable_user(store, root, "nobody")


# -- sessions, registration limit ---------------------------------------------------------


def test_signing_out_ends_every_earlier_session(store):
    accounts.register_user(store, "ada", "a@x.org", "long enough", {Role.RESEARCHER})
    issued = time.time()
    assert logins.session_current(store, "ada", issued)
    logins.end_sessions(store, "ada", now=issued + 1)
    assert not logins.session_current(store, "ada", issued)      # a cookie from before
    assert logins.session_current(store, "ada", issued + 2)      # a new sign-in
    assert not logins.session_current(store, "nobody", issued)


def test_disabling_ends_sessions_and_enabling_does_not_revive_them(store):
    root = accounts.add_user(store, "root", {Role.ADMIN}, password="long enough")
    accounts.register_user(store, "ada", "a@x.org", "long enough", {Role.RESEARCHER})
    issued = time.time() - 1
    accounts.disable_user(store, root, "ada")
    assert not logins.session_current(store, "ada", issued)
    accounts.enable_user(store, root, "ada")
    assert not logins.session_current(store, "ada", issued)
    assert logins.session_current(store, "ada", time.time() + 1)


def test_registrations_are_limited_per_address(store):
    limit = accounts.MAX_REGISTRATIONS_PER_ADDRESS
    for i in range(limit):
        accounts.register_user(store, f"u{i}", f"u{i}@x.org", "long enough", {Role.VOLUNTEER},
                               address="203.0.113.7")
    with pytest.raises(InvalidRequest, match="too many accounts"):
        accounts.register_user(store, "one-more", "m@x.org", "long enough", {Role.VOLUNTEER},
                               address="203.0.113.7")
    # Another address, and the same address once the window has passed, may register.
    accounts.register_user(store, "elsewhere", "e@x.org", "long enough", {Role.VOLUNTEER},
                           address="198.51.100.1")
    accounts.register_user(store, "later", "l@x.org", "long enough", {Role.VOLUNTEER},
                           address="203.0.113.7",
                           now=time.time() + accounts.REGISTRATION_WINDOW_SECONDS + 1)


def test_a_version_3_database_gets_account_sessions(store, settings):
    from sqlalchemy import text

    from engine.models import SCHEMA_VERSION
    from engine.store import Store

    accounts.register_user(store, "ada", "a@x.org", "long enough", {Role.RESEARCHER})
    with store.session() as session:
        for column in ("sessions_valid_after", "registered_from"):
            session.execute(text(f"ALTER TABLE users DROP COLUMN {column}"))
        session.execute(text("UPDATE meta SET value = '3' WHERE key = 'schema_version'"))
    migrated = Store(settings)
    assert migrated.schema_version() == SCHEMA_VERSION
    assert logins.session_current(migrated, "ada", time.time())
    logins.end_sessions(migrated, "ada")
    assert not logins.session_current(migrated, "ada", time.time() - 1)
    migrated.engine.dispose()


def test_init_reserves_the_command_lines_own_account(settings, store):
    assert cli(settings, "init").returncode == 0
    [admin] = json.loads(cli(settings, "user", "list", "--json").stdout)
    assert (admin["name"], admin["roles"]) == ("admin", ["admin", "researcher"])
    assert "command line's own account" in admin["note"]
    with pytest.raises(InvalidRequest, match="reserved"):
        accounts.register_user(store, "admin", "a@x.org", "long enough", {Role.RESEARCHER})


def test_the_cli_refuses_an_admin_someone_registered_until_it_is_reclaimed(settings, store):
    # A database from before the name was reserved: a visitor registered "admin".
    squatter = accounts.create_user(store, "admin", {Role.RESEARCHER},
                                    password_hash=accounts.hash_password("long enough"))
    listed = cli(settings, "user", "list")
    assert listed.returncode == 4 and "not the command line's own account" in listed.stderr
    assert "reclaim-admin" in listed.stderr
    assert cli(settings, "user", "reclaim-admin").returncode == 0
    with pytest.raises(Forbidden):
        logins.authenticate(store, "admin", "long enough")  # the squatter's password is gone
    assert not logins.session_current(store, "admin", squatter.created_at + 1)
    assert cli(settings, "user", "list").returncode == 0


def test_cli_enables_users_and_grants_roles(settings, store):
    accounts.register_user(store, "ada", "a@x.org", "long enough", {Role.RESEARCHER})
    assert cli(settings, "user", "disable", "ada").returncode == 0
    assert cli(settings, "user", "enable", "ada").returncode == 0
    assert not accounts.get_user(store, "ada").disabled
    done = cli(settings, "user", "grant", "ada", "--role", "volunteer")
    assert done.returncode == 0, done.stderr
    assert accounts.get_user(store, "ada").role_set == {"researcher", "volunteer"}
    assert cli(settings, "user", "enable", "nobody").returncode == 3
