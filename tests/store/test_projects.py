"""Submission, status transitions and exports, on a real SQLite file (no Ray needed)."""

import csv
import io
import json

import pytest
from sqlalchemy import func, select

from support import fixture_bytes
from engine import accounts, projects
from engine.errors import InvalidDataset, InvalidRequest, InvalidScript, NotFound
from engine.export import export_results
from engine.models import DatasetChunk, Project, Task
from engine.ledger import record_results
from engine.node.result import RowResult
from engine.status import ProjectStatus, transition_project


def submit(store, settings, script="square.py", data=b"x\n1\n2\n3\n", **kw):
    return projects.submit_project(
        store, settings, accounts.local_admin(store), title="t", script_name=script,
        script_bytes=fixture_bytes(script), dataset_name="d.csv", dataset_bytes=data, **kw)


def counts(store):
    with store.session() as s:
        return (s.scalar(select(func.count()).select_from(Project)),
                s.scalar(select(func.count()).select_from(DatasetChunk)))


def test_submission_stores_project_and_rows_in_chunks(store, settings):
    data = b"x\n" + b"".join(b"%d\n" % i for i in range(2500))
    pid = submit(store, settings, data=data)
    view = projects.project_status(store, accounts.local_admin(store), pid)
    assert (view.status, view.rows_total, view.rows_pending) == ("submitted", 2500, 2500)
    assert counts(store) == (1, 3)


def test_invalid_uploads_store_nothing(store, settings):
    with pytest.raises(InvalidDataset):
        submit(store, settings, data=b"x,x\n1,2\n")
    with pytest.raises(InvalidScript):
        projects.submit_project(store, settings, accounts.local_admin(store), title="t",
                                script_name="s.py", script_bytes=b"def main(:\n", dataset_name="d.csv",
                                dataset_bytes=b"x\n1\n")
    with pytest.raises(InvalidRequest):
        submit(store, settings, batch_size=0)
    assert counts(store) == (0, 0)


def test_terminal_status_is_never_left(store, settings):
    pid = submit(store, settings)
    with store.session() as s:
        assert not transition_project(s, pid, ProjectStatus.COMPLETE)  # submitted -> complete: no
        assert transition_project(s, pid, ProjectStatus.RUNNING)
        assert transition_project(s, pid, ProjectStatus.CANCELLED)
        for target in ProjectStatus:
            assert not transition_project(s, pid, target)
        assert s.get(Project, pid).status == "cancelled"
    with pytest.raises(InvalidRequest, match="already cancelled"):
        projects.cancel_project(store, accounts.local_admin(store), pid)


def test_results_count_once_and_complete_the_project(store, settings):
    pid = submit(store, settings)
    ok = [RowResult(i, True, str(i * i), None, None, 0.01) for i in range(3)]
    with store.session() as s:
        transition_project(s, pid, ProjectStatus.RUNNING)
        assert record_results(s, pid, ok[:2], "node-a") == (2, 0)
        assert record_results(s, pid, ok[:2], "node-b") == (0, 0)  # a duplicate batch counts nothing
    with store.session() as s:
        assert s.get(Project, pid).status == "running"
        record_results(s, pid, ok[2:], "node-b")
    view = projects.project_status(store, accounts.local_admin(store), pid)
    assert (view.status, view.rows_succeeded, view.rows_pending) == ("complete", 3, 0)
    with store.session() as s:
        assert s.get(Task, (pid, 0)).node_id == "node-a"  # the first result stored is the one kept


def test_rows_failed_by_nodes_never_count_towards_the_systematic_stop(store, settings):
    """NodeFailure rows (their batch failed on several nodes, for reasons of the nodes) are
    not the script's doing: 25 of them first do not stop the project; 20 real errors do."""
    pid = submit(store, settings, data=b"x\n" + b"".join(b"%d\n" % i for i in range(100)))
    node_failed = [RowResult(i, False, None, "NodeFailure: the batch holding this row failed "
                             "on 3 nodes (3 attempts); last: ...", None, 0.0) for i in range(25)]
    raised = [RowResult(i, False, None, "ValueError: bad row", "Traceback ...", 0.0)
              for i in range(25, 45)]
    with store.session() as s:
        transition_project(s, pid, ProjectStatus.RUNNING)
        record_results(s, pid, node_failed, None, systematic_rows=20)
    with store.session() as s:
        assert s.get(Project, pid).status == "running"
        record_results(s, pid, raised, "node-a", systematic_rows=20)
    with store.session() as s:
        project = s.get(Project, pid)
        assert (project.status, project.error) == ("failed", "stopped: the first 20 rows all raised ValueError")


def test_results_for_a_cancelled_project_are_not_stored(store, settings):
    pid = submit(store, settings)
    with store.session() as s:
        transition_project(s, pid, ProjectStatus.RUNNING)
        transition_project(s, pid, ProjectStatus.CANCELLED)
        assert record_results(s, pid, [RowResult(0, True, "1", None, None, 0)], "n") == (0, 0)


def _finish(store, pid, results):
    with store.session() as s:
        transition_project(s, pid, ProjectStatus.RUNNING)
        record_results(s, pid, results, "n")


def test_json_export_format(store, settings):
    pid = submit(store, settings, data=b"x\n1\n2\n")
    _finish(store, pid, [RowResult(0, True, '{"a": 1}', None, None, 0),
                         RowResult(1, False, None, "ValueError: bad", "Traceback...", 0)])
    out = io.StringIO()
    export_results(store, accounts.local_admin(store), pid, "json", out)
    assert json.loads(out.getvalue()) == [
        {"row": 0, "status": "succeeded", "output": {"a": 1}, "error": None, "verification": "unverified"},
        {"row": 1, "status": "failed", "output": None, "error": "ValueError: bad", "verification": "unverified"}]


def test_csv_export_expands_dict_outputs(store, settings):
    pid = submit(store, settings, data=b"x,label\n1,a\n2,b\n3,c\n")
    _finish(store, pid, [RowResult(0, True, '{"double": 2, "x": "one"}', None, None, 0),
                         RowResult(1, False, None, "ValueError: bad", None, 0),
                         RowResult(2, True, '{"double": 6, "extra": [1, 2]}', None, None, 0)])
    out = io.StringIO()
    export_results(store, accounts.local_admin(store), pid, "csv", out)
    rows = list(csv.reader(io.StringIO(out.getvalue())))
    assert rows == [["x", "label", "double", "output.x", "extra", "error", "verification"],
                    ["1", "a", "2", "one", "", "", "unverified"],
                    ["2", "b", "", "", "", "ValueError: bad", "unverified"],
                    ["3", "c", "6", "", "[1, 2]", "", "unverified"]]


def test_csv_export_of_scalar_outputs(store, settings):
    pid = submit(store, settings, data=b"x\n1\n2\n")
    _finish(store, pid, [RowResult(0, True, "1", None, None, 0), RowResult(1, True, '"text"', None, None, 0)])
    out = io.StringIO()
    export_results(store, accounts.local_admin(store), pid, "csv", out)
    assert out.getvalue() == "x,output,error,verification\n1,1,,unverified\n2,text,,unverified\n"


@pytest.mark.parametrize("value", [0, -3, 10**30, 2.5, -1e-300, 1e300, float("inf"), True, False,
                                   None, "text", "", "1", "null", "ünï \"q\"", [1, "a"], {"k": [1]}])
def test_csv_cells_of_stored_outputs_are_those_of_decoded_outputs(value):
    """The export copies numbers and booleans as stored; anything else is decoded first."""
    from engine.export import _cell, _output_cell

    # As the sandboxed child stores an output.
    stored = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    assert _output_cell(stored) == _cell(json.loads(stored))


def test_unknown_project_is_not_found(store):
    with pytest.raises(NotFound):
        projects.project_status(store, accounts.local_admin(store), 999)


def test_a_row_with_an_outcome_is_terminal():
    from engine.status import TaskStatus

    assert [s for s in TaskStatus if s.is_terminal()] == [TaskStatus.SUCCEEDED, TaskStatus.FAILED]
