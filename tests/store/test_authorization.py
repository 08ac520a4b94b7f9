"""Authorization lives in the engine API: each role against each function that acts for a user.

A project another researcher owns is NotFound, exactly like a missing one, so ids cannot
be probed. A role that may not act at all is Forbidden. Anonymous (None) reaches only the
leaderboard.
"""

import io

import pytest

from support import fixture_bytes
from engine import accounts, credit, nodes, projects, results
from engine.accounts import Role
from engine.dataset import parse_dataset
from engine.errors import Forbidden, NotFound
from engine.export import export_results
from engine.script import check_script
from engine.trial import trial_run

MISSING = 999_999


@pytest.fixture
def people(store):
    users = {
        "alice": accounts.create_user(store, "alice", {Role.RESEARCHER}),
        "bob": accounts.create_user(store, "bob", {Role.RESEARCHER}),
        "vera": accounts.create_user(store, "vera", {Role.VOLUNTEER}),
        "root": accounts.create_user(store, "root", {Role.ADMIN}),
        "gone": accounts.create_user(store, "gone", {Role.RESEARCHER}),
    }
    return users


@pytest.fixture
def alices_project(store, settings, people):
    return projects.submit_project(
        store, settings, people["alice"], title="alice's", script_name="square.py",
        script_bytes=fixture_bytes("square.py"), dataset_name="d.csv", dataset_bytes=b"x\n1\n2\n")


def _export(store, actor, pid):
    export_results(store, actor, pid, "json", io.StringIO())


# Every engine function that reads or changes one project, for an acting user.
PROJECT_ACTIONS = {
    "status": lambda store, actor, pid: projects.project_status(store, actor, pid),
    "cancel": lambda store, actor, pid: projects.cancel_project(store, actor, pid),
    "rerun failed rows": lambda store, actor, pid: projects.rerun_failed_rows(store, actor, pid),
    "rows per node": lambda store, actor, pid: projects.rows_per_node(store, actor, pid),
    "download": _export,
    "results page": lambda store, actor, pid: results.results_page(store, actor, pid),
    "failed page": lambda store, actor, pid: results.failed_page(store, actor, pid),
    "error groups": lambda store, actor, pid: results.error_groups(store, actor, pid),
}


@pytest.mark.parametrize("action", PROJECT_ACTIONS)
def test_another_researchers_project_is_not_found_like_a_missing_one(store, people, alices_project, action):
    call = PROJECT_ACTIONS[action]
    with pytest.raises(NotFound) as other:
        call(store, people["bob"], alices_project)
    with pytest.raises(NotFound) as missing:
        call(store, people["bob"], MISSING)
    assert str(other.value) == f"project {alices_project} not found"
    assert str(missing.value) == f"project {MISSING} not found"
    # Still there and untouched for its owner.
    assert projects.project_status(store, people["alice"], alices_project).status == "submitted"


@pytest.mark.parametrize("action", PROJECT_ACTIONS)
@pytest.mark.parametrize("who", ["vera", None])
def test_volunteers_and_anonymous_reach_no_project(store, people, alices_project, action, who):
    actor = people[who] if who else None
    with pytest.raises(Forbidden):
        PROJECT_ACTIONS[action](store, actor, alices_project)


@pytest.mark.parametrize("action", ["status", "rows per node", "download", "results page",
                                    "failed page", "error groups"])
def test_owner_and_admin_may_read(store, people, alices_project, action):
    for who in ("alice", "root"):
        PROJECT_ACTIONS[action](store, people[who], alices_project)


def test_a_disabled_researcher_reaches_not_even_their_own_project(store, settings, people):
    pid = projects.submit_project(
        store, settings, people["gone"], title="t", script_name="square.py",
        script_bytes=fixture_bytes("square.py"), dataset_name="d.csv", dataset_bytes=b"x\n1\n")
    accounts.disable_user(store, people["root"], "gone")
    gone = accounts.get_user(store, "gone")
    for action, call in PROJECT_ACTIONS.items():
        with pytest.raises(Forbidden, match="is disabled"):
            call(store, gone, pid)


def test_only_the_owner_or_an_admin_may_cancel(store, people, alices_project):
    with pytest.raises(NotFound):
        projects.cancel_project(store, people["bob"], alices_project)
    projects.cancel_project(store, people["root"], alices_project)
    assert projects.project_status(store, people["alice"], alices_project).status == "cancelled"


def test_listing_shows_only_ones_own_projects(store, people, alices_project):
    assert [p.id for p in projects.list_projects(store, people["alice"])] == [alices_project]
    assert projects.list_projects(store, people["bob"]) == []
    assert [p.id for p in projects.list_projects(store, people["root"])] == [alices_project]
    for actor in (people["vera"], None):
        with pytest.raises(Forbidden):
            projects.list_projects(store, actor)


@pytest.mark.parametrize("who", ["vera", None])
def test_volunteers_and_anonymous_cannot_submit_or_trial_run(store, settings, people, who):
    actor = people[who] if who else None
    with pytest.raises(Forbidden):
        projects.submit_project(
            store, settings, actor, title="t", script_name="square.py",
            script_bytes=fixture_bytes("square.py"), dataset_name="d.csv", dataset_bytes=b"x\n1\n")
    script = check_script("square.py", fixture_bytes("square.py"), max_bytes=10_000)
    dataset = parse_dataset("d.csv", b"x\n1\n", max_bytes=10_000)
    with pytest.raises(Forbidden):
        trial_run(store, settings, actor, script, dataset)
    assert projects.list_projects(store, people["root"]) == []  # nothing was stored


@pytest.mark.parametrize("who", ["alice", "vera", None])
def test_only_admins_manage_users(store, people, who):
    actor = people[who] if who else None
    with pytest.raises(Forbidden):
        accounts.list_users(store, actor)
    with pytest.raises(Forbidden):
        accounts.disable_user(store, actor, "bob")
    assert not accounts.get_user(store, "bob").disabled
    assert [u.name for u in accounts.list_users(store, people["root"])][:2] == ["alice", "bob"]


def test_anonymous_reaches_the_leaderboard(store):
    assert credit.leaderboard(store) == []


def test_researchers_do_not_see_nodes_and_volunteers_see_their_own(store, people):
    with pytest.raises(Forbidden):
        nodes.list_nodes(store, people["alice"])
    assert nodes.list_nodes(store, people["vera"]) == []


def test_anonymous_does_not_reach_the_node_list(store):
    with pytest.raises(Forbidden):
        nodes.list_nodes(store, None)
