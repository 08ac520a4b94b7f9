"""CSV typing is lossless: a cell reaches main as its exact text, or as a value that gives
back exactly that text. pandas with dtype=str is the oracle for the text."""

import ast
import io
import json
import math
import re
import subprocess

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st

from support import FIXTURES, ROOT, python, run_to_end
from engine import accounts, projects
from engine.dataset import parse_dataset
from engine.errors import InvalidDataset
from engine.export import export_results

DATASETS = FIXTURES / "datasets"
LIMIT = 10 * 1024 * 1024
INT64 = range(-2**63, 2**63)
SPELLINGS = ({"true": True, "false": False}, {"True": True, "False": False},
             {"TRUE": True, "FALSE": False})


def parse(data: bytes, name="d.csv"):
    return parse_dataset(name, data, max_bytes=LIMIT)


def one_column(cells) -> str:
    # An empty cell is written "" so that its line is not blank (and skipped).
    return "c\n" + "".join((c or '""') + "\n" for c in cells)


def column(cells):
    """The values main receives for a one-column CSV of these cells."""
    return [row[0] for row in parse(one_column(cells).encode()).rows]


def old_typing(cells):
    """What main received before (pandas' inference, which the old code reproduced)."""
    frame = pd.read_csv(io.StringIO(one_column(cells)), keep_default_na=False, na_values=[""],
                        dtype_backend="numpy_nullable")
    return frame["c"].astype(object).where(frame["c"].notna(), None).tolist()


def typed(values):
    return [(type(v).__name__, v) for v in values]


# cells, what main received before, what it receives now
EDGE_CASES = [
    (["08123", "12345"], [8123, 12345], ["08123", "12345"]),                 # postcodes
    (["007"], [7], ["007"]),
    (["+447911123456"], [447911123456], ["+447911123456"]),                  # phone numbers
    (["1e5", "1234"], [100000.0, 1234.0], ["1e5", "1234"]),                  # codes
    (["123456789012345678", "1.5"], [1.2345678901234568e17, 1.5],           # an id among decimals
     [123456789012345678, 1.5]),
    (["12345678901234567890"], [12345678901234567890], ["12345678901234567890"]),  # past 64 bits
    (["9223372036854775808"], [9223372036854775808], ["9223372036854775808"]),    # 2**63: 19 digits
    (["-9223372036854775809"], ["-9223372036854775809"], ["-9223372036854775809"]),
    (["0.1000000000000000055"], [0.1], ["0.1000000000000000055"]),           # more than a float holds
    (["2.50", "1.10"], [2.5, 1.1], ["2.50", "1.10"]),                        # versions, precision
    (["1.", ".5"], [1.0, 0.5], ["1.", ".5"]),
    (["-0"], [0], ["-0"]),
    ([" 1"], [1], [" 1"]),
    (["inf"], [math.inf], ["inf"]),
    (["TRUE", "false"], [True, False], ["TRUE", "false"]),                   # two spellings
    (["1", "2.5"], [1.0, 2.5], [1, 2.5]),                                   # each as written
    # Unchanged: these read back exactly.
    (["0", "-12", "9223372036854775807"], [0, -12, 9223372036854775807], [0, -12, 9223372036854775807]),
    (["1.0", "-0.0", "3.14159265358979", "1e+16", "5e-324"], [1.0, -0.0, 3.14159265358979, 1e16, 5e-324],
     [1.0, -0.0, 3.14159265358979, 1e16, 5e-324]),
    (["TRUE", "FALSE"], [True, False], [True, False]),
    (["true", "", "false"], [True, None, False], [True, None, False]),
    (["nan", "1.5"], ["nan", "1.5"], ["nan", "1.5"]),
    (["1_000"], ["1_000"], ["1_000"]),
]


@pytest.mark.parametrize("cells, before, now", EDGE_CASES, ids=[" ".join(c[0]) for c in EDGE_CASES])
def test_edge_cases_against_the_old_typing(cells, before, now):
    assert typed(old_typing(cells)) == typed(before)  # pins what used to happen
    assert typed(column(cells)) == typed(now)


def test_a_column_is_typed_only_as_a_whole():
    dataset = parse(b"zip,n\n08123,1\n12345,2\n")
    assert dataset.rows == [["08123", 1], ["12345", 2]]  # not 12345 beside "08123"
    assert typed(column(["3", "x"])) == [("str", "3"), ("str", "x")]


def documented_examples():
    """The rows of docs/datasets.md's table of the typing rule: cells, what main receives."""
    page = (ROOT / "docs" / "datasets.md").read_text()
    table = page.split("| cells in a column | `main` receives | why |\n|---|---|---|\n")[1]
    examples = []
    for line in table.split("\n\n")[0].splitlines():
        given_cells, received, _why = line.strip("| ").split(" | ")
        cells = re.findall(r"`([^`]*)`", given_cells)
        if given_cells.endswith(", empty"):
            cells.append("")
        examples.append((cells, received))
    return examples


EXAMPLES = documented_examples()


@pytest.mark.parametrize("cells, received", EXAMPLES, ids=[" ".join(c) for c, _ in EXAMPLES])
def test_the_documented_examples_hold(cells, received):
    values = column(cells)
    if received in ("`int`", "`float`", "`str`"):  # a type for every cell, read back exactly
        assert {type(v).__name__ for v in values} == {received.strip("`")}
        assert all(reads_back_as(v, c) for v, c in zip(values, cells))
    else:  # the values themselves, as Python literals
        literals = re.findall(r"`([^`]*)`", received)
        assert typed(values) == typed(ast.literal_eval(x) for x in literals)


def test_the_readme_states_the_rule_and_links_the_page():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Datasets\n")[1].split("\n## ")[0]
    assert "A column is typed only when every value in it gives back exactly its text" in section
    assert "[docs/datasets.md](docs/datasets.md)" in section
    for cells, now in ((["08123"], ["08123"]), (["+447911123456"], ["+447911123456"]),
                       (["12345678901234567890"], ["12345678901234567890"]),
                       (["1e5", "1234"], ["1e5", "1234"]), (["3", "2.5"], [3, 2.5]),
                       (["true"], [True])):
        assert all(f"`{c}`" in section for c in cells[:1])  # the README's examples
        assert typed(column(cells)) == typed(now)


def test_parsing_a_csv_does_not_import_pandas():
    # pandas costs about half a second to import: most of a small submission's set-up.
    code = ("import sys; from engine.dataset import parse_dataset; "
            "parse_dataset('d.csv', b'a,b\\n1,x\\n2.5,y\\n', max_bytes=100); "
            "print('pandas' in sys.modules)")
    done = subprocess.run([python(), "-c", code], capture_output=True, text=True, check=True,
                          cwd=ROOT)
    assert done.stdout.strip() == "False"


# -- the rule, as docs/datasets.md states it, against generated files ------------------------

def lossless(text: str):
    """The number a cell means if Python writes that number back as exactly the cell."""
    try:
        number = int(text)
        if str(number) == text and number in INT64:
            return number
    except ValueError:
        pass
    try:
        number = float(text)
        if math.isfinite(number) and repr(number) == text:
            return number
    except ValueError:
        pass
    return None


def expected_column(cells):
    """The docs' rule, cell by cell: numbers if all are numbers, booleans if all are true/false
    in one spelling, else text; empty cells are None."""
    present = [c for c in cells if c != ""]
    numbers = [lossless(c) for c in present]
    if present and None not in numbers:
        typed_cells = iter(numbers)
    else:
        spelling = next((s for s in SPELLINGS if present and set(present) <= s.keys()), None)
        typed_cells = iter([spelling[c] for c in present] if spelling else present)
    return [next(typed_cells) if c != "" else None for c in cells]


def oracle_text(data: bytes) -> list[list[str]]:
    """Each cell's text as pandas reads it with dtype=str (the oracle), from the file's bytes."""
    frame = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False, encoding="utf-8-sig")
    return frame.fillna("").values.tolist()


def reads_back_as(value, text: str) -> bool:
    """Does ``value`` (what main gets) give back exactly ``text`` (the file's cell)?"""
    if value is None:
        return text == ""
    if isinstance(value, bool):
        return any(s.get(text) is value for s in SPELLINGS)
    if isinstance(value, int):
        return str(value) == text
    if isinstance(value, float):
        return repr(value) == text
    return value == text


def write_csv(header, rows, terminators, quote_all):
    """The file's text; line i ends with terminators[i] (the last line may have none)."""
    def cell(c, alone):
        # A lone cell of nothing or only spaces and tabs is quoted, or its line would be
        # blank (and skipped).
        needs = quote_all or (alone and not c.strip(" \t")) or any(ch in c for ch in ',"\r\n')
        return '"' + c.replace('"', '""') + '"' if needs else c
    lines = [",".join(cell(c, len(r) == 1) for c in r) for r in [header, *rows]]
    return "".join(line + end for line, end in zip(lines, terminators))


DIGITS = st.text(alphabet="0123456789", min_size=1, max_size=25)
NUMBERS = st.one_of(st.integers(-2**63, 2**63 - 1).map(str),
                    st.floats(allow_nan=False, allow_infinity=False).map(repr))
CELLS = [
    st.text(alphabet="0123456789+-.eE", min_size=1, max_size=22),          # number-ish
    st.integers(-2**70, 2**70).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    NUMBERS,                                                                 # ints among decimals
    st.one_of(st.integers(2**63 - 3, 10**19 - 1),                           # 19 digits, 64 bits
              st.integers(-(10**19 - 1), -2**63 + 2)).map(str),              # and past them
    st.floats().map(str),
    DIGITS.map(lambda d: "0" + d),                                           # leading zeros
    DIGITS.map(lambda d: "+" + d),                                           # phone numbers
    st.tuples(DIGITS, DIGITS).map(lambda p: f"{p[0]}e{p[1][:3]}"),            # 1e5 codes
    st.sampled_from(["true", "false", "True", "False", "TRUE", "FALSE", "nan", "inf", "-inf",
                     "NA", "null", "", " ", "-0", "1.", ".5"]),
    st.text(alphabet='01-.e ,"\'\n\r\tx;é\u2028', max_size=10),              # quotes, delimiters, breaks
]
ONE_SPELLING = st.sampled_from(SPELLINGS).flatmap(lambda s: st.sampled_from([*s, ""]))


@st.composite
def tables(draw):
    width = draw(st.integers(1, 4))
    height = draw(st.integers(1, 12))
    columns = []
    for _ in range(width):
        # Most columns draw from one kind, so that clean typed columns are common.
        kind = draw(st.sampled_from(CELLS + [ONE_SPELLING, st.one_of(CELLS)]))
        columns.append(draw(st.lists(kind, min_size=height, max_size=height)))
    header = [f"c{i}" for i in range(width)]
    rows = [list(r) for r in zip(*columns)]
    # One line ending for the file (Unix, Windows, old Mac), or each line its own (mixed).
    endings = st.sampled_from(["\n", "\r\n", "\r"])
    ending = draw(endings)
    terminators = draw(st.one_of(st.just([ending] * (height + 1)),
                                 st.lists(endings, min_size=height + 1, max_size=height + 1)))
    if draw(st.booleans()):
        terminators[-1] = ""  # no line break after the last row
    text = write_csv(header, rows, terminators, draw(st.booleans()))
    return header, rows, text


def file_bytes(text, bom):
    """The file as saved: UTF-8, with the byte-order mark Excel's "CSV UTF-8" writes, or not."""
    return (b"\xef\xbb\xbf" if bom else b"") + text.encode()


PROPERTY = hypothesis_settings(max_examples=250, deadline=None, database=None, derandomize=True,
                               suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(tables(), st.booleans())
def test_main_receives_each_cell_or_its_lossless_value(table, bom):
    header, rows, text = table
    dataset = parse(file_bytes(text, bom))
    assert dataset.columns == header
    expected = [list(r) for r in zip(*[expected_column(c) for c in zip(*rows)])]
    assert typed_rows(dataset.rows) == typed_rows(expected)


@PROPERTY
@given(tables(), st.booleans())
def test_pandas_reads_the_same_text_that_main_receives(table, bom):
    _header, rows, text = table
    data = file_bytes(text, bom)
    dataset = parse(data)
    cells = oracle_text(data)
    assert cells == rows  # the generator wrote what it meant (and pandas agrees)
    for values, texts in zip(dataset.rows, cells):
        for value, cell in zip(values, texts):
            assert reads_back_as(value, cell), (value, cell)


def typed_rows(rows):
    # repr tells -0.0 from 0.0 and 1 from 1.0 and True; == alone would not.
    return [[(type(v).__name__, repr(v)) for v in row] for row in rows]


# -- files from other programs and systems -----------------------------------------------------

def test_an_excel_csv_with_bom_and_crlf_keeps_every_cell():
    data = (DATASETS / "excel_codes.csv").read_bytes()
    assert data.startswith(b"\xef\xbb\xbf") and b"\r\n" in data
    dataset = parse(data, "excel_codes.csv")
    assert dataset.columns == ["postcode", "phone", "barcode", "code", "amount", "flag", "note"]
    assert dataset.rows == [
        ["08123", "+447911123456", "4006381333931", "1e5", 3, True, "line one\r\nline two"],
        ["75001", "+14155550100", "12345678901234567890", "2E7", 2.5, False, 'say "hi", then go'],
        ["00501", "+33142685300", "0012345678905", "1234", -0.25, True, None],
        ["10115", None, "9780306406157", "0x1A", None, None, " padded "],
    ]
    frame = pd.read_csv(DATASETS / "excel_codes.csv", dtype=str, keep_default_na=False,
                        encoding="utf-8-sig")
    assert frame["note"].tolist()[0] == "line one\r\nline two"
    for values, texts in zip(dataset.rows, frame.values.tolist()):
        assert all(reads_back_as(v, t) for v, t in zip(values, texts))


def test_mixed_line_endings_end_lines_and_quoted_breaks_stay():
    dataset = parse((DATASETS / "mixed_endings.csv").read_bytes(), "mixed_endings.csv")
    assert dataset.rows == [[1, "unix"], [2, "windows"], [3, "old mac"], [4, "quoted\rcr"],
                            [5, "quoted\nlf"], [6, "last"]]


@pytest.mark.parametrize("name, line", [("nul.csv", 3), ("utf16_no_bom.csv", 1)])
def test_nul_bytes_are_refused_with_their_line(name, line):
    with pytest.raises(InvalidDataset) as caught:
        parse((DATASETS / name).read_bytes(), name)
    assert str(caught.value) == (
        f"{name}, line {line}: a NUL character (byte 0x00); CSV text holds none: if the file "
        f"was saved as UTF-16, save it as UTF-8")


@PROPERTY
@given(tables(), st.data())
def test_a_nul_anywhere_is_refused_with_its_line(table, data):
    _header, _rows, text = table
    at = data.draw(st.integers(0, len(text)), label="at")
    text = text[:at] + "\x00" + text[at:]
    line = len(re.split(r"\r\n|\r|\n", text[:at]))  # \r\n, \r or \n ends a line
    with pytest.raises(InvalidDataset) as caught:
        parse(text.encode())
    assert str(caught.value).startswith(f"d.csv, line {line}: a NUL character (byte 0x00)")


def test_a_cell_longer_than_the_csv_modules_default_limit_is_kept():
    document = "word " * 40_000 + "\r\nnext line"  # 200,010 characters, past 131,072
    dataset = parse(b'id,text\r\n1,"' + document.encode() + b'"\r\n2,short\r\n')
    assert dataset.rows == [[1, document], [2, "short"]]


def test_only_a_leading_bom_is_dropped():
    dataset = parse("\ufeffa,b\n\ufeffx,1\n".encode())
    assert (dataset.columns, dataset.rows) == (["a", "b"], [["\ufeffx", 1]])


def test_cells_survive_storage_and_export_exactly(store, settings):
    """Through the submit path: the stored chunk and the JSON export give main's values."""
    data = (DATASETS / "excel_codes.csv").read_bytes()
    pid = projects.submit_project(
        store, settings, accounts.local_admin(store), title="codes", script_name="echo.py",
        script_bytes=(DATASETS / "echo.py").read_bytes(), dataset_name="excel_codes.csv",
        dataset_bytes=data)
    from engine.models import DatasetChunk

    with store.session() as session:
        payload = session.query(DatasetChunk.payload).filter_by(project_id=pid).scalar()
    assert json.loads(payload) == parse(data, "excel_codes.csv").rows


@pytest.mark.slow
def test_a_real_run_gives_main_the_exact_cells(store, cluster_settings):
    """End to end on Ray and the sandbox: echo.py returns each value with its type."""
    data = (DATASETS / "excel_codes.csv").read_bytes()
    pid = projects.submit_project(
        store, cluster_settings, accounts.local_admin(store), title="codes",
        script_name="echo.py", script_bytes=(DATASETS / "echo.py").read_bytes(),
        dataset_name="excel_codes.csv", dataset_bytes=data)
    assert run_to_end(store, cluster_settings, pid).status == "complete"
    out = io.StringIO()
    export_results(store, accounts.local_admin(store), pid, "json", out)
    received = [r["output"] for r in json.loads(out.getvalue())]
    dataset = parse(data, "excel_codes.csv")
    assert received == [{c: [type(v).__name__, v] for c, v in zip(dataset.columns, row)}
                        for row in dataset.rows]
    assert received[0]["postcode"] == ["str", "08123"]
    assert received[0]["note"] == ["str", "line one\r\nline two"]
    assert received[1]["amount"] == ["float", 2.5] and received[0]["amount"] == ["int", 3]
