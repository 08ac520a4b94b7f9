"""Dataset parsing: formats, value types, and a specific message for each bad input."""

import json

import pytest

from conftest import SHARED_DATA
from engine.dataset import parse_dataset
from engine.errors import InvalidDataset

LIMIT = 10 * 1024 * 1024


def parse(name, data, **kw):
    return parse_dataset(name, data, max_bytes=kw.pop("max_bytes", LIMIT), **kw)


def test_shakespeare_passages_load():
    dataset = parse("shakespeare_passages.csv", (SHARED_DATA / "shakespeare_passages.csv").read_bytes())
    assert len(dataset.rows) == 2231
    assert dataset.columns == ["document_id", "text"]
    assert dataset.row_dict(0)["document_id"] == "doc_0"
    assert "\n" in dataset.row_dict(0)["text"]  # quoted multi-line cells survive


def test_csv_values_are_plain_python_types_and_empty_cells_none():
    data = b'i,f,b,s\n1,2.5,true,"two\nlines"\n,3.0,false,x\n3,,true,\n'
    dataset = parse("d.csv", data)
    assert dataset.rows == [[1, 2.5, True, "two\nlines"], [None, 3.0, False, "x"], [3, None, True, None]]
    for row in dataset.rows:
        for value in row:
            assert type(value) in (int, float, bool, str, type(None))


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
    ("items.json", b'[{"a": 1}, [1, 2]]', "items.json, item 1: expected an object ({...}), found an array"),
    ("lines.jsonl", b'{"a": 1}\n"text"\n', "lines.jsonl, line 2: expected an object ({...}), found a string"),
    ("top.json", b'{"a": 1, "b": 2}', "top.json: expected a JSON array of objects"),
    ("none.json", b"[]", "none.json: the array is empty"),
    ("nan.json", b'[{"a": NaN}]', "nan.json: invalid JSON: NaN is not valid JSON"),
])
def test_bad_datasets_name_the_problem(name, data, expected):
    with pytest.raises(InvalidDataset) as caught:
        parse(name, data)
    assert str(caught.value).startswith(expected), str(caught.value)


def test_size_limit():
    with pytest.raises(InvalidDataset, match=r"big.csv: the file is 2000 bytes, above the upload limit of 1000 bytes"):
        parse("big.csv", b"a\n" + b"1\n" * 999, max_bytes=1000)


# -- CSV typing without pandas agrees with pandas ---------------------------------------------

def _both_ways(text: str):
    """(rows typed without pandas or None, rows typed by pandas), from the same records."""
    import csv
    import io

    from engine.dataset import _typed_as_pandas_would, _typed_by_pandas

    records = [r for r in csv.reader(io.StringIO(text, newline=""))]
    header, records = records[0], [r for r in records[1:] if r]
    fast = _typed_as_pandas_would(header, records)
    columns, slow = _typed_by_pandas(text)
    assert columns == header
    return fast, slow


def _typed(rows):
    return [[(type(v), v) for v in row] for row in rows]


CELLS = ["0", "7", "-12", "007", "123456789012345678", "1234567890123456789", "+5",
         "2.5", "-0.25", "1.", ".5", "1e3", "2.5E-3", "3.14159265358979", "0.1000000000000000055",
         "true", "False", "TRUE", "yes", "inf", "-Infinity", "nan", "NaN", "NA", "null",
         "x", "hello world", " 1", "1 ", " ", "1,000", "1_000", "0x1A", "-", ".", "e",
         "a\nb", 'say "hi"', "é", "٣", "1/2", "12:30", "2024-01-01", ""]


@pytest.mark.parametrize("seed", range(300))
def test_csv_types_without_pandas_are_the_types_pandas_gives(seed):
    import csv
    import io
    import random

    rng = random.Random(seed)
    columns = rng.randint(1, 4)
    # Each column draws from a few kinds of cell, so that clean int/float/bool/text columns
    # occur often, and mixtures of every sort sometimes.
    pools = [rng.sample(CELLS, rng.randint(1, 3)) if rng.random() < 0.3 else
             rng.choice([["0", "7", "-12", "007", ""], ["2.5", "1e3", "7", ".5"],
                         ["true", "False", ""], ["x", "hello world", "7", ""]])
             for _ in range(columns)]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([f"c{i}" for i in range(columns)])
    for _ in range(rng.randint(1, 12)):
        row = [rng.choice(pool) for pool in pools]
        if columns > 1 and rng.random() < 0.1:
            row = row[:rng.randint(1, columns - 1)]  # a short row
        writer.writerow(row)
    fast, slow = _both_ways(out.getvalue())
    if fast is not None:
        assert _typed(fast) == _typed(slow), out.getvalue()


@pytest.mark.parametrize("text", [
    "i\n1\n2\n", "i,f\n1,2.5\n,3\n", "b\ntrue\nFalse\n\n", "s\nx\n1\n", "e\n\n\n1\n",
    "a,b\n1\n2,\n", "n\n123456789012345678\n", "f\n0.1000000000000000055511151231257827\n",
    "m\ntrue\n1\n", "w\n 1\n", 'q\n"a ""quoted"" word"\n', "t\n\"two\nlines\"\n",
])
def test_csv_typing_edge_cases_agree_with_pandas(text):
    fast, slow = _both_ways(text)
    if fast is not None:
        assert _typed(fast) == _typed(slow)


def test_common_csvs_are_typed_without_pandas():
    # The fast path must actually be taken for ordinary files, or it saves nothing.
    fast, _ = _both_ways((SHARED_DATA / "shakespeare_passages.csv").read_text())
    assert fast is not None
    fast, _ = _both_ways("i,f,b,s\n1,2.5,true,x\n,3,false,\n")
    assert _typed(fast) == [[(int, 1), (float, 2.5), (bool, True), (str, "x")],
                            [(type(None), None), (float, 3.0), (bool, False), (type(None), None)]]
