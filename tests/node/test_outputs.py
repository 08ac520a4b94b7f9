"""Outputs that JSON cannot hold fail their row at the child, with a clear error, and every
other row of the batch goes on (docs/results.md). Real bubblewrap; the last test runs a
project through the dispatcher and both exports."""

import csv
import io
import json

import pytest

from support import fixture_bytes, run_to_end, submit_numbers
from engine import accounts
from engine.export import export_results
from engine.node import executor
from engine.node.executor import Limits, run_rows

LIMITS = Limits(row_timeout=30.0)

NAN = ("ValueError: main returned NaN or Infinity, which JSON cannot hold (return None or a "
       "string in its place)")
DEEP = ("ValueError: main returned a value nested more than 100 levels deep, more than "
        "results pages and exports read")
SURROGATE = ("ValueError: main returned text that is not valid Unicode (a lone surrogate, "
             "'\\ud800'), which cannot be stored")


@pytest.fixture(scope="module")
def results():
    source = fixture_bytes("not_json.py").decode()
    outcome = run_rows(source, "not_json.py", ["x"], [(x, [x]) for x in range(9)], LIMITS)
    executor.shutdown()
    return {r.row_index: r for r in outcome.results}


@pytest.mark.parametrize("row, error", [(1, NAN), (2, NAN), (3, DEEP), (4, DEEP), (5, SURROGATE)],
                         ids=["nan", "infinity", "3000-deep", "150-deep", "lone-surrogate"])
def test_an_output_json_cannot_hold_fails_its_row_clearly(results, row, error):
    assert (results[row].succeeded, results[row].output, results[row].error) == (False, None, error)


def test_a_lone_surrogate_in_the_scripts_own_error_is_kept_as_an_escape(results):
    # It was a WorkerCrashed: the child could not write the line, and died.
    assert results[6].error == "ValueError: a message with a lone surrogate: \\udcff"
    assert results[6].traceback.rstrip().endswith("ValueError: a message with a lone surrogate: \\udcff")


def test_the_other_rows_of_the_batch_are_untouched(results):
    assert [results[x].output for x in (0, 8)] == ["0", "8"]
    # Non-ASCII text, brackets inside strings and 90 levels of nesting are all fine.
    seven = json.loads(results[7].output)
    assert seven["text"] == "\u00e9t\u00e9 \U0001f600"
    assert seven["literal"] == "\\ud800 is how JSON escapes a surrogate"  # text, not a surrogate
    assert all(r.error is None or "WorkerCrashed" not in r.error for r in results.values())


FORGER = ("import os, sys\n"
          "def main(row):\n"
          "    os.write(int(sys.argv[-1]), (row['line'] % row['x']).encode())\n"
          "    return row['x']\n")


@pytest.mark.parametrize("output", ['"\\ud800"', '\ud800'], ids=["escaped", "raw"])
def test_a_raw_protocol_line_with_a_lone_surrogate_is_refused(output):
    # A script that writes its own line gets past the child's checks; the parent refuses
    # an output that no store could hold.
    line = json.dumps({"t": "results", "r": [[12345, 1, output, None]]}).replace("12345", "%d") + "\n"
    outcome = run_rows(FORGER, "f.py", ["x", "line"], [(0, [0, line]), (1, [1, line])], LIMITS)
    first = outcome.results[0]
    assert not first.succeeded and first.error.startswith("SandboxError: the process running "
                                                           "this row broke the result protocol")
    assert all(r.output is None or r.output.encode() for r in outcome.results)


@pytest.mark.slow
def test_every_export_reads_the_project(store, cluster_settings):
    pid = submit_numbers(store, cluster_settings, "not_json.py", 9)
    view = run_to_end(store, cluster_settings, pid)
    assert (view.rows_succeeded, view.rows_failed) == (3, 6)
    admin = accounts.local_admin(store)
    as_json, as_csv = io.StringIO(), io.StringIO()
    export_results(store, admin, pid, "json", as_json)
    export_results(store, admin, pid, "csv", as_csv)
    rows = {r["row"]: r for r in json.loads(as_json.getvalue())}  # strict JSON throughout
    assert rows[1]["error"] == NAN and rows[5]["error"] == SURROGATE
    assert rows[7]["output"]["text"] == "\u00e9t\u00e9 \U0001f600"
    assert len(list(csv.DictReader(io.StringIO(as_csv.getvalue())))) == 9
