"""The Projects and Results pages show verification: counts, overhead, notice, per-row state."""

from portal_pages import open_page, signed_in

from engine import accounts, projects
from engine.models import Project
from engine.ledger import decide_rows, record_replicas, record_results
from engine.node.result import RowResult
from engine.status import ProjectStatus, transition_project
from support import fixture_bytes


def test_replicated_project_shows_verification_on_status_and_results(portal):
    store = portal
    ada = accounts.get_user(store, "ada")
    settings = store.settings
    pid = projects.submit_project(
        store, settings, ada, title="replicated", script_name="square.py",
        script_bytes=fixture_bytes("square.py"), dataset_name="d.csv",
        dataset_bytes=b"x\n1\n2\n3\n", replication=2)
    ok = [RowResult(0, True, "1", None, None, 0.1), RowResult(1, True, "4", None, None, 0.1)]
    with store.session() as s:
        transition_project(s, pid, ProjectStatus.RUNNING)
        record_replicas(s, pid, "alice", "n1", ok)
        record_replicas(s, pid, "bob", "n2", ok)
        record_replicas(s, pid, "alice", "n1", [RowResult(2, True, "9", None, None, 0.1)])
        decide_rows(s, pid, [(ok[0], "n1", "verified", ("alice", "bob"), ("alice", "bob")),
                             (ok[1], "n1", "verified", ("alice", "bob"), ("alice", "bob"))])
        s.get(Project, pid).notice = "waiting for 1 more volunteer"
    at = open_page(signed_in("ada"), "app_pages/projects.py", id=pid)
    metrics = {m.label: m.value for m in at.metric}
    assert (metrics["Verified"], metrics["Inconclusive"], metrics["Executions per row"]) == ("2", "0", "2.50")
    assert any("waiting for 1 more volunteer" in w.value for w in at.warning)
    at = open_page(at, "app_pages/results.py", id=pid)
    table = at.dataframe[0].value
    assert list(table["verification"][:2]) == ["verified", "verified"]


def test_rerun_failed_rows_button_starts_a_new_attempt(portal):
    store = portal
    ada = accounts.get_user(store, "ada")
    pid = projects.submit_project(
        store, store.settings, ada, title="flaky", script_name="raises.py",
        script_bytes=fixture_bytes("raises.py"), dataset_name="d.csv",
        dataset_bytes=b"x\n1\n3\n", replication=1)
    with store.session() as s:
        transition_project(s, pid, ProjectStatus.RUNNING)
        record_results(s, pid, [RowResult(0, True, "1", None, None, 0.1),
                                RowResult(1, False, None, "ValueError: three", None, 0.1)], "n1")
    at = open_page(signed_in("ada"), "app_pages/projects.py", id=pid)
    [button] = [b for b in at.button if b.label == "Re-run failed rows"]
    button.click()
    at.run()
    view = projects.project_status(store, ada, pid)
    assert (view.status, view.rows_failed, view.rows_succeeded) == ("submitted", 0, 1)
