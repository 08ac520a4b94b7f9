"""Every malformed JSON or JSON Lines file is refused: exit 2, one line naming the file and
the position, and nothing stored. The corpus is tests/fixtures/datasets/malformed/."""

import json
import subprocess

import pytest
from sqlalchemy import func, select

from support import FIXTURES, engine_env, python
from engine.dataset import parse_dataset
from engine.errors import InvalidDataset
from engine.json_rows import NESTING_LIMIT
from engine.models import DatasetChunk, Project, Task
from engine.store import Store

MALFORMED = FIXTURES / "datasets" / "malformed"
NOT_JSON = "is not valid JSON; expected a number, or null for a missing value"
SURROGATE = ("is half of a UTF-16 surrogate pair, not a character; expected a whole pair or "
             "another escape (the text cannot be stored as UTF-8)")
ENDS = "(the text ends before every [ and { is closed)"
LINE_ENDS = "(the line ends before its object does: each line must hold one whole object)"
TRAILING = "(a trailing comma before the closing bracket: JSON allows none)"
PROPERTY = "invalid JSON: Expecting property name enclosed in double quotes"

CORPUS = {
    "unclosed_array.json": f"line 3, column 1: invalid JSON: Expecting ',' delimiter {ENDS}",
    "unclosed_object.json": f"line 3, column 1: invalid JSON: Expecting ',' delimiter {ENDS}",
    "truncated.json": f"line 1, column 29: invalid JSON: Expecting ',' delimiter {ENDS}",
    "unclosed_string.json": "line 2, column 15: invalid JSON: a string reaches the end of its "
                            "line without its closing \" (a line break inside a string is written \\n)",
    "trailing_comma_array.json": f"line 4, column 1: invalid JSON: Expecting value {TRAILING}",
    "trailing_comma_object.json": f"line 1, column 18: {PROPERTY} {TRAILING}",
    "line_comment.json": "line 1, column 1: invalid JSON: Expecting value (a comment: JSON has none)",
    "block_comment.json": "line 1, column 10: invalid JSON: Expecting ',' delimiter "
                          "(a comment: JSON has none)",
    "single_quotes.json": f"line 1, column 3: {PROPERTY} (JSON strings use double quotes)",
    "unquoted_key.json": f"line 1, column 3: {PROPERTY}",
    "bare_word.json": "line 1, column 8: invalid JSON: Expecting value (a word outside double "
                      "quotes: the only bare words are true, false and null)",
    "leading_zero.json": "line 1, column 11: invalid JSON: Expecting ',' delimiter (a number "
                         "cannot start with 0: write a code such as 08123 as a string)",
    "number_dot.json": "line 1, column 9: invalid JSON: Expecting ',' delimiter "
                       "(a number needs digits after its decimal point)",
    "number_minus.json": "line 2, column 8: invalid JSON: Expecting value "
                         "(a minus sign must be followed by digits)",
    "nan.json": f"line 2, column 8: NaN {NOT_JSON}",
    "infinity.json": f"line 1, column 8: -Infinity {NOT_JSON}",
    "overflow.json": "line 2, column 8: the number 2e400 is too large: it would read as "
                     "infinity, which is not valid JSON",
    "lone_surrogate.json": f"line 2, column 14: \\ud83d {SURROGATE}",
    "lone_low_surrogate.json": f"line 1, column 4: \\udc00 {SURROGATE}",
    "control_character.json": "line 1, column 12: invalid JSON: Invalid control character "
                              "inside a string; expected it written as an escape such as \\t or \\n",
    "json_lines_named_json.json": "line 2, column 1: invalid JSON: Extra data (more than one "
                                  "value: for one object per line, name the file .jsonl)",
    "unclosed_line.jsonl": f"line 2, column 8: invalid JSON: Expecting ',' delimiter {LINE_ENDS}",
    "pretty_printed.jsonl": f"line 1, column 2: {PROPERTY} {LINE_ENDS}",
    "trailing_comma.jsonl": f"line 2, column 9: {PROPERTY} {TRAILING}",
    "comment.jsonl": "line 2, column 1: invalid JSON: Expecting value (a comment: JSON has none)",
    "nan.jsonl": f"line 2, column 7: NaN {NOT_JSON}",
    "number_dot.jsonl": "line 1, column 8: invalid JSON: Expecting ',' delimiter "
                        "(a number needs digits after its decimal point)",
    "lone_surrogate.jsonl": f"line 2, column 8: \\udfff {SURROGATE}",
    "array_line.jsonl": "line 2: expected an object ({...}), found an array",
}

TOO_DEEP = (f"arrays and objects are nested more than {NESTING_LIMIT} deep; expected at most "
            f"{NESTING_LIMIT} levels, counting the file's own")


def nested(depth: int) -> bytes:
    """One row whose value nests so that the deepest bracket is at ``depth``, file included."""
    inner = depth - 2
    return b'[{"a": ' + b"[" * inner + b"]" * inner + b"}]"


# Files made here: too big or too regular to keep in the corpus.
GENERATED = {
    "brackets.json": (b"[" * 100_000, f"line 1, column {NESTING_LIMIT + 1}: {TOO_DEEP}"),
    "brackets.jsonl": (b'{"a": 1}\n{"a": ' + b"[" * 100_000 + b"\n",
                       f"line 2, column {NESTING_LIMIT + 6}: {TOO_DEEP}"),
    "deep_row.json": (nested(NESTING_LIMIT + 1), f"line 1, column {NESTING_LIMIT + 6}: {TOO_DEEP}"),
    "deep_objects.jsonl": (b'{"a": ' * 500 + b"1" + b"}" * 500 + b"\n",
                           f"line 1, column {6 * NESTING_LIMIT + 1}: {TOO_DEEP}"),
    "one_line.jsonl": (b'{"a": 1', f"line 1, column 8: invalid JSON: Expecting ',' delimiter {LINE_ENDS}"),
    "long_integer.json": (b'[{"a": ' + b"7" * 5000 + b"}]",
                          "line 1, column 8: a number of 5000 digits; expected at most 4300, "
                          "the most Python reads"),
    "item_not_object.json": (b'[\n  {"a": "[,]"},\n  {"b": [1, {"c": ","}]},\n  "x"\n]',
                             "line 4, column 3 (item 2): expected an object ({...}), found a string"),
    "not_an_array.json": (b'\n  {"a": 1}', "line 2, column 3: expected a JSON array of objects "
                                          "([{...}, ...]), found an object"),
}


def corpus():
    cases = [(name, (MALFORMED / name).read_bytes(), f"{name}, {where}")
             for name, where in CORPUS.items()]
    cases += [(name, data, f"{name}, {where}") for name, (data, where) in GENERATED.items()]
    return cases


CASES = corpus()


def test_the_corpus_is_complete():
    assert sorted(p.name for p in MALFORMED.iterdir()) == sorted(CORPUS)


@pytest.mark.parametrize("name, data, message", CASES, ids=[c[0] for c in CASES])
def test_each_malformed_file_is_refused_with_its_position(name, data, message):
    with pytest.raises(InvalidDataset) as caught:
        parse_dataset(name, data, max_bytes=1 << 20)
    assert str(caught.value) == message


def test_nesting_up_to_the_limit_is_accepted():
    dataset = parse_dataset("d.json", nested(NESTING_LIMIT), max_bytes=1 << 20)
    value = dataset.rows[0][0]
    for _ in range(NESTING_LIMIT - 3):
        value = value[0]
    assert value == []


def test_valid_json_that_looks_suspicious_is_accepted():
    data = ('[{"emoji": "\\ud83d\\ude00", "escaped": "\\\\ud800", "big": 1e300, '
            '"line": "a\u2028b", "nul": "\\u0000"}]').encode()
    assert parse_dataset("d.json", data, max_bytes=1 << 20).rows == [
        ["\U0001F600", "\\ud800", 1e300, "a\u2028b", "\x00"]]
    lines = '{"a": "x\u2028y"}\r\n{"a": "\u2029"}\n'.encode()  # only \n ends a JSON line
    assert parse_dataset("d.jsonl", lines, max_bytes=1 << 20).rows == [["x\u2028y"], ["\u2029"]]


def submit(settings, path):
    return subprocess.run([python(), "-m", "engine", "submit", FIXTURES / "square.py", path],
                          env=engine_env(settings), capture_output=True, text=True, timeout=120)


def stored(settings) -> tuple[int, int, int]:
    store = Store(settings)
    with store.session() as session:
        return tuple(session.scalar(select(func.count()).select_from(table))
                     for table in (Project, DatasetChunk, Task))


def check_refused(settings, tmp_path, name, data, message):
    path = tmp_path / name
    path.write_bytes(data)
    done = submit(settings, path)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.splitlines() == [f"error: {message}"], done.stderr
    assert stored(settings) == (0, 0, 0)


@pytest.mark.parametrize("name", ["brackets.json", "brackets.jsonl"])
def test_100000_brackets_exit_2_without_a_traceback(settings, tmp_path, name):
    data, where = GENERATED[name]
    check_refused(settings, tmp_path, name, data, f"{name}, {where}")


# One process runs ``python -m engine submit`` for every file: engine/__main__.py itself, by
# runpy, as ``-m`` runs it, its exit code taken from SystemExit. A process per file would
# cost a second or more of CPU each on the 2-core machine for the same code path. Logging
# writes to whichever stderr is current, so that a warning or a logged traceback shows in
# its own file's report (the CLI's basicConfig would keep the first file's stream).
SWEEP = """
import contextlib, io, json, logging, runpy, sys

class CurrentStderr:
    def write(self, text):
        sys.stderr.write(text)

    def flush(self):
        sys.stderr.flush()

logging.basicConfig(stream=CurrentStderr(), level=logging.WARNING)
script, paths = sys.argv[1], sys.argv[2:]
report = []
for path in paths:
    sys.argv = ["engine", "submit", script, path]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()) as out:
        try:
            runpy.run_module("engine", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as stop:
            code = stop.code
    report.append([code, out.getvalue(), err.getvalue()])
print(json.dumps(report))
"""

# CSV files refused with their line, through the CLI as well.
CSV_FIXTURES = FIXTURES / "datasets"
CSV_CASES = [
    ("nul.csv", (CSV_FIXTURES / "nul.csv").read_bytes(),
     "nul.csv, line 3: a NUL character (byte 0x00); CSV text holds none: if the file was "
     "saved as UTF-16, save it as UTF-8"),
    ("utf16_no_bom.csv", (CSV_FIXTURES / "utf16_no_bom.csv").read_bytes(),
     "utf16_no_bom.csv, line 1: a NUL character (byte 0x00); CSV text holds none: if the "
     "file was saved as UTF-16, save it as UTF-8"),
    ("unclosed.csv", b'a,b\r\n1,"x\r\n2,y\r\n',
     "unclosed.csv, line 2: a quoted cell is never closed: the file ends inside it; expected "
     "a closing \" (write a quote inside a quoted cell as \"\")"),
]


def test_the_cli_refuses_every_file_with_exit_2_and_stores_nothing(settings, tmp_path):
    cases = CASES + CSV_CASES
    paths = []
    for name, data, _message in cases:
        paths.append(tmp_path / name)
        paths[-1].write_bytes(data)
    done = subprocess.run([python(), "-c", SWEEP, FIXTURES / "square.py", *paths],
                          env=engine_env(settings), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr  # no file raised past the CLI
    report = json.loads(done.stdout)
    assert report == [[2, "", f"error: {message}\n"] for _name, _data, message in cases]
    assert stored(settings) == (0, 0, 0)
