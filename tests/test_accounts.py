"""Accounts: bcrypt passwords, registration rules, sign-in limits, disabling, the CLI."""

import json
import os
import stat
import subprocess
import time

import pytest
from sqlalchemy import inspect

from conftest import engine_env, python
from engine import accounts
from engine.accounts import Role
from engine.errors import Forbidden, InvalidRequest, NotFound


def test_the_login_failures_table_is_created_with_the_store(store):
    assert "login_failures" in inspect(store.engine).get_table_names()


def test_registration_hashes_with_bcrypt_and_lower_cases_the_name(store):
    user = accounts.register_user(store, "Ada", "ada@example.org", "correct horse",
                                  {Role.RESEARCHER, Role.VOLUNTEER})
    assert user.name == "ada" and user.role_set == {"researcher", "volunteer"}
    assert user.password_hash.startswith("$2b$") and "correct horse" not in user.password_hash
    assert accounts.authenticate(store, "ADA", "correct horse").id == user.id


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
    for _ in range(accounts.MAX_FAILED_LOGINS):
        with pytest.raises(Forbidden, match="wrong user name or password"):
            accounts.authenticate(store, "ada", "wrong password")
    # Now even the right password is refused until the window ends.
    with pytest.raises(Forbidden, match="too many failed sign-ins"):
        accounts.authenticate(store, "ada", "long enough")
    assert accounts.login_credentials(store)["usernames"]["ada"]["failed_login_attempts"] == \
        accounts.MAX_FAILED_LOGINS
    later = time.time() + accounts.LOGIN_WINDOW_SECONDS + 1
    assert accounts.login_lock_remaining(store, "ada", now=later) == 0
    assert accounts.login_credentials(store, now=later)["usernames"]["ada"]["failed_login_attempts"] == 0


def test_a_success_clears_earlier_failures(store):
    accounts.register_user(store, "ada", "a@x.org", "long enough", {Role.RESEARCHER})
    for _ in range(accounts.MAX_FAILED_LOGINS - 1):
        with pytest.raises(Forbidden):
            accounts.authenticate(store, "ada", "wrong password")
    accounts.authenticate(store, "ada", "long enough")
    with pytest.raises(Forbidden, match="wrong user name"):
        accounts.authenticate(store, "ada", "wrong password")
    accounts.authenticate(store, "ada", "long enough")  # one failure only: not locked


def test_disabled_users_cannot_sign_in_or_act(store):
    admin = accounts.add_user(store, "root", {Role.ADMIN}, password="long enough")
    ada = accounts.register_user(store, "ada", "a@x.org", "long enough", {Role.RESEARCHER})
    with pytest.raises(Forbidden):
        accounts.disable_user(store, ada, "root")  # not an admin
    accounts.disable_user(store, admin, "ada")
    with pytest.raises(Forbidden, match="disabled"):
        accounts.authenticate(store, "ada", "long enough")
    with pytest.raises(Forbidden, match="disabled"):
        accounts.signed_in_user(store, "ada")
    with pytest.raises(Forbidden, match="disabled"):
        accounts.require_role(accounts.get_user(store, "ada"), Role.RESEARCHER)
    assert "ada" not in accounts.login_credentials(store)["usernames"]
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
    first = accounts.cookie_key(settings)
    assert len(first) >= 32 and accounts.cookie_key(settings) == first
    path = settings.data_path / "secrets" / "cookie_key"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert accounts.cookie_key(settings, "from-secrets-toml") == "from-secrets-toml"


def cli(settings, *args, stdin=""):
    return subprocess.run([python(), "-m", "engine", *args], env=engine_env(settings), input=stdin,
                          capture_output=True, text=True, timeout=120)


def test_cli_adds_lists_and_disables_users(settings, store):
    done = cli(settings, "user", "add", "Root", "--role", "admin", "--email", "r@x.org",
               "--password-stdin", stdin="long enough\n")
    assert done.returncode == 0, done.stderr
    assert accounts.authenticate(store, "root", "long enough").role_set == {"admin"}
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
