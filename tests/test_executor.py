"""The executor runs research code in a sandboxed child; these run it for real under bubblewrap."""

import json

import pytest

from conftest import fixture_bytes
from engine import executor
from engine.executor import Limits, run_rows

LIMITS = Limits(row_timeout=2.0, sandbox="bwrap")


@pytest.fixture(autouse=True)
def _stop_children():
    yield
    executor.shutdown()


def run(script, xs, limits=LIMITS):
    source = fixture_bytes(script).decode()
    return run_rows(source, script, ["x"], [(i, [x]) for i, x in enumerate(xs)], limits)


def test_bubblewrap_is_available_here():
    assert executor.sandbox_available()


def test_outputs_and_per_row_errors_keep_row_order():
    outcome = run("raises.py", list(range(7)))
    assert [r.row_index for r in outcome.results] == list(range(7))
    assert [r.succeeded for r in outcome.results] == [False, True, True, False, True, True, False]
    failed = outcome.results[3]
    assert failed.error == "ValueError: row 3 is divisible by three"
    # The traceback shows the script's own line, although the script has no file on the node.
    assert 'File "raises.py", line 3, in main' in failed.traceback
    assert "raise ValueError" in failed.traceback
    assert json.loads(outcome.results[4].output) == 4


def test_numpy_values_become_plain_json():
    outcome = run("numpy_output.py", [2])
    assert json.loads(outcome.results[0].output) == {"scalar": 2, "array": [0, 2, 4], "mean": 0.5}


def test_unserialisable_output_fails_only_its_row():
    outcome = run("unserialisable.py", [0, 1, 2])
    assert [r.succeeded for r in outcome.results] == [True, False, True]
    assert outcome.results[1].error.startswith("TypeError: main returned a value that is not JSON-serialisable")


def test_script_import_error_is_reported_once_not_per_row():
    outcome = run("import_error.py", [1, 2, 3])
    assert outcome.results == []
    assert outcome.script_error == "ModuleNotFoundError: No module named 'a_module_that_does_not_exist'"
    assert "import_error.py" in outcome.script_traceback


def test_runaway_row_fails_alone_and_the_batch_goes_on():
    outcome = run("runaway.py", [0, 1, 2, 3, 4], Limits(row_timeout=1.0))
    assert [r.succeeded for r in outcome.results] == [True, True, False, True, True]
    assert outcome.results[2].error == "RowTimeout: row exceeded the 1 s time limit"


def test_process_exit_mid_batch_keeps_done_rows_and_names_the_culprit():
    outcome = run("exits.py", list(range(10)))
    assert [r.row_index for r in outcome.results] == list(range(10))
    assert [r.succeeded for r in outcome.results] == [i != 5 for i in range(10)]
    assert outcome.results[5].error == \
        "WorkerCrashed: the process running this row exited unexpectedly (exit code 0)"


def test_child_stays_warm_across_batches():
    source = fixture_bytes("square.py").decode()
    run_rows(source, "square.py", ["x"], [(0, [1])], LIMITS)
    first = executor._pool._children[(source, "square.py", LIMITS)].process.pid
    run_rows(source, "square.py", ["x"], [(1, [2])], LIMITS)
    assert executor._pool._children[(source, "square.py", LIMITS)].process.pid == first
