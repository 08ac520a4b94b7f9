"""Dataset parsing: formats, value types, and a specific message for each bad input."""

import json

import pytest
from hypothesis import given, settings as hypothesis_settings, strategies as st

from support import SHARED_DATA
from engine.dataset import parse_dataset
from engine.errors import InvalidDataset

LIMIT = 10 * 1024 * 1024


def parse(name, data, **kw):
    return parse_dataset(name, data, max_bytes=kw.pop("max_bytes", LIMIT), **kw)


def test_shakespeare_passages_load():
    dataset = parse("shakespeare_passages.csv", (SHARED_DATA / "shakespeare_passages.csv").read_bytes())
    assert len(dataset.rows) == 2231
    assert dataset.columns == ["document_id", "text"]
    assert dataset.rows[0][0] == "doc_0"
    assert "\n" in dataset.rows[0][1]  # quoted multi-line cells survive


def test_csv_values_are_plain_python_types_and_empty_cells_none():
    data = b'i,f,b,s\n1,2.5,true,"two\nlines"\n,3.0,false,x\n3,,true,\n'
    dataset = parse("d.csv", data)
    assert dataset.rows == [[1, 2.5, True, "two\nlines"], [None, 3.0, False, "x"], [3, None, True, None]]
    for row in dataset.rows:
        for value in row:
            assert type(value) in (int, float, bool, str, type(None))


def test_blank_lines_before_the_header_and_between_rows_are_skipped():
    dataset = parse("d.csv", b"\n\r\n \t\na,b\n1,x\n\n  \n2,y\n\t")
    assert (dataset.columns, dataset.rows) == (["a", "b"], [[1, "x"], [2, "y"]])
    # Only spaces and tabs make a line blank (as pandas has it); a quoted "  " is a cell.
    dataset = parse("d.csv", b'c\n  \n"  "\n\xc2\xa0\n"x\n  \ny"\n')
    assert dataset.rows == [["  "], ["\xa0"], ["x\n  \ny"]]


def test_rows_are_counted_without_blank_lines():
    with pytest.raises(InvalidDataset, match=r"d.csv, line 5 \(row 2\): 3 cells"):
        parse("d.csv", b"a,b\n1,2\n   \n\n3,4,5\n")


def test_csv_keeps_na_like_text_as_text():
    dataset = parse("d.csv", b"s\nNA\nnull\n")
    assert [r[0] for r in dataset.rows] == ["NA", "null"]


def test_json_array_and_jsonl():
    rows = [{"a": 1, "b": "x"}, {"a": 2, "c": [1, 2]}]
    dataset = parse("d.json", json.dumps(rows).encode())
    assert dataset.columns == ["a", "b", "c"]
    assert dataset.rows == [[1, "x", None], [2, None, [1, 2]]]
    lines = "\n".join(json.dumps(r) for r in rows).encode()
    assert parse("d.jsonl", lines).rows == dataset.rows


@pytest.mark.parametrize("name, data, expected", [
    ("empty.csv", b"", "empty.csv: the file is empty"),
    ("blank.csv", b"  \n\n", "blank.csv: the file is empty"),
    ("header.csv", b"a,b\n", "header.csv: the file has a header but no rows"),
    ("wide.csv", b'a,b\n1,2\n"x\ny",3\n4,5,6\n', "wide.csv, line 5 (row 3): 3 cells, but the header has 2 columns"),
    ("dup.csv", b"a,b,a\n1,2,3\n", "dup.csv: duplicate column name 'a' in the header"),
    ("latin.csv", b"a\nok\ncaf\xe9\n", "latin.csv: not UTF-8 text: byte 0xe9 at byte offset 8 (line 3)"),
    ("bad.json", b'[{"a": 1},\n {"a": 2,}]', "bad.json, line 2, column 10: invalid JSON"),
    ("bad.jsonl", b'{"a": 1}\n{"a": }\n', "bad.jsonl, line 2, column 7: invalid JSON"),
    ("items.json", b'[{"a": 1}, [1, 2]]', "items.json, line 1, column 12 (item 1): expected an object ({...}), found an array"),
    ("lines.jsonl", b'{"a": 1}\n"text"\n', "lines.jsonl, line 2: expected an object ({...}), found a string"),
    ("top.json", b'{"a": 1, "b": 2}', "top.json, line 1, column 1: expected a JSON array of objects ([{...}, ...]), found an object"),
    ("none.json", b"[]", "none.json: the array is empty"),
    ("nan.json", b'[{"a": NaN}]', "nan.json, line 1, column 8: NaN is not valid JSON"),
    ("nul.csv", b"a,b\n1,2\n3,x\x004\n", "nul.csv, line 3: a NUL character (byte 0x00); CSV text holds none"),
    ("open.csv", b'a,b\n1,2\n"3\n4,5\n6,7\n', "open.csv, line 3: a quoted cell is never closed: the file ends inside it"),
    ("after.csv", b'a,b\r\n1,"2"3\r\n', "after.csv, line 2: text after a quoted cell's closing quote; expected a comma"),
    ("noname.csv", b"a,,c\n1,2,3\n", "noname.csv: column 2 of the header has no name"),
])
def test_bad_datasets_name_the_problem(name, data, expected):
    with pytest.raises(InvalidDataset) as caught:
        parse(name, data)
    assert str(caught.value).startswith(expected), str(caught.value)


def test_size_limit():
    with pytest.raises(InvalidDataset, match=r"big.csv: the file is 2000 bytes, above the upload limit of 1000 bytes"):
        parse("big.csv", b"a\n" + b"1\n" * 999, max_bytes=1000)


# Pieces of JSON and CSV, valid and not, so that generated files are often nearly right.
TOKENS = st.sampled_from(['[', ']', '{', '}', '"a"', '"b"', ':', ',', '1', '-', '.', '0', 'e5',
                          '1e400', 'NaN', '-Infinity', 'true', 'null', '"\\ud800"',
                          '"\\ud83d\\ude00"', '"x\\ny"', '//', ' ', '\n', '\r\n', '\r', '"',
                          '\x00', '\ufeff', 'a,b', '08123'])
# Values json.loads accepts, some of which a row cannot hold (NaN, infinity, a lone surrogate).
VALUES = st.sampled_from(['1', '2.5', '-0', '1e308', '"x"', 'true', 'null', '[1, {"k": 2}]',
                          'NaN', '-Infinity', 'Infinity', '1e400', '-1e999', '"\\ud800"',
                          '"a\\udfff"', '"\\udc00\\ud800"', '"\\\\ud800"', '"\\ud83d\\ude00"',
                          '7' * 4301])
OBJECTS = st.dictionaries(st.sampled_from(["a", "b", "c"]), VALUES, max_size=3).map(
    lambda o: "{" + ", ".join(f'"{k}": {v}' for k, v in o.items()) + "}")
DOCUMENTS = st.one_of(st.lists(OBJECTS, max_size=4).map(lambda o: "[" + ", ".join(o) + "]"),
                      st.lists(OBJECTS, max_size=4).map("\n".join))
INPUTS = st.one_of(st.lists(TOKENS, max_size=30).map(lambda t: "".join(t).encode()),
                   DOCUMENTS.map(str.encode), st.binary(max_size=40),
                   st.text(max_size=40).map(str.encode))


@hypothesis_settings(max_examples=400, deadline=None, database=None, derandomize=True)
@given(st.sampled_from(["d.csv", "d.json", "d.jsonl"]), INPUTS)
def test_any_file_gives_rows_that_can_be_stored_or_a_refusal_naming_it(name, data):
    """No input raises anything but InvalidDataset, and what is accepted is stored as JSON
    (no NaN or infinity, no lone surrogate) as submit_project stores it."""
    try:
        dataset = parse(name, data)
    except InvalidDataset as exc:
        assert str(exc).startswith((f"{name}: ", f"{name}, line ")), str(exc)
        return
    assert dataset.rows and all(len(row) == len(dataset.columns) for row in dataset.rows)
    json.dumps(dataset.rows, allow_nan=False, ensure_ascii=False).encode()


@hypothesis_settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(st.lists(OBJECTS, min_size=1, max_size=4), st.booleans())
def test_a_json_file_is_accepted_exactly_when_its_rows_can_be_stored(objects, lines):
    """The oracle is Python's json: the file is accepted when what json.loads reads can be
    written back as strict JSON in UTF-8 (as submit_project stores rows), else refused."""
    name, text = ("d.jsonl", "\n".join(objects)) if lines else ("d.json", f"[{', '.join(objects)}]")
    try:
        json.dumps([json.loads(o) for o in objects], allow_nan=False, ensure_ascii=False).encode()
        storable = True
    except ValueError:  # NaN or infinity; a lone surrogate (UnicodeEncodeError); 4301 digits
        storable = False
    try:
        parse(name, text.encode())
        accepted = True
    except InvalidDataset as exc:
        assert str(exc).startswith(f"{name}, line "), str(exc)
        accepted = False
    assert accepted == storable, text
