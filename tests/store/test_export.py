"""CSV exports are safe to open in a spreadsheet (OWASP "CSV injection"), exact when asked,
and read back by pandas.read_csv."""

import csv
import io
import json
import subprocess

import pandas as pd
import pytest
from hypothesis import example, given, settings as hypothesis_settings, strategies as st

from support import ROOT, engine_env, fixture_bytes, python
from engine import accounts, projects
from engine.export import (_cell, _output_cell, _row_writer, _safe_cell, _safe_output_cell,
                           escape_formula, export_results)
from engine.ledger import record_results
from engine.node.result import RowResult
from engine.status import ProjectStatus, transition_project

# What docs/datasets.md tells users to run to undo the escape (the test below checks the page).
UNDO = r"^'(?='*[=+\-@\t\r])"


@pytest.mark.parametrize("cell, written", [
    ("=1+1", "'=1+1"), ("=cmd|' /C calc'!A0", "'=cmd|' /C calc'!A0"), ("+44 20 7946 0000", "'+44 20 7946 0000"),
    ("@SUM(A1)", "'@SUM(A1)"), ("\t=1", "'\t=1"), ("\r=1", "'\r=1"), ("-x", "'-x"), ("-", "'-"),
    ("--3", "'--3"), ("-2+3+cmd|' /C calc'!A0", "'-2+3+cmd|' /C calc'!A0"), ("-Infinity", "'-Infinity"),
    ("-3 ", "'-3 "), ("-3\n", "'-3\n"), ("'=1", "''=1"), ("''-3", "'''-3"),
    # Left alone: numbers as JSON writes them, text that starts safely, a leading ' before text.
    ("-3", "-3"), ("-0", "-0"), ("-2.5", "-2.5"), ("-1.5e-07", "-1.5e-07"), ("-1E+300", "-1E+300"),
    ("'tis", "'tis"), ("a=b", "a=b"), ("", ""), (" =1", " =1"), ("\n=1", "\n=1"), ("3", "3"),
])
def test_which_cells_are_escaped(cell, written):
    assert escape_formula(cell) == written


def written(rows):
    out = io.StringIO()
    write = _row_writer(out)
    for row in rows:
        write(row)
    return out.getvalue()


def read_back(text):
    return list(csv.reader(io.StringIO(text, newline="")))


CELL = st.text(alphabet="=+-@\t\r\n'\",\x1f 0123456789.eEx", max_size=8)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | CELL
    | st.sampled_from(["-3", "-1.5e-07", "'=1", "'tis", "-Infinity"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(CELL, inner, max_size=3),
    max_leaves=6)
PROPERTY = hypothesis_settings(max_examples=500, deadline=None, database=None, derandomize=True)


@PROPERTY
@given(JSON)
@example(float("-inf"))
@example(-2.5e-300)
@example("-Infinity")
@example({"k": "=1"})
def test_the_export_escapes_each_value_as_escape_formula_would(value):
    """The fast cell functions (which skip numbers) agree with the one rule, for values
    from a dataset and for outputs as the sandboxed child stores them."""
    stored = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    assert _safe_cell(value) == escape_formula(_cell(value))
    assert _safe_output_cell(stored) == escape_formula(_output_cell(stored))


@PROPERTY
@given(st.lists(st.lists(CELL, min_size=1, max_size=5), min_size=1, max_size=6))
def test_every_cell_reads_back_exactly_line_breaks_and_all(rows):
    rows = [row for row in rows if row != [""]]  # a lone empty cell is a blank line to csv
    assert read_back(written(rows)) == rows


@st.composite
def tables(draw):
    """A header of distinct, non-empty names (pandas renames repeated ones and names empty
    ones "Unnamed: 0") and rows of its width. At least two columns, as every export has
    (output, error, verification): pandas skips a line of one cell of only spaces or tabs."""
    header = draw(st.lists(CELL.filter(bool), min_size=2, max_size=5, unique=True))
    width = len(header)
    return [header, *draw(st.lists(st.lists(CELL, min_size=width, max_size=width),
                                   min_size=1, max_size=6))]


@hypothesis_settings(PROPERTY, max_examples=200)
@given(tables(), st.booleans())
def test_pandas_reads_back_each_exported_cell(table, escape):
    """Escaped (the default export) or exact, the file's cells are what pandas.read_csv gives."""
    cells = [[escape_formula(c) for c in row] for row in table] if escape else table
    frame = pd.read_csv(io.StringIO(written(cells)), dtype=str, keep_default_na=False)
    assert [list(frame.columns)] + frame.values.tolist() == cells


@PROPERTY
@given(CELL)
def test_the_documented_undo_gives_back_the_cell(cell):
    assert pd.Series([escape_formula(cell)]).replace(UNDO, "", regex=True)[0] == cell


# -- through a stored project, as researchers and the portal export ---------------------------

DATASET = ('id,=HYPERLINK("http://x")\n'
           '1,=1+1\n'
           '2,"-2+3+cmd|\' /C calc\'!A0"\n'
           '3,@SUM(A1:A3)\n'
           '4,"+44 20 7946 0000"\n'
           "5,'tis\n"
           '6,"line\r\nbreak"\n').encode()
OUTPUTS = [{"neg": -5, "formula": "=2*3", "score": -0.25, "note": "\tTAB"},
           {"neg": -1e-300, "formula": "fine", "score": 1.5, "note": "-> arrow"},
           {"neg": -3, "formula": "'=quoted", "score": 0, "note": "cr\rinside"},
           {"neg": 0, "formula": "-", "score": -7, "note": "@mention"},
           {"neg": -2, "formula": "", "score": 2, "note": None},
           {"neg": 7, "formula": "=x", "score": 1, "note": "ok"}]


def project_with_outputs(store, settings, script, dataset, outputs) -> int:
    """A project whose rows have ``outputs``, stored as the sandboxed child stores them."""
    pid = projects.submit_project(
        store, settings, accounts.local_admin(store), title="t", script_name=script,
        script_bytes=fixture_bytes(script), dataset_name="d.csv", dataset_bytes=dataset)
    with store.session() as session:
        transition_project(session, pid, ProjectStatus.RUNNING)
        record_results(session, pid, [
            RowResult(i, True, json.dumps(o, ensure_ascii=False, separators=(",", ":")), None, None, 0.0)
            for i, o in enumerate(outputs)], "node-a")
    return pid


@pytest.fixture
def project(store, settings):
    return project_with_outputs(store, settings, "dict_output.py", DATASET, OUTPUTS)


def exported(store, pid, **kw) -> str:
    out = io.StringIO()
    export_results(store, accounts.local_admin(store), pid, "csv", out, **kw)
    return out.getvalue()


def pandas_cells(text: str) -> list[list[str]]:
    frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    return [list(frame.columns)] + frame.values.tolist()


EXACT = [["id", '=HYPERLINK("http://x")', "neg", "formula", "score", "note", "error", "verification"],
         ["1", "=1+1", "-5", "=2*3", "-0.25", "\tTAB", "", "unverified"],
         ["2", "-2+3+cmd|' /C calc'!A0", "-1e-300", "fine", "1.5", "-> arrow", "", "unverified"],
         ["3", "@SUM(A1:A3)", "-3", "'=quoted", "0", "cr\rinside", "", "unverified"],
         ["4", "+44 20 7946 0000", "0", "-", "-7", "@mention", "", "unverified"],
         ["5", "'tis", "-2", "", "2", "", "", "unverified"],
         ["6", "line\r\nbreak", "7", "=x", "1", "ok", "", "unverified"]]


def test_the_default_export_escapes_formulas_and_only_them(store, project):
    cells = pandas_cells(exported(store, project))
    assert cells == [[escape_formula(c) for c in row] for row in EXACT]
    assert cells[0][1] == "'=HYPERLINK(\"http://x\")" and cells[1][3] == "'=2*3"
    assert cells[1][2] == "-5" and cells[4][4] == "-7"  # numbers stay numbers
    assert cells[3][3] == "''=quoted" and cells[5][1] == "'tis"
    assert read_back(exported(store, project)) == cells  # the csv module reads the same


def test_the_documented_undo_restores_the_exact_export(store, project):
    assert UNDO in (ROOT / "docs" / "datasets.md").read_text()
    frame = pd.read_csv(io.StringIO(exported(store, project)), dtype=str, keep_default_na=False)
    frame = frame.replace(UNDO, "", regex=True)
    frame.columns = frame.columns.str.replace(UNDO, "", regex=True)
    assert [list(frame.columns)] + frame.values.tolist() == EXACT


def test_escape_formulas_false_round_trips_exactly(store, project):
    text = exported(store, project, escape_formulas=False)
    assert pandas_cells(text) == EXACT
    assert read_back(text) == EXACT


def test_cells_are_the_stored_values_with_only_the_documented_prefix(store, settings):
    """The export copies numbers as stored (engine/export.py); escaping changes a cell only
    by its leading '. Outputs of every JSON kind, as the sandboxed child stores them."""
    values = [0, -3, 10**30, 2.5, -1e-300, 1e300, float("inf"), float("-inf"), True, False, None,
              "text", "", "1", "null", "-1", "=1", "ünï \"q\"", [1, "a"], {"k": [1]}]
    data = b"x\n" + b"".join(b"%d\n" % i for i in range(len(values)))
    pid = project_with_outputs(store, settings, "square.py", data, values)
    raw = [row[1] for row in read_back(exported(store, pid, escape_formulas=False))[1:]]
    safe = [row[1] for row in read_back(exported(store, pid))[1:]]
    assert raw == [_cell(v) for v in values]
    assert safe == [escape_formula(_cell(v)) for v in values]
    assert [(r, s) for r, s in zip(raw, safe) if r != s] == [
        ("-Infinity", "'-Infinity"), ("=1", "'=1")]


def test_json_exports_are_left_exact(store, project):
    out = io.StringIO()
    export_results(store, accounts.local_admin(store), project, "json", out)
    assert [r["output"] for r in json.loads(out.getvalue())] == OUTPUTS


def test_the_cli_escapes_by_default_and_not_with_its_flag(store, settings, project, tmp_path):
    env = engine_env(settings)
    for flags, expected in (((), [[escape_formula(c) for c in row] for row in EXACT]),
                            (("--no-escape-formulas",), EXACT)):
        path = tmp_path / "r.csv"
        subprocess.run([python(), "-m", "engine", "results", str(project), "--format", "csv",
                        "--output", path, *flags], env=env, check=True, timeout=120)
        assert pandas_cells(path.read_bytes().decode("utf-8")) == expected
        with open(path, newline="", encoding="utf-8") as handle:
            assert list(csv.reader(handle)) == expected
