"""Exporting a project's results as JSON or CSV, streamed in dataset order.

Neither format holds the result set in memory: rows and results are read in order, a
chunk at a time, and written as they come. Outputs are stored as JSON text, so the JSON
export copies them without parsing. A chunk is bounded by size as well as by rows: short
results arrive ``_YIELD`` rows at a time with every text longer than ``_INLINE_CHARS``
left out (cut in SQL, so it is never read then), and the long ones are read afterwards,
at most ``_BATCH_CHARS`` of them at a time (or one, if it is longer). So an export holds
about 10 million characters of result text at most, plus one row, whatever the project's
size (issue #13: 60 rows of 9 MB).

``export_results`` writes to a file; ``export_chunks`` gives the same text as pieces of
about ``CHUNK_CHARS`` (a longer row is cut into such pieces), for a server to stream.

JSON: ``[{"row": 0, "status": "succeeded", "output": ..., "error": null,
"verification": "verified"}, ...]``. CSV: the dataset's columns, then the output (a dict
output expands into one column per key, in order of first appearance), then ``error``,
then ``verification``.

CSV files are opened in spreadsheets, and their cells come from uploaded files and from
outputs computed on volunteers' machines, which are strangers' (DESIGN.md). A cell that
begins with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return is a formula to Excel,
LibreOffice and Google Sheets (OWASP's "CSV injection"), so by default such a cell gets a
leading ``'``, which spreadsheets read as "this is text". Numbers written the JSON way
(``-3``, ``-1.5e-07``) are left alone: a spreadsheet reads them as numbers, never as
formulas. A cell that already begins with ``'`` followed by one of those characters gets
one more, so the rule can be undone exactly: remove one ``'`` from every cell that
matches ``'+[=+\-@\t\r]``. ``escape_formulas=False`` writes every cell as it is.
docs/datasets.md says the same for users.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from typing import Any, Iterator, TextIO

from sqlalchemy import case, func, select

from engine.accounts import visible_project
from engine.errors import InvalidRequest
from engine.models import DatasetChunk, Project, Task, User
from engine.results import unrun_status
from engine.status import TaskStatus
from engine.store import Store

logger = logging.getLogger(__name__)

FORMATS = ("json", "csv")
_YIELD = 5000
# A text (an output or an error) longer than this is left out of the query that reads
# results _YIELD rows at a time, and read afterwards with the other long ones of those rows,
# at most _BATCH_CHARS at a time: 5000 rows hold at most 10 million characters this way.
_INLINE_CHARS = 1000
_BATCH_CHARS = 8_000_000
CHUNK_CHARS = 1 << 16  # export_chunks' pieces


def export_results(store: Store, actor: User, project_id: int, fmt: str, out: TextIO, *,
                   escape_formulas: bool = True) -> None:
    """Write the project's results to ``out`` in ``fmt`` (``json`` or ``csv``).

    ``escape_formulas`` (CSV only): prefix cells a spreadsheet would run as formulas with
    ``'`` (see the module's docstring); False writes every cell exactly as stored.
    """
    for _row in _writer(store, actor, project_id, fmt, out, escape_formulas):
        pass
    logger.info("project %s: exported as %s", project_id, fmt)


def export_chunks(store: Store, actor: User, project_id: int, fmt: str, *,
                  escape_formulas: bool = True) -> Iterator[str]:
    """The text ``export_results`` writes, as pieces of at most ``CHUNK_CHARS`` characters.

    Who may export is checked here, before the first piece (NotFound, Forbidden,
    InvalidRequest are raised by this call, not by the iteration), so that a server can
    refuse with no data sent. The pieces are made as they are asked for: the whole export
    is never in memory, only the row being written.
    """
    sink = _Sink()
    rows = _writer(store, actor, project_id, fmt, sink, escape_formulas)
    return _pieces(rows, sink, project_id, fmt)


class _Sink:
    """A file for the writers that keeps what they write, as written (no copy), to be
    given out in pieces."""

    def __init__(self):
        self._parts: list[str] = []
        self.size = 0

    def write(self, text: str) -> None:
        self._parts.append(text)
        self.size += len(text)

    def drain(self) -> Iterator[str]:
        """What was written, as pieces of at most CHUNK_CHARS; then it is empty again."""
        parts, self._parts, self.size = self._parts, [], 0
        small: list[str] = []
        small_size = 0
        for part in parts:
            if small and small_size + len(part) > CHUNK_CHARS:
                yield "".join(small)
                small, small_size = [], 0
            if len(part) > CHUNK_CHARS:
                for start in range(0, len(part), CHUNK_CHARS):
                    yield part[start:start + CHUNK_CHARS]
            else:
                small.append(part)
                small_size += len(part)
        if small:
            yield "".join(small)


def _pieces(rows: Iterator[None], sink: _Sink, project_id: int, fmt: str) -> Iterator[str]:
    try:
        for _row in rows:
            if sink.size >= CHUNK_CHARS:
                yield from sink.drain()
        yield from sink.drain()
    finally:
        rows.close()
    logger.info("project %s: exported as %s (streamed)", project_id, fmt)


def _writer(store: Store, actor: User, project_id: int, fmt: str, out: TextIO,
            escape_formulas: bool) -> Iterator[None]:
    """A generator that writes the export to ``out``, one row per step. The checks run now."""
    if fmt not in FORMATS:
        raise InvalidRequest(f"unknown export format {fmt!r}; expected json or csv")
    with store.session() as session:
        project = visible_project(session, actor, project_id)
        columns = json.loads(project.columns_json)
    if fmt == "json":
        return _write_json(store, project, out)
    return _write_csv(store, project, columns, out, escape_formulas)


def _short(column):
    """``column`` if it is at most _INLINE_CHARS long, else NULL (cut in SQL: never read)."""
    return case((func.length(column) > _INLINE_CHARS, None), else_=column)


def _long_size():
    """NULL for a short row; for a long one, the characters of its output and error together."""
    output, error = func.length(Task.output), func.length(Task.error)
    return case((output > _INLINE_CHARS, output + func.coalesce(error, 0)),
                (error > _INLINE_CHARS, error + func.coalesce(output, 0)))


def _tasks(store: Store, project_id: int, *conditions) -> Iterator[tuple]:
    """(row index, status, output, error, verification, ...) of the project's tasks, in row
    order, bounded by size (see the module's docstring)."""
    with store.session() as tasks_session, store.session() as long_session:
        # Through the Core connection: the ORM's row processing cost a tenth of an export.
        tasks = tasks_session.connection().execute(
            select(Task.row_index, Task.status, _short(Task.output), _short(Task.error),
                   Task.verification, _long_size())
            .where(Task.project_id == project_id, *conditions).order_by(Task.row_index)
            .execution_options(yield_per=_YIELD))
        for part in tasks.partitions():
            long = [(t[0], t[5]) for t in part if t[5] is not None]
            if not long:
                yield from part
                continue
            texts: dict[int, tuple] = {}
            next_long = 0
            for t in part:
                if t[5] is None:
                    yield t
                    continue
                if t[0] not in texts:
                    texts = _long_texts(long_session, project_id, long, next_long)
                output, error = texts.pop(t[0], (None, None))  # gone meanwhile (a rerun)
                next_long += 1
                yield t[0], t[1], output, error, t[4]


def _long_texts(session, project_id: int, long: list[tuple[int, int]], first: int) -> dict[int, tuple]:
    """The outputs and errors of ``long[first:]``'s rows, as many as fit in _BATCH_CHARS
    (at least one)."""
    chosen, size = [], 0
    for index, length in long[first:]:
        if chosen and size + length > _BATCH_CHARS:
            break
        chosen.append(index)
        size += length
    rows = session.connection().execute(
        select(Task.row_index, Task.output, Task.error)
        .where(Task.project_id == project_id, Task.row_index.in_(chosen)))
    return {index: (output, error) for index, output, error in rows}


def _rows(store: Store, project: Project) -> Iterator[tuple[int, list, tuple | None]]:
    """(row index, values, task or None) for every row, in dataset order."""
    with store.session() as rows_session:
        chunks = rows_session.execute(
            select(DatasetChunk.start_row, DatasetChunk.payload)
            .where(DatasetChunk.project_id == project.id).order_by(DatasetChunk.start_row)
            .execution_options(yield_per=16))
        tasks = _tasks(store, project.id)
        task = next(tasks, None)
        for start, payload in chunks:
            for offset, values in enumerate(json.loads(payload)):
                index = start + offset
                while task is not None and task[0] < index:
                    task = next(tasks, None)
                if task is not None and task[0] == index:
                    yield index, values, task
                else:
                    yield index, values, None
        tasks.close()


def _write_json(store: Store, project: Project, out: TextIO) -> Iterator[None]:
    dumps = json.dumps
    out.write("[")
    first = True
    unrun = unrun_status(project.status)  # "not run" once the project has ended without it
    for index, _values, task in _rows(store, project):
        if task is None:
            status, output, error, verification = unrun, "null", "null", "null"
        else:
            status, output, error = task[1], task[2] or "null", dumps(task[3])
            verification = f'"{task[4]}"'
        head = ("" if first else ",\n") + f'{{"row": {index}, "status": "{status}", "output": '
        if len(output) > _INLINE_CHARS or len(error) > _INLINE_CHARS:
            for part in (head, output, ', "error": ', error, f', "verification": {verification}}}'):
                out.write(part)  # a long text is not copied into one string with the rest
        else:
            out.write(head + output + f', "error": {error}, "verification": {verification}}}')
        first = False
        yield
    out.write("]\n")


def _output_keys(store: Store, project_id: int) -> list[str] | None:
    """The union of keys if every stored output is a JSON object, else None."""
    keys: dict[str, None] = {}
    seen_any = False
    tasks = _tasks(store, project_id, Task.status == TaskStatus.SUCCEEDED.value)
    try:
        for task in tasks:
            text = task[2]
            if text is None or text == "null":
                continue
            if not text.startswith("{"):
                return None
            seen_any = True
            for key in json.loads(text):
                keys.setdefault(key, None)
    finally:
        tasks.close()
    return list(keys) if seen_any else None


def _output_cell(text: str) -> str:
    """An output's CSV cell from its stored JSON text.

    Outputs are stored by the sandboxed child's ``json.dumps``, so a number, true or false
    already reads as ``_cell`` would write it: only strings, lists and objects (and null)
    need decoding. A million-row export saved a JSON round trip per row this way.
    """
    if text[0] in _AS_STORED and text != "null":
        return text
    return _cell(json.loads(text))


_AS_STORED = frozenset("-0123456789tfn")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


# A cell a spreadsheet would run: one of OWASP's characters first, after any number of '
# (so that the escape can be undone), unless the cell is a negative number as JSON writes it.
_NUMBER = "(?:0|[1-9][0-9]*)(?:\\.[0-9]+)?(?:[eE][-+]?[0-9]+)?"
_FORMULA = re.compile(f"'*[=+@\t\r]|'+-|-(?!{_NUMBER}\\Z)")
_RISKY_FIRST = frozenset("=+-@\t\r'")  # a cell starting otherwise is never escaped


def escape_formula(cell: str) -> str:
    """``cell`` as the CSV export writes it by default: ``'`` first if a spreadsheet would
    read it as a formula."""
    return "'" + cell if cell[:1] in _RISKY_FIRST and _FORMULA.match(cell) else cell


# The escaping versions of _cell and _output_cell: they give escape_formula() of what those
# give, but look only at strings (and -Infinity): a number written as JSON writes it is
# never a formula, and the export keeps copying numbers as stored. (Inlined: these run
# once per cell, and a nested call per cell cost a tenth of an export.)
def _safe_cell(value: Any) -> str:
    if type(value) is str:
        return "'" + value if value[:1] in _RISKY_FIRST and _FORMULA.match(value) else value
    if value is None:
        return ""
    text = json.dumps(value, ensure_ascii=False)
    return "'" + text if text == "-Infinity" else text


def _safe_output_cell(text: str) -> str:
    if text[0] in _AS_STORED and text != "null":
        return "'" + text if text == "-Infinity" else text
    return _safe_cell(json.loads(text))


def _row_writer(out: TextIO):
    """``write(row, long)``: one CSV row, as the csv module writes it. ``long``: a row with a
    long cell (a long output or error), written cell by cell instead: the csv module builds
    each row in a buffer of 4 bytes per character, 40 MB for one 10 MB output."""
    plain = csv.writer(out, lineterminator="\n").writerow
    # The csv module leaves a \r unquoted when lines end in \n: a reader would split the
    # row there. Such rows (rare) are written with every cell quoted.
    quoted = csv.writer(out, lineterminator="\n", quoting=csv.QUOTE_ALL).writerow

    def write(row: list[str], long: bool = False) -> None:
        if not long:
            (quoted if "\r" in "".join(row) else plain)(row)
            return
        every = any("\r" in cell for cell in row)
        for number, cell in enumerate(row):
            if number:
                out.write(",")
            # What the csv module quotes (QUOTE_MINIMAL): a delimiter, a quote, a line end.
            if every or "," in cell or '"' in cell or "\n" in cell:
                out.write('"')
                out.write(cell.replace('"', '""'))
                out.write('"')
            else:
                out.write(cell)
        out.write("\n")
    return write


def _write_csv(store: Store, project: Project, columns: list[str], out: TextIO,
               escape_formulas: bool) -> Iterator[None]:
    keys = _output_keys(store, project.id)
    taken = set(columns) | {"error"}
    if keys is None:
        output_columns = ["output"]
    else:
        output_columns = [key if key not in taken else f"output.{key}" for key in keys]
    if escape_formulas:
        cell, output_cell, text = _safe_cell, _safe_output_cell, escape_formula
    else:
        cell, output_cell, text = _cell, _output_cell, str
    write = _row_writer(out)
    write([text(c) for c in columns + output_columns] + ["error", "verification"])
    for _index, values, task in _rows(store, project):
        cells = [cell(v) for v in values]
        if task is None or task[2] is None:
            outputs = [""] * len(output_columns)
        elif keys is None:
            outputs = [output_cell(task[2])]
        else:
            output = json.loads(task[2])
            outputs = [cell(output.get(k)) for k in keys] if isinstance(output, dict) \
                else [""] * len(keys)
        if task is None:
            write(cells + outputs + ["", ""])
        else:
            long = len(task[2] or "") > _INLINE_CHARS or len(task[3] or "") > _INLINE_CHARS
            write(cells + outputs + [text(task[3]) if task[3] else "", task[4]], long)
        yield
