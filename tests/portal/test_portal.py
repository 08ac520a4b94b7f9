"""The portal's pages under AppTest: real entry point, real sign-in form, real SQLite.

Ray is not needed: projects are moved along with the engine's own status functions,
exactly as the dispatcher would store them.
"""

from __future__ import annotations

import pytest

from portal_pages import (USERS, app, complete, open_page, register, sign_in, signed_in, submit, texts,
                          titles, trial_then_submit, upload)
from support import fixture_bytes
from engine import accounts, logins
from engine.models import Project
from engine.ledger import record_results
from engine.node.result import RowResult
from engine.status import ProjectStatus, transition_project

# page -> (its title, who may use it: a set of user names; None stands for anonymous)
PAGES = {
    "app_pages/login.py": ("Constellation", {None}),
    "app_pages/register.py": ("Register", {None}),
    "app_pages/projects.py": ("Projects", {"ada", "bob", "both", "root"}),
    "app_pages/submit.py": ("Submit a project", {"ada", "bob", "both", "root"}),
    "app_pages/results.py": ("Results", {"ada", "bob", "both", "root"}),
    "app_pages/join.py": ("Join cluster", {"vic", "both", "root"}),
    "app_pages/leaderboard.py": ("Leaderboard", {None, "ada", "bob", "vic", "both", "root"}),
    "app_pages/admin.py": ("Admin", {"root"}),
}


# -- signing in and registering ---------------------------------------------------------


@pytest.mark.parametrize("who", [None, *USERS])
def test_role_gating_matrix(portal, who):
    at = signed_in(who)
    for page, (title, allowed) in PAGES.items():
        open_page(at, page)
        if who in allowed:
            assert titles(at) == [title], (who, page)
            continue
        assert title not in titles(at), (who, page)
        if page in ("app_pages/login.py", "app_pages/register.py"):
            # Signed-in users are sent to their home page.
            assert titles(at) == ["Join cluster" if who == "vic" else "Projects"], (who, page)
            continue
        if who is None:
            wanted = "an admin" if page.endswith("admin.py") else \
                "a volunteer" if page.endswith("join.py") else "a researcher"
            assert texts(at, "warning") == [f"Sign in with {wanted} account to use this page."], page
            # ... and the sign-in form is right there, so that the link still works afterwards.
            assert [t.label for t in at.text_input] == ["User name", "Password"], page
        else:
            # Told what the page is for and how to get the role, not only "not allowed".
            [told] = texts(at, "warning")
            assert told.startswith("This page is for") and f"Your account {who} has the" in told
            assert ("ask an admin to add the role" in told) if not page.endswith("admin.py") \
                else ("command line" in told), (who, page, told)
        assert not at.file_uploader and not at.dataframe, (who, page)


def test_registering_signs_in_and_lands_on_the_users_page(portal):
    at = register(open_page(app(), "app_pages/register.py"), "Cleo", "cleo@x.org", role="Both")
    assert texts(at, "success") == ["Account cleo created.", "Signed in as cleo."]
    assert accounts.get_user(portal, "cleo").role_set == {"researcher", "volunteer"}
    at.run()  # the run the sign-in cookie's component starts in a browser
    assert titles(at) == ["Projects"] and at.session_state["username"] == "cleo"
    at = register(open_page(app(), "app_pages/register.py"), "vera", "v@x.org", role="Volunteer")
    assert titles(at.run()) == ["Join cluster"]
    # The same password signs in from another session.
    at = sign_in(open_page(app(), "app_pages/login.py"), "cleo", "a good password")
    assert texts(at, "success") == ["Signed in as cleo."]


def test_registration_errors_come_from_the_engine(portal):
    at = register(open_page(app(), "app_pages/register.py"), "ada", "a@x.org")
    assert any("taken" in e for e in texts(at, "error"))
    register(at, "dora", password="short")
    assert any("at least 8 characters" in e for e in texts(at, "error"))
    with pytest.raises(Exception):
        accounts.get_user(portal, "dora")


def test_wrong_passwords_lock_the_account_and_disabled_users_cannot_sign_in(portal):
    at = app()
    for _ in range(logins.MAX_FAILED_LOGINS):
        sign_in(at, "ada", "wrong password")
        assert "Wrong user name or password." in texts(at, "error")
    at = sign_in(app(), "ada")  # the right password, from a fresh session
    assert any("Too many failed sign-ins" in e for e in texts(at, "error"))
    assert not at.session_state["authentication_status"]

    accounts.disable_user(portal, accounts.get_user(portal, "root"), "bob")
    # Told that the account is disabled, but only after the right password: a wrong one
    # gets the same answer as a name that does not exist.
    at = sign_in(app(), "bob", "wrong password")
    assert texts(at, "error") == ["Wrong user name or password."]
    at = sign_in(app(), "bob")
    assert texts(at, "error") == ["The account 'bob' is disabled; an admin can enable it again."]
    assert not at.session_state["authentication_status"]


def test_a_user_disabled_while_signed_in_loses_access_at_once(portal):
    at = open_page(signed_in("ada"), "app_pages/projects.py")
    assert titles(at) == ["Projects"]
    accounts.disable_user(portal, accounts.get_user(portal, "root"), "ada")
    at.run()
    assert "Projects" not in titles(at)
    assert any("disabled" in e for e in texts(at, "error"))


def test_sign_out(portal):
    at = signed_in("ada")
    at.button(key="sign_out").click()
    at.run()
    assert not at.session_state["authentication_status"]
    open_page(at, "app_pages/submit.py")
    assert any("Sign in with a" in w for w in texts(at, "warning"))


# -- submit ------------------------------------------------------------------------------


def test_submit_validates_on_upload_trial_runs_and_submits(portal):
    at = open_page(signed_in("ada"), "app_pages/submit.py")
    upload(at, "script", "bad.py", b"def main(:\n    pass\n", "text/x-python")
    assert any("bad.py, line 1" in e and e.startswith("The script cannot be used") for e in texts(at, "error"))
    upload(at, "dataset", "d.csv", b"x,x\n1,2\n", "text/csv")
    assert any("duplicate column name" in e for e in texts(at, "error"))
    assert not any(b.label.startswith("Trial run") for b in at.button)

    upload(at, "script", "raises.py", fixture_bytes("raises.py"), "text/x-python")
    data = b"x\n" + b"".join(b"%d\n" % i for i in range(1, 101))
    upload(at, "dataset", "numbers.csv", data, "text/csv")
    assert not texts(at, "error")
    # Both uploads stay parsed across reruns (a large dataset is not parsed on every click).
    assert set(at.session_state["_checked_uploads"]) == {"script", "dataset"}
    assert "Preview: 100 rows, 1 columns" in [s.value for s in at.subheader]
    assert list(at.dataframe[0].value["x"]) == list(range(1, 21))
    assert not any(b.label == "Run on the cluster" for b in at.button)  # trial first

    at.text_input(key="title").input("divisible by three")
    at.button(key="trial_button").click()
    at.run()
    assert not at.exception, at.exception
    trial = at.dataframe[1].value
    assert list(trial["row"]) == [0, 1, 2, 3, 4]
    assert list(trial["status"]) == ["succeeded", "succeeded", "failed", "succeeded", "succeeded"]
    assert trial["error"][2] == "ValueError: row 3 is divisible by three"
    assert list(trial["output"][:2]) == ["1", "2"]
    assert any(i.startswith("Estimated computing time on the cluster") for i in texts(at, "info"))

    at.button(key="run_button").click()
    at.run()
    assert not at.exception, at.exception
    with portal.session() as s:
        stored = s.query(Project).one()
    assert (stored.title, stored.rows_total, stored.status) == ("divisible by three", 100, "submitted")
    assert stored.batch_size == 0  # left empty: adaptive batches, as on the CLI
    assert texts(at, "success") == [f"Project {stored.id} submitted."]
    at.run()  # a rerun does not submit the same upload twice
    with portal.session() as s:
        assert s.query(Project).count() == 1


def test_trial_run_shows_an_import_time_failure(portal):
    at = open_page(signed_in("ada"), "app_pages/submit.py")
    upload(at, "script", "import_error.py", fixture_bytes("import_error.py"), "text/x-python")
    upload(at, "dataset", "d.csv", b"x\n1\n", "text/csv")
    at.button(key="trial_button").click()
    at.run()
    assert any("fails while it is imported" in e and "ModuleNotFoundError" in e for e in texts(at, "error"))
    assert not any(b.label == "Run on the cluster" for b in at.button)


def test_submit_sets_replication_and_comparison(portal, monkeypatch):
    monkeypatch.setenv("CONSTELLATION_REPLICATION", "3")
    at = open_page(signed_in("ada"), "app_pages/submit.py")
    assert at.number_input(key="replication").value == 3  # the default comes from the settings
    assert at.number_input(key="tolerance").disabled  # only numeric comparison uses it
    upload(at, "script", "square.py", fixture_bytes("square.py"), "text/x-python")
    upload(at, "dataset", "d.csv", b"x\n1\n2\n", "text/csv")
    at.number_input(key="replication").set_value(4)
    at.radio(key="comparison").set_value("numeric")
    at.run()
    at.number_input(key="tolerance").set_value(1e-6)
    trial_then_submit(at)
    with portal.session() as s:
        stored = s.query(Project).one()
    assert (stored.replication, stored.comparison, stored.tolerance) == (4, "numeric", 1e-6)


def test_submit_fixes_the_batch_size_only_when_asked(portal):
    at = open_page(signed_in("ada"), "app_pages/submit.py")
    assert at.number_input(key="batch_size").value is None  # adaptive unless set
    upload(at, "script", "square.py", fixture_bytes("square.py"), "text/x-python")
    upload(at, "dataset", "d.csv", b"x\n1\n2\n", "text/csv")
    at.number_input(key="batch_size").set_value(250)
    trial_then_submit(at)
    with portal.session() as s:
        assert s.query(Project).one().batch_size == 250


# -- projects, status, cancel ---------------------------------------------------------------


def test_projects_empty_state(portal):
    at = open_page(signed_in("ada"), "app_pages/projects.py")
    assert "No projects yet: submit one." in texts(at, "info")


def test_status_after_a_project_completes(portal):
    pid = submit(portal, "ada", rows=30)
    complete(portal, pid, fail_every=10)
    at = open_page(signed_in("ada"), "app_pages/projects.py", id=pid)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Succeeded"] == "27" and metrics["Failed"] == "3" and metrics["Pending"] == "0"
    assert metrics["ETA"] == "done"
    assert "30 of 30 rows (100%)" in at.get("progress")[0].proto.text
    assert not any(b.label == "Cancel" for b in at.button)  # nothing to cancel
    assert at.get("vega_lite_chart"), "the rows-per-node chart is missing"


def test_cancel_a_running_project(portal):
    pid = submit(portal, "ada", rows=30)
    with portal.session() as s:
        transition_project(s, pid, ProjectStatus.RUNNING)
    at = open_page(signed_in("ada"), "app_pages/projects.py", id=pid)
    at.button(key=f"cancel_{pid}").click()
    at.run()
    # Asked first: nothing is cancelled yet.
    assert any(f"Cancel project #{pid}?" in w for w in texts(at, "warning"))
    with portal.session() as s:
        assert s.get(Project, pid).status == "running"
    at.button(key=f"cancel_{pid}_yes").click()
    at.run()
    with portal.session() as s:
        assert s.get(Project, pid).status == "cancelled"
    assert f"Project {pid} is cancelled." in texts(at, "success")
    assert not any(b.label == "Cancel" for b in at.button)
    # What happened to every row: none ran, and none will.
    assert {m.label: m.value for m in at.metric}["Not run"] == "30"


def test_projects_list_only_own_projects_but_admins_see_all(portal):
    submit(portal, "ada", title="ada's")
    submit(portal, "bob", title="bob's")
    at = open_page(signed_in("ada"), "app_pages/projects.py")
    table = at.dataframe[0].value
    assert list(table["title"]) == ["ada's"] and "owner" not in table
    at = open_page(signed_in("root"), "app_pages/projects.py")
    table = at.dataframe[0].value
    assert list(table["title"]) == ["bob's", "ada's"] and list(table["owner"]) == ["bob", "ada"]


@pytest.mark.parametrize("page", ["app_pages/projects.py", "app_pages/results.py"])
def test_another_users_project_is_not_found_like_a_missing_one(portal, page):
    pid = submit(portal, "ada")
    at = signed_in("bob")
    other = texts(open_page(at, page, id=pid), "error")
    missing = texts(open_page(at, page, id=pid + 1), "error")
    assert other == [f"Not found: project {pid} not found"]
    assert missing == [f"Not found: project {pid + 1} not found"]
    assert not at.dataframe and not at.metric
    at = open_page(signed_in("ada"), page, id=pid)
    assert not texts(at, "error")


# -- results ---------------------------------------------------------------------------


def test_results_pages_filters_groups_and_offers_downloads(portal):
    pid = submit(portal, "ada", rows=2500)
    complete(portal, pid, fail_every=7)
    at = open_page(signed_in("ada"), "app_pages/results.py", id=pid)
    table = at.dataframe[0].value
    assert list(table["row"]) == list(range(100))
    assert list(table["in: x"][:3]) == [1, 2, 3] and table["output"][1] == "4"
    assert table["status"][0] == "failed" and table["error"][7] == "ValueError: row 7"

    at.number_input(key=f"page_{pid}_100_all").set_value(11)
    at.run()
    assert list(at.dataframe[0].value["row"]) == list(range(1000, 1100))

    at.toggle(key="failed_only").set_value(True)
    at.run()
    failed = [i for i in range(2500) if i % 7 == 0]
    assert list(at.dataframe[0].value["row"]) == failed[:100]
    # The same page control as all rows, counting failed rows.
    pager = at.number_input(key=f"page_{pid}_100_failed")
    assert pager.label == f"Page (of 4: {len(failed)} failed rows)"
    pager.set_value(2)
    at.run()
    assert list(at.dataframe[0].value["row"]) == failed[100:200]
    at.number_input(key=f"page_{pid}_100_failed").set_value(4)
    at.run()
    assert list(at.dataframe[0].value["row"]) == failed[300:]
    at.number_input(key=f"page_{pid}_100_failed").set_value(1)
    at.run()
    assert list(at.dataframe[0].value["row"]) == failed[:100]

    assert [e.label for e in at.expander if "rows" in e.label] == [f"ValueError: {len(failed)} rows"]
    assert any("Traceback" in c.value for c in at.code)
    # The whole-project downloads are links to the portal's streaming route (portal.downloads).
    links = "".join(h.proto.body for h in at.get("html"))
    assert ">Download CSV</a>" in links and ">Download JSON</a>" in links


def test_results_without_projects_shows_the_empty_state(portal):
    at = open_page(signed_in("ada"), "app_pages/results.py")
    assert "No projects yet: submit one." in texts(at, "info")


# -- leaderboard, join, admin -----------------------------------------------------------------


def test_leaderboard_for_anonymous_visitors(portal):
    at = open_page(app(), "app_pages/leaderboard.py")
    assert titles(at) == ["Leaderboard"]
    assert any("No credit earned" in i for i in texts(at, "info"))
    assert any("median" in m.value for m in at.markdown)  # the credit rule is explained


def test_leaderboard_ranks_volunteers_by_credit(portal, settings):
    from engine import credit, nodes
    from support.registry import labels_of, ray_node

    nodes.sync_registry(portal, settings, [
        ray_node("vic-node", labels_of(nodes.join_command(portal, settings, "vic"))),
        ray_node("both-node", labels_of(nodes.join_command(portal, settings, "both")))])
    pid = submit(portal, "ada", rows=30)
    with portal.session() as s:
        transition_project(s, pid, ProjectStatus.RUNNING)
        for node, rows in (("vic-node", range(0, 20)), ("both-node", range(20, 30))):
            record_results(s, pid, [RowResult(i, True, "1", None, None, 0.5) for i in rows], node,
                           verification="verified")
    credit.refresh(portal, force=True)
    at = open_page(app(), "app_pages/leaderboard.py")
    board = at.dataframe[0].value
    assert list(board["volunteer"]) == ["vic", "both"] and list(board["rank"]) == [1, 2]
    assert list(board["verified tasks"]) == [20, 10] and list(board["nodes"]) == [1, 1]
    at.segmented_control(key="window").set_value("Last 24 h")
    at.run()
    assert list(at.dataframe[0].value["volunteer"]) == ["vic", "both"]


def test_join_shows_the_volunteers_command(portal):
    at = open_page(signed_in("vic"), "app_pages/join.py")
    command = at.code[0].value
    assert command.startswith("RAY_AUTH_MODE=token ") and " bwrap " in command
    assert 'ray start "$@"' in command and "RAY_AUTH_MODE=token" in command


def test_admin_disables_users_and_cancels_projects(portal):
    pid = submit(portal, "ada")
    at = open_page(signed_in("root"), "app_pages/admin.py")
    at.selectbox(key="user_choice").set_value("bob")
    at.run()
    at.button(key="disable_user").click()
    at.run()
    # Asked first.
    assert any("Disable bob?" in w for w in texts(at, "warning"))
    assert not accounts.get_user(portal, "bob").disabled
    at.button(key="user_yes").click()
    at.run()
    assert accounts.get_user(portal, "bob").disabled
    # The users table already shows it, in the same run.
    users = at.dataframe[0].value
    assert list(users.loc[users["name"] == "bob", "status"]) == ["disabled"]
    assert "User bob is disabled; their sessions have ended." in texts(at, "success")
    # And back.
    at.button(key="enable_user").click()
    at.run()
    assert not accounts.get_user(portal, "bob").disabled
    users = at.dataframe[0].value
    assert list(users.loc[users["name"] == "bob", "status"]) == ["active"]

    at.selectbox(key="cancel_choice").set_value(pid)
    at.button(key="cancel_project").click()
    at.run()
    with portal.session() as s:
        assert s.get(Project, pid).status == "submitted"
    at.button(key="cancel_yes").click()
    at.run()
    with portal.session() as s:
        assert s.get(Project, pid).status == "cancelled"
    projects_table = at.dataframe[1].value
    assert list(projects_table.loc[projects_table["id"] == pid, "status"]) == ["cancelled"]
