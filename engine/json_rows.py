"""Rows from JSON (an array of objects) and JSON Lines (one object per line), strictly.

Every file that is not strict JSON (RFC 8259) raises ``InvalidDataset`` naming the file, the
line and the column, with a hint where json's own message is terse: comments, trailing
commas, ``NaN``, ``1.``, lone surrogates, and nesting past ``NESTING_LIMIT`` (which also
keeps a file of 100,000 ``[`` from reaching a ``RecursionError``). engine/dataset.py calls
this module; docs/datasets.md lists the refusals as users read them.
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any, Callable

from engine.errors import InvalidDataset

# Arrays and objects inside one another, counting the file's own array. Python's parser
# gives up near 1,000 with a RecursionError, and storing, pickling and exporting a row
# recurse again: a definite limit far below that keeps every later step safe.
NESTING_LIMIT = 100


def _rows_from_objects(objects: list[Any], place: Callable[[int], str]) -> tuple[list, list]:
    """Columns in order of first appearance, and rows; ``place(i)`` says where object i is."""
    columns: dict[str, None] = {}
    for index, obj in enumerate(objects):
        if not isinstance(obj, dict):
            raise InvalidDataset(
                f"{place(index)}: expected an object ({{...}}), found {_json_type(obj)}")
        for key in obj:
            columns.setdefault(key, None)
    names = list(columns)
    return names, [[obj.get(c) for c in names] for obj in objects]


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value), "a value")


def rows_from_json(name: str, text: str) -> tuple[list[str], list[list[Any]]]:
    """The columns and rows of a JSON array of objects, or ``InvalidDataset``."""
    try:
        document = _DECODER.decode(text)
    except (ValueError, RecursionError) as exc:
        raise _json_refusal(name, text, text, 0, exc, lines=False) from None
    if not isinstance(document, list):
        raise InvalidDataset(
            f"{_place(name, text, _JSON_SPACE.match(text).end())}: expected a JSON array of "
            f"objects ([{{...}}, ...]), found {_json_type(document)}")
    if not document:
        raise InvalidDataset(f"{name}: the array is empty: there are no rows")
    columns, rows = _rows_from_objects(
        document, lambda i: f"{_place(name, text, _item_start(text, i))} (item {i})")
    _check_values(name, text, rows, outside=len(rows) + 1)
    return columns, rows


def rows_from_json_lines(name: str, text: str) -> tuple[list[str], list[list[Any]]]:
    """The columns and rows of JSON Lines, one object per line, or ``InvalidDataset``."""
    objects, numbers = [], []
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
            numbers.append(number)
    if not objects:
        raise InvalidDataset(f"{name}: the file has no rows")
    columns, rows = _rows_from_objects(objects, lambda i: f"{name}, line {numbers[i]}")
    _check_values(name, text, rows, outside=len(rows))
    return columns, rows


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
_ITEM_MARKS = re.compile(f'{_STRING}|[\\[\\]{{}},]')
_JSON_SPACE = re.compile("[ \t\n\r]*")  # JSON's whitespace, no other


def _item_start(text: str, index: int) -> int:
    """The offset of item ``index`` of the file's array (slow: error path)."""
    depth, count = 0, -1
    for match in _ITEM_MARKS.finditer(text):
        char = match.group()
        depth += (char in "[{") - (char in "]}")
        if depth == 1 and char in "[,":  # the file's own [, or a comma between its items
            count += 1
            if count == index:
                return _JSON_SPACE.match(text, match.end()).end()
    return 0  # not expected: the text parsed as an array with that many items
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
