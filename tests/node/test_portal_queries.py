"""The engine functions behind the portal's pages: results paging, error groups and
the trial run. Real SQLite, real sandboxed execution, no Ray."""

import pytest

from support import fixture_bytes
from engine import accounts, projects, results
from engine.accounts import Role
from engine.errors import Forbidden, NotFound
from engine.script import check_script
from engine.dataset import parse_dataset
from engine.ledger import record_results
from engine.node.result import RowResult
from engine.status import ProjectStatus, transition_project
from engine.trial import trial_run


def researcher(store, name):
    return accounts.register_user(store, name, f"{name}@x.org", "long enough", {Role.RESEARCHER})


def project_with_results(store, settings, owner, rows=2500, fail_every=7, node="node-a",
                         stored=None):
    data = b"x\n" + b"".join(b"%d\n" % i for i in range(rows))
    pid = projects.submit_project(store, settings, owner, title="t", script_name="square.py",
                                  script_bytes=fixture_bytes("square.py"), dataset_name="d.csv",
                                  dataset_bytes=data)
    with store.session() as s:
        transition_project(s, pid, ProjectStatus.RUNNING)
        outcomes = []
        for i in range(rows if stored is None else stored):
            if i % fail_every == 0:
                kind = "ValueError" if i % 2 else "KeyError"
                outcomes.append(RowResult(i, False, None, f"{kind}: row {i}", f"Traceback {i}", 0.01))
            else:
                outcomes.append(RowResult(i, True, str(i * i), None, None, 0.01))
        record_results(s, pid, outcomes, node)
    return pid


def test_a_page_joins_inputs_and_results_across_a_chunk_boundary(store, settings):
    owner = researcher(store, "ada")
    pid = project_with_results(store, settings, owner, stored=1500)
    page = results.results_page(store, owner, pid, start=995, limit=10)
    assert page.total == 2500 and page.columns == ["x"]
    assert [r.row for r in page.rows] == list(range(995, 1005))
    assert all(r.values == {"x": r.row} for r in page.rows)
    by_row = {r.row: r for r in page.rows}
    assert by_row[996].status == "succeeded" and by_row[996].output == 996 * 996
    assert by_row[994 + 7 - 994 % 7].status == "failed"  # 1001 = 7 * 143
    assert by_row[1001].error == "ValueError: row 1001"
    tail = results.results_page(store, owner, pid, start=2495, limit=100)
    assert [r.row for r in tail.rows] == list(range(2495, 2500))
    assert {r.status for r in tail.rows} == {"pending"}  # no result stored yet


def test_failed_rows_page_by_key(store, settings):
    owner = researcher(store, "ada")
    pid = project_with_results(store, settings, owner)
    expected = [i for i in range(2500) if i % 7 == 0]
    seen, after = [], -1
    while True:
        page = results.failed_page(store, owner, pid, after=after, limit=100)
        assert all(r.status == "failed" and r.values == {"x": r.row} for r in page.rows)
        seen += [r.row for r in page.rows]
        if page.next_after is None:
            break
        after = page.next_after
    assert seen == expected and page.total == len(expected)


def test_errors_are_grouped_by_exception_type(store, settings):
    owner = researcher(store, "ada")
    pid = project_with_results(store, settings, owner, rows=100)
    groups = results.error_groups(store, owner, pid)
    failed = [i for i in range(100) if i % 7 == 0]
    assert {g.kind: g.count for g in groups} == {
        "KeyError": len([i for i in failed if i % 2 == 0]),
        "ValueError": len([i for i in failed if i % 2 == 1])}
    key_error = next(g for g in groups if g.kind == "KeyError")
    assert (key_error.example_row, key_error.example_error, key_error.example_traceback) == \
        (0, "KeyError: row 0", "Traceback 0")


def test_another_users_project_is_not_found_like_a_missing_one(store, settings):
    ada, bob = researcher(store, "ada"), researcher(store, "bob")
    pid = project_with_results(store, settings, ada, rows=10)
    volunteer = accounts.register_user(store, "vic", "v@x.org", "long enough", {Role.VOLUNTEER})
    for call in (lambda u, p: results.results_page(store, u, p),
                 lambda u, p: results.failed_page(store, u, p),
                 lambda u, p: results.error_groups(store, u, p)):
        with pytest.raises(NotFound) as other:
            call(bob, pid)
        with pytest.raises(NotFound) as missing:
            call(bob, pid + 100)
        assert str(other.value).replace(str(pid), "N") == str(missing.value).replace(str(pid + 100), "N")
        with pytest.raises(Forbidden):
            call(volunteer, pid)
        with pytest.raises(Forbidden):
            call(None, pid)
    admin = accounts.add_user(store, "root", {Role.ADMIN}, password="long enough")
    assert len(results.results_page(store, admin, pid).rows) == 10


def upload(script, data):
    return (check_script(script, fixture_bytes(script), max_bytes=1 << 20),
            parse_dataset("d.csv", data, max_bytes=1 << 20))


def test_trial_run_runs_the_first_five_rows_in_the_sandbox(store, settings):
    owner = researcher(store, "ada")
    script, dataset = upload("raises.py", b"x\n" + b"".join(b"%d\n" % i for i in range(1, 101)))
    trial = trial_run(store, settings, owner, script, dataset)
    assert [r.row for r in trial.rows] == [0, 1, 2, 3, 4]
    assert [r.succeeded for r in trial.rows] == [True, True, False, True, True]
    assert trial.rows[0].output == 1
    assert trial.rows[2].error == "ValueError: row 3 is divisible by three"
    assert "Traceback" in trial.rows[2].traceback
    assert all(r.seconds > 0 for r in trial.rows)
    assert trial.estimated_seconds == pytest.approx(trial.seconds_per_row * 100 / trial.cpus)


def test_trial_run_reports_an_import_error_and_refuses_volunteers(store, settings):
    owner = researcher(store, "ada")
    script, dataset = upload("import_error.py", b"x\n1\n")
    trial = trial_run(store, settings, owner, script, dataset)
    assert trial.rows == [] and "Error" in trial.script_error
    volunteer = accounts.register_user(store, "vic", "v@x.org", "long enough", {Role.VOLUNTEER})
    with pytest.raises(Forbidden):
        trial_run(store, settings, volunteer, script, dataset)
