"""The typing rule for CSV cells, written once: a column is typed only when its typed values
give back exactly its text.

A column's non-empty cells become numbers when each one is exactly how Python writes that
number back (``str()`` of an int within 64 bits, ``repr()`` of a finite float), or booleans
when all are true/false in one spelling; otherwise the whole column is text. An empty cell
is None. So a postcode ``08123`` stays the string ``"08123"``, a phone number
``+447911123456`` keeps its ``+``, and ``1e5`` among codes stays ``"1e5"``.
docs/datasets.md states the rule for users, with a table of examples.
"""

from __future__ import annotations

import re
from typing import Any

# The regexes only pick the candidates quickly; the round trip itself decides.
_INT = "(?:0|-?[1-9][0-9]{0,18})"  # no "-0", no leading zeros, no "+"
_FLOAT = "-?(?:0|[1-9][0-9]*)(?:\\.[0-9]+)?(?:e[-+][0-9]+)?"  # the shapes repr() writes
_INT_CELL = re.compile(_INT)
# Whole columns at once, cells joined by newlines: one regex call instead of one per cell.
_INTS = re.compile(f"{_INT}(?:\n{_INT})*")
_NUMBERS = re.compile(f"{_FLOAT}(?:\n{_FLOAT})*")
_INT64 = range(-2**63, 2**63)
_BOOL_SPELLINGS = ({"true": True, "false": False}, {"True": True, "False": False},
                   {"TRUE": True, "FALSE": False})


def typed_column(cells: tuple[str, ...]) -> list[Any]:
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
