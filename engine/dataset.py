"""Reading and checking uploaded datasets: CSV, JSON (an array of objects) and JSON Lines.

Every problem raises ``InvalidDataset`` with a message that names the file and the line,
row or byte at fault, before anything is stored.
"""

from __future__ import annotations

import csv
import gc
import io
import json
import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from engine.errors import InvalidDataset

logger = logging.getLogger(__name__)

FORMATS = ("csv", "json", "jsonl")
_EXTENSIONS = {".csv": "csv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl"}


@dataclass
class Dataset:
    """A parsed dataset: column names and rows of plain Python values, in file order."""

    name: str
    format: str
    columns: list[str]
    rows: list[list[Any]]

    def __len__(self) -> int:
        return len(self.rows)

    def row_dict(self, index: int) -> dict[str, Any]:
        return dict(zip(self.columns, self.rows[index]))


def detect_format(name: str, data: bytes) -> str:
    lowered = name.lower()
    for extension, fmt in _EXTENSIONS.items():
        if lowered.endswith(extension):
            return fmt
    head = data.lstrip()[:1]
    if head == b"[":
        return "json"
    if head == b"{":
        return "jsonl"
    return "csv"


def parse_dataset(name: str, data: bytes, *, max_bytes: int, fmt: str | None = None) -> Dataset:
    """Parse an upload, or raise ``InvalidDataset`` saying exactly what is wrong and where."""
    if len(data) > max_bytes:
        raise InvalidDataset(
            f"{name}: the file is {_size(len(data))}, above the upload limit of {_size(max_bytes)}")
    fmt = fmt or detect_format(name, data)
    if fmt not in FORMATS:
        raise InvalidDataset(f"{name}: unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    text = _decode(name, data)
    if not text.strip():
        raise InvalidDataset(f"{name}: the file is empty")
    with _no_cycle_collection():
        if fmt == "csv":
            dataset = _parse_csv(name, text)
        elif fmt == "json":
            dataset = _parse_json(name, text)
        else:
            dataset = _parse_jsonl(name, text)
    logger.info("dataset %s: %d rows, %d columns (%s)", name, len(dataset.rows),
                len(dataset.columns), fmt)
    return dataset


@contextmanager
def _no_cycle_collection() -> Iterator[None]:
    """Pause the cyclic garbage collector while millions of row lists are built.

    Rows hold no cycles, but each new container counts towards a collection, and the older
    generations get scanned again and again: a 1M-row CSV took 2.6 s with it on, 0.8 s off.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _size(n: int) -> str:
    return f"{n / 1024 / 1024:.1f} MB" if n >= 1024 * 1024 else f"{n} bytes"


def _decode(name: str, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InvalidDataset(
            f"{name}: not UTF-8 text: byte 0x{data[exc.start]:02x} at byte offset {exc.start} "
            f"(line {line}) cannot be decoded; save the file as UTF-8") from None


def _check_columns(name: str, columns: list[str]) -> None:
    seen: set[str] = set()
    for position, column in enumerate(columns, start=1):
        if not column.strip():
            raise InvalidDataset(f"{name}: column {position} of the header has no name")
        if column in seen:
            raise InvalidDataset(f"{name}: duplicate column name {column!r} in the header")
        seen.add(column)


def _parse_csv(name: str, text: str) -> Dataset:
    # The csv module reads first: it knows physical line numbers, which pandas does not, and
    # it sees the header before pandas renames duplicates ("a", "a.1").
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
        _check_columns(name, header)
        records = list(filter(None, reader))  # blank lines are skipped, as pandas does
    except csv.Error as exc:
        raise InvalidDataset(f"{name}, line {reader.line_num}: {exc}") from None
    if not records:
        raise InvalidDataset(f"{name}: the file has a header but no rows")
    if max(map(len, records)) > len(header):
        _raise_too_wide(name, text, len(header))
    rows = _typed_as_pandas_would(header, records)
    if rows is None:
        header, rows = _typed_by_pandas(text)
    return Dataset(name, "csv", header, rows)


def _raise_too_wide(name: str, text: str, width: int) -> None:
    """Name the first row with more cells than the header: read again, counting lines."""
    reader = csv.reader(io.StringIO(text, newline=""))
    next(reader)
    count = 0
    for record in reader:
        if record:
            count += 1
            if len(record) > width:
                raise InvalidDataset(
                    f"{name}, line {reader.line_num} (row {count}): {len(record)} cells, "
                    f"but the header has {width} columns")


# The values pandas' C parser might read as a number or a boolean; a cell that is none of
# these is text for certain, and so is its whole column.
_MAYBE_NUMBER = re.compile(r"\s*[-+0-9.,_eE]*\s*")
_MAYBE_WORDS = frozenset({"inf", "infinity", "nan", "true", "false"})
_INT = "-?[0-9]{1,18}"  # within int64: longer integers are left to pandas
_FLOAT = "-?(?:[0-9]+\\.[0-9]*|\\.[0-9]+|[0-9]+)(?:[eE][-+]?[0-9]+)?"
_LONG_INT = re.compile(r"-?[0-9]{19,}")
# Whole columns at once, cells joined by newlines: one regex call instead of one per cell.
_INTS = re.compile(f"{_INT}(?:\n{_INT})*")
_NUMBERS = re.compile(f"(?:{_INT}|{_FLOAT})(?:\n(?:{_INT}|{_FLOAT}))*")
_BOOLS = {"True": True, "TRUE": True, "true": True, "False": False, "FALSE": False, "false": False}


def _typed_as_pandas_would(header: list[str], records: list[list[str]]) -> list[list[Any]] | None:
    """The rows with the types ``pandas.read_csv`` would give them, without importing pandas.

    Importing pandas costs about half a second, most of a small submission's set-up. This
    handles the clear cases: each column all integers, all numbers, all booleans, or text
    (at least one cell that can be nothing else). Anything less clear-cut returns None and
    pandas decides; ``tests/test_dataset.py`` checks both give the same rows.
    """
    width = len(header)
    if any(column != column.strip() for column in header):
        return None  # pandas' handling of padded names is not worth copying
    if min(map(len, records)) < width:  # missing trailing cells are empty
        records = [record + [""] * (width - len(record)) for record in records]
    columns = []
    for cells in zip(*records):
        present = list(filter(None, cells))
        convert = _column_type(present)
        if convert is None:
            return None
        if convert is str:
            if width == 1 and any(map(str.isspace, present)):
                return None  # whether pandas skips a line of spaces is its business
            columns.append([cell or None for cell in cells])
        elif len(present) == len(cells):
            columns.append(list(map(convert, cells)))
        else:
            columns.append([convert(cell) if cell else None for cell in cells])
    return list(map(list, zip(*columns)))


def _column_type(present: list[str]) -> Any:
    """How to convert a column's non-empty cells (str, int, float or a bool lookup), or None."""
    if not present:
        return int  # every cell empty: all None
    joined = "\n".join(present)
    if joined.count("\n") == len(present) - 1:  # no cell holds a newline of its own
        if _INTS.fullmatch(joined):
            return int
        if _NUMBERS.fullmatch(joined) and not any(map(_LONG_INT.fullmatch, present)):
            return float
    only_bools = True
    for cell in present:
        if cell in _BOOLS:
            continue
        if _MAYBE_NUMBER.fullmatch(cell) or cell.strip().lstrip("+-").lower() in _MAYBE_WORDS:
            only_bools = False  # a number, or something pandas might read as one
        else:
            return str  # one certain text cell makes the whole column text
    # Booleans only; otherwise a mixture, or numbers pandas might read differently.
    return _BOOLS.__getitem__ if only_bools else None


def _typed_by_pandas(text: str) -> tuple[list[str], list[list[Any]]]:
    import pandas as pd  # deferred: pandas takes half a second to import

    frame = pd.read_csv(io.StringIO(text), keep_default_na=False, na_values=[""],
                        dtype_backend="numpy_nullable", skip_blank_lines=True)
    columns = [str(c) for c in frame.columns]
    # astype(object) turns numpy/pandas scalars into int, float, bool and str; where() makes
    # missing cells None. Column-wise conversion is far faster than per-row.
    values = [frame[c].astype(object).where(frame[c].notna(), None).tolist()
              for c in frame.columns]
    return columns, [list(row) for row in zip(*values)]


def _json_error(name: str, exc: json.JSONDecodeError, line_offset: int = 0) -> InvalidDataset:
    return InvalidDataset(
        f"{name}, line {exc.lineno + line_offset}, column {exc.colno}: invalid JSON: {exc.msg}")


def _rows_from_objects(name: str, objects: list[Any], where: list[str]) -> Dataset:
    columns: dict[str, None] = {}
    for obj, place in zip(objects, where):
        if not isinstance(obj, dict):
            raise InvalidDataset(
                f"{name}, {place}: expected an object ({{...}}), found {_json_type(obj)}")
        for key in obj:
            columns.setdefault(key, None)
    names = list(columns)
    rows = [[obj.get(c) for c in names] for obj in objects]
    return Dataset(name, "", names, rows)


def _json_type(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _parse_json(name: str, text: str) -> Dataset:
    try:
        document = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise _json_error(name, exc) from None
    except ValueError as exc:
        raise InvalidDataset(f"{name}: invalid JSON: {exc}") from None
    if not isinstance(document, list):
        raise InvalidDataset(
            f"{name}: expected a JSON array of objects ([{{...}}, ...]), found {_json_type(document)}")
    if not document:
        raise InvalidDataset(f"{name}: the array is empty: there are no rows")
    dataset = _rows_from_objects(name, document, [f"item {i}" for i in range(len(document))])
    dataset.format = "json"
    return dataset


def _parse_jsonl(name: str, text: str) -> Dataset:
    objects, where = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            objects.append(json.loads(line, parse_constant=_reject_constant))
        except json.JSONDecodeError as exc:
            raise _json_error(name, exc, line_offset=number - 1) from None
        except ValueError as exc:
            raise InvalidDataset(f"{name}, line {number}: invalid JSON: {exc}") from None
        where.append(f"line {number}")
    if not objects:
        raise InvalidDataset(f"{name}: the file has no rows")
    dataset = _rows_from_objects(name, objects, where)
    dataset.format = "jsonl"
    return dataset


def _reject_constant(token: str) -> float:
    # NaN and Infinity are not JSON; accepting them would make exports unreadable elsewhere.
    raise ValueError(f"{token} is not valid JSON")

