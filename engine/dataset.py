"""Reading and checking uploaded datasets: CSV, JSON (an array of objects) and JSON Lines.

Every problem raises ``InvalidDataset`` with a message that names the file and the line,
row or column at fault, before anything is stored. docs/datasets.md is the user's side
of this module: the typing rule, what is refused, and why.

CSV cells reach ``main`` exactly as the file has them. A column is typed only when the
typed values give back exactly its text (``_typed_column``): a postcode ``08123`` stays
the string ``"08123"``.
"""

from __future__ import annotations

import csv
import gc
import io
import itertools
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

# Arrays and objects inside one another, counting the file's own array. Python's parser
# gives up near 1,000 with a RecursionError, and storing, pickling and exporting a row
# recurse again: a definite limit far below that keeps every later step safe.
NESTING_LIMIT = 100


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
    columns = [_typed_column(cells) for cells in zip(*records)]
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


# The typing rule, written once: a column's non-empty cells become numbers when each one is
# exactly how Python writes that number back (str() of an int within 64 bits, repr() of a
# finite float), or booleans when all are true/false in one spelling; otherwise the whole
# column is text. An empty cell is None. The regexes only pick the candidates quickly;
# the round trip itself decides.
_INT = "(?:0|-?[1-9][0-9]{0,18})"  # no "-0", no leading zeros, no "+"
_FLOAT = "-?(?:0|[1-9][0-9]*)(?:\\.[0-9]+)?(?:e[-+][0-9]+)?"  # the shapes repr() writes
_INT_CELL = re.compile(_INT)
# Whole columns at once, cells joined by newlines: one regex call instead of one per cell.
_INTS = re.compile(f"{_INT}(?:\n{_INT})*")
_NUMBERS = re.compile(f"{_FLOAT}(?:\n{_FLOAT})*")
_INT64 = range(-2**63, 2**63)
_BOOL_SPELLINGS = ({"true": True, "false": False}, {"True": True, "False": False},
                   {"TRUE": True, "FALSE": False})


def _typed_column(cells: tuple[str, ...]) -> list[Any]:
    """One column's values: all numbers, all booleans, or all text; empty cells are None."""
    present = list(filter(None, cells))
    if not present:
        return [None] * len(cells)
    values = _lossless_numbers(present)
    if values is None:
        values = _lossless_bools(present)
    if values is None:
        return [cell or None for cell in cells]
    if len(present) == len(cells):
        return values
    typed = iter(values)
    return [next(typed) if cell else None for cell in cells]


def _lossless_numbers(present: list[str]) -> list[int | float] | None:
    """int for an integer cell, float for a decimal one, if each reads back as its cell."""
    joined = "\n".join(present)
    if joined.count("\n") != len(present) - 1:
        return None  # a cell holds a line break: text
    if _INTS.fullmatch(joined):
        values = list(map(int, present))
        if max(map(len, present)) >= 19 and not all(v in _INT64 for v in values):
            return None  # an identifier beyond 64 bits: its column stays text
        return values
    if not _NUMBERS.fullmatch(joined):
        return None
    floats = list(map(float, present))
    if list(map(repr, floats)) == present:
        return floats
    values = []
    for cell, number in zip(present, floats):
        if repr(number) == cell:
            values.append(number)
        elif _INT_CELL.fullmatch(cell) and int(cell) in _INT64:
            values.append(int(cell))  # "3" among decimals: the int 3, as JSON would give
        else:
            return None  # "1e5", "2.50", "1.", 17 significant digits: not what repr writes
    return values


def _lossless_bools(present: list[str]) -> list[bool] | None:
    for spelling in _BOOL_SPELLINGS:
        if present[0] in spelling:
            if set(present) <= spelling.keys():
                return list(map(spelling.__getitem__, present))
            return None  # mixed spellings: which one to write back would be a guess
    return None


# -- JSON and JSON Lines -----------------------------------------------------------------

def _rows_from_objects(name: str, objects: list[Any], where: list[str]) -> tuple[list, list]:
    columns: dict[str, None] = {}
    for obj, place in zip(objects, where):
        if not isinstance(obj, dict):
            raise InvalidDataset(
                f"{name}, {place}: expected an object ({{...}}), found {_json_type(obj)}")
        for key in obj:
            columns.setdefault(key, None)
    names = list(columns)
    return names, [[obj.get(c) for c in names] for obj in objects]


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value), "a value")


def _parse_json(name: str, text: str) -> Dataset:
    try:
        document = _DECODER.decode(text)
    except (ValueError, RecursionError) as exc:
        raise _json_refusal(name, text, text, 0, exc, lines=False) from None
    if not isinstance(document, list):
        raise InvalidDataset(
            f"{name}: expected a JSON array of objects ([{{...}}, ...]), found {_json_type(document)}")
    if not document:
        raise InvalidDataset(f"{name}: the array is empty: there are no rows")
    columns, rows = _rows_from_objects(name, document, [f"item {i}" for i in range(len(document))])
    _check_values(name, text, rows, outside=len(rows) + 1)
    return Dataset(name, "json", columns, rows)


def _parse_jsonl(name: str, text: str) -> Dataset:
    objects, where = [], []
    decode = _DECODER.decode
    # Lines end at \n only (a trailing \r is JSON whitespace). str.splitlines() would also
    # split at U+2028 and other separators, which JSON strings may hold as they are.
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            try:
                objects.append(decode(line))
            except (ValueError, RecursionError) as exc:
                raise _json_refusal(name, line, text, _line_start(text, number), exc,
                                    lines=True) from None
            where.append(f"line {number}")
    if not objects:
        raise InvalidDataset(f"{name}: the file has no rows")
    columns, rows = _rows_from_objects(name, objects, where)
    _check_values(name, text, rows, outside=len(rows))
    return Dataset(name, "jsonl", columns, rows)


def _line_start(text: str, number: int) -> int:
    offset = 0
    for _ in range(number - 1):
        offset = text.index("\n", offset) + 1
    return offset


def _json_refusal(name: str, part: str, text: str, offset: int, exc: Exception, *,
                  lines: bool) -> InvalidDataset:
    """Why ``part`` (the whole file, or one line at ``offset`` of it) is not JSON, and where."""
    if isinstance(exc, json.JSONDecodeError):
        return InvalidDataset(f"{_place(name, text, offset + exc.pos)}: "
                              f"{_json_problem(part, exc, lines)}")
    if isinstance(exc, RecursionError):
        found = _too_deep(part)
        return _nesting_error(name, text, offset + (found if found is not None else 0))
    # NaN or Infinity (from _reject_constant), or an integer too long for Python to read:
    # json says which, but not where.
    found = _bad_number(part)
    if found is None:  # not expected: say what json said, still without a traceback
        return InvalidDataset(f"{_place(name, text, offset)}: invalid JSON: {exc}")
    return InvalidDataset(f"{_place(name, text, offset + found[0])}: {found[1]}")


def _reject_constant(token: str) -> float:
    # NaN and Infinity are not JSON; accepting them would make exports unreadable elsewhere.
    raise ValueError(f"{token} is not valid JSON")


# One decoder for every line: json.loads(line, parse_constant=...) builds a new one per call.
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _place(name: str, text: str, position: int) -> str:
    """``name, line L, column C`` of a character offset, counted as json counts them."""
    line = text.count("\n", 0, position) + 1
    column = position - text.rfind("\n", 0, position)
    return f"{name}, line {line}, column {column}"


def _json_problem(part: str, exc: json.JSONDecodeError, lines: bool) -> str:
    """json's message, made specific where it is terse ("Expecting value")."""
    message = exc.msg.removesuffix(" at")  # "Invalid control character at": the place follows
    at = part[exc.pos:exc.pos + 2]
    before = part[:exc.pos].rstrip()[-1:]
    at_end = exc.pos >= len(part.rstrip())
    if message.startswith("Unterminated string"):
        return "invalid JSON: a string is never closed: the text ends inside it"
    if message.startswith("Invalid control character") and at[:1] in "\r\n":
        return ("invalid JSON: a string reaches the end of its line without its closing \" "
                "(a line break inside a string is written \\n)")
    if message.startswith("Invalid control character"):
        return (f"invalid JSON: {message} inside a string; expected it written as an escape "
                f"such as \\t or \\n")
    if at_end and lines:
        hint = "the line ends before its object does: each line must hold one whole object"
    elif at_end:
        hint = "the text ends before every [ and { is closed"
    elif at in ("//", "/*") or at[:1] == "#":
        hint = "a comment: JSON has none"
    elif before == "," and at[:1] in "]}":
        hint = "a trailing comma before the closing bracket: JSON allows none"
    elif at[:1] == "'":
        hint = "JSON strings use double quotes"
    elif at[:1] == "." and before.isdigit():
        hint = "a number needs digits after its decimal point"
    elif at[:1] == "-":
        hint = "a minus sign must be followed by digits"
    elif before == "0" and at[:1].isdigit():
        hint = "a number cannot start with 0: write a code such as 08123 as a string"
    elif at[:1].isalpha() and message == "Expecting value":
        hint = "a word outside double quotes: the only bare words are true, false and null"
    elif message == "Extra data" and at[:1] == "{":
        hint = "more than one value: for one object per line, name the file .jsonl"
    else:
        return f"invalid JSON: {message}"
    return f"invalid JSON: {message} ({hint})"


_STRING = '"(?:[^"\\\\]|\\\\.)*"'
_BRACKETS = re.compile(f'{_STRING}|[\\[\\]{{}}]')
_CONSTANTS_AND_NUMBERS = re.compile(f'{_STRING}|(NaN|-?Infinity)|(-?[0-9][0-9.eE+-]*)')


def _too_deep(part: str) -> int | None:
    """The offset of the first [ or { deeper than NESTING_LIMIT, if any (slow: error path)."""
    depth = 0
    for match in _BRACKETS.finditer(part):
        char = match.group()
        if char in "[{":
            depth += 1
            if depth > NESTING_LIMIT:
                return match.start()
        elif char in "]}":
            depth -= 1
    return None


def _nesting_error(name: str, text: str, position: int) -> InvalidDataset:
    return InvalidDataset(
        f"{_place(name, text, position)}: arrays and objects are nested more than "
        f"{NESTING_LIMIT} deep; expected at most {NESTING_LIMIT} levels, counting the file's own")


def _bad_number(part: str) -> tuple[int, str] | None:
    """The first NaN, Infinity, overflowing or overlong number outside strings (slow)."""
    for match in _CONSTANTS_AND_NUMBERS.finditer(part):
        constant, number = match.group(1), match.group(2)
        if constant:
            return match.start(), (f"{constant} is not valid JSON; expected a number, "
                                   f"or null for a missing value")
        if number is None:
            continue
        if any(c in number for c in ".eE"):
            if float(number) in (float("inf"), float("-inf")):
                return match.start(), (f"the number {number[:30]} is too large: it would read "
                                       f"as infinity, which is not valid JSON")
        else:
            try:
                int(number)
            except ValueError:
                return match.start(), (f"a number of {len(number.lstrip('-'))} digits; "
                                       f"expected at most 4300, the most Python reads")
    return None


# Candidates only: a hit means the slow, exact search runs.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_LONE_SURROGATE = re.compile(
    r"(?<!\\)(?:\\\\)*\\u(?:[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}"
    r"|(?P<lone>[dD][89a-fA-F][0-9a-fA-F]{2}))")
_INFINITIES = (float("inf"), float("-inf"))


def _check_values(name: str, text: str, rows: list[list], outside: int) -> None:
    """Refuse what json.loads accepts but a row cannot hold: a lone surrogate, a number that
    overflows to infinity, nesting past NESTING_LIMIT. ``outside`` is how many arrays and
    objects hold the rows' values (the rows themselves, and the file's array)."""
    if _SURROGATE_ESCAPE.search(text):  # a quick look first: most files have no such escape
        for match in _LONE_SURROGATE.finditer(text):
            if match.group("lone"):
                escape = "\\u" + match.group("lone")
                raise InvalidDataset(
                    f"{_place(name, text, match.start('lone') - 2)}: {escape} is half of a "
                    f"UTF-16 surrogate pair, not a character; expected a whole pair or "
                    f"another escape (the text cannot be stored as UTF-8)")
    # Level by level, so that no recursion is needed: ``in`` compares a whole level in C.
    # Without a [ or { beyond the rows' own, no value holds an array or object.
    nested = text.count("[") + text.count("{") > outside
    values = list(itertools.chain.from_iterable(rows))
    depth = (2 if outside > len(rows) else 1) + 1  # of the arrays and objects in ``values``
    while True:
        if _INFINITIES[0] in values or _INFINITIES[1] in values:
            position, problem = _bad_number(text) or (0, "a number is too large for a float")
            raise InvalidDataset(f"{_place(name, text, position)}: {problem}")
        level = [v for v in values if type(v) is dict or type(v) is list] if nested else []
        if not level:
            return
        if depth > NESTING_LIMIT:
            raise _nesting_error(name, text, _too_deep(text) or 0)
        values = []
        for container in level:
            values += container.values() if type(container) is dict else container
        depth += 1
