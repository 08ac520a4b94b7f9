"""Reading and checking uploaded datasets: CSV, JSON (an array of objects) and JSON Lines.

Every problem raises ``InvalidDataset`` with a message that names the file and the line,
row or column at fault, before anything is stored. docs/datasets.md is the user's side
of this module: the typing rule, what is refused, and why.

CSV cells reach ``main`` exactly as the file has them. A column is typed only when the
typed values give back exactly its text (engine/cells.py, the typing rule): a postcode
``08123`` stays the string ``"08123"``. JSON and JSON Lines are read, strictly, by
engine/json_rows.py.
"""

from __future__ import annotations

import csv
import gc
import io
import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from engine.cells import typed_column
from engine.errors import InvalidDataset
from engine.json_rows import rows_from_json, rows_from_json_lines

logger = logging.getLogger(__name__)

FORMATS = ("csv", "json", "jsonl")
_EXTENSIONS = {".csv": "csv", ".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl"}

# A cell may be as long as the upload limit allows: the csv module's default (131,072
# characters a cell) refused a long document as "field larger than field limit". The
# limit is the csv module's, for the whole process; raising it loosens nothing else.
csv.field_size_limit(2**31 - 1)


@dataclass
class Dataset:
    """A parsed dataset: column names and rows of plain Python values, in file order."""

    name: str
    format: str
    columns: list[str]
    rows: list[list[Any]]

    def __len__(self) -> int:
        return len(self.rows)


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
        else:
            read = rows_from_json if fmt == "json" else rows_from_json_lines
            dataset = Dataset(name, fmt, *read(name, text))
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
        return data.decode("utf-8-sig")  # a leading byte-order mark is not part of the text
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


# -- CSV ---------------------------------------------------------------------------------

def _parse_csv(name: str, text: str) -> Dataset:
    if "\x00" in text:
        # Almost always a UTF-16 file read as UTF-8, which would give every cell a NUL.
        raise InvalidDataset(
            f"{name}, line {_csv_line(text, text.index(chr(0)))}: a NUL character (byte 0x00); "
            f"CSV text holds none: if the file was saved as UTF-16, save it as UTF-8")
    # strict: a quote that does not close its cell is refused, not guessed at.
    reader, records = _records(text, strict=True)
    try:
        header = next(records, None)
        if header is None:  # not expected: the file held more than whitespace
            raise InvalidDataset(f"{name}: the file has no header line")
        _check_columns(name, header)
        records = list(records)
    except csv.Error as exc:
        raise _csv_error(name, text, reader.line_num, exc) from None
    if not records:
        raise InvalidDataset(f"{name}: the file has a header but no rows")
    width = len(header)
    if max(map(len, records)) > width:
        _raise_too_wide(name, text, width)
    if min(map(len, records)) < width:  # missing trailing cells are empty
        records = [record + [""] * (width - len(record)) for record in records]
    columns = [typed_column(cells) for cells in zip(*records)]
    return Dataset(name, "csv", header, list(map(list, zip(*columns))))


def _records(text: str, strict: bool = False) -> tuple[Any, Iterator[list[str]]]:
    """A reader, and its records without blank lines: before the header too, and lines of
    only spaces and tabs (as pandas skips them), which the reader gives as one cell."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=strict)
    return reader, (_unblank(reader, text) if _SPACES_LINE.search(text) else filter(None, reader))


_SPACES_LINE = re.compile(r"(?:\A|[\r\n])[ \t]+(?:[\r\n]|\Z)")


def _unblank(reader: Iterator[list[str]], text: str) -> Iterator[list[str]]:
    lines = re.split(r"\r\n|\r|\n", text)  # as the reader counts them (line_num)
    for record in reader:
        # A quoted "  " is a cell: its line holds the quotes, so it is not blank.
        if record and not (len(record) == 1 and not lines[reader.line_num - 1].strip(" \t")):
            yield record


def _csv_line(text: str, offset: int) -> int:
    """The line of ``offset`` as the csv module counts lines: \\n, \\r\\n or a lone \\r."""
    before = text[:offset]
    return before.count("\n") + before.count("\r") - before.count("\r\n") + 1


def _csv_error(name: str, text: str, line: int, exc: csv.Error) -> InvalidDataset:
    message = str(exc)
    if message == "unexpected end of data":
        # The reader stops at the end of the file; the cell that never closed began earlier.
        reader = csv.reader(io.StringIO(text, newline=""))
        start = 1
        for _record in reader:
            if reader.line_num == line:
                break
            start = reader.line_num + 1
        return InvalidDataset(
            f"{name}, line {start}: a quoted cell is never closed: the file ends inside it; "
            f"expected a closing \" (write a quote inside a quoted cell as \"\")")
    if message.startswith("',' expected after '\"'"):
        return InvalidDataset(
            f"{name}, line {line}: text after a quoted cell's closing quote; expected a comma "
            f"or the end of the line (write a quote inside a quoted cell as \"\")")
    return InvalidDataset(f"{name}, line {line}: {message}")


def _raise_too_wide(name: str, text: str, width: int) -> None:
    """Name the first row with more cells than the header: read again, counting lines."""
    reader, records = _records(text)
    next(records)
    for count, record in enumerate(records, start=1):
        if len(record) > width:
            raise InvalidDataset(
                f"{name}, line {reader.line_num} (row {count}): {len(record)} cells, "
                f"but the header has {width} columns")
