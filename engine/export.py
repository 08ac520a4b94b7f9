"""Exporting a project's results as JSON or CSV, streamed in dataset order.

Neither format holds the result set in memory: rows and results are read in order, a
chunk at a time, and written as they come. Outputs are stored as JSON text, so the JSON
export copies them without parsing.

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

from sqlalchemy import select

from engine.accounts import visible_project
from engine.errors import InvalidRequest
from engine.models import DatasetChunk, Project, Task, User
from engine.results import unrun_status
from engine.status import TaskStatus
from engine.store import Store

logger = logging.getLogger(__name__)

FORMATS = ("json", "csv")
_YIELD = 5000


def export_results(store: Store, actor: User, project_id: int, fmt: str, out: TextIO, *,
                   escape_formulas: bool = True) -> None:
    """Write the project's results to ``out`` in ``fmt`` (``json`` or ``csv``).

    ``escape_formulas`` (CSV only): prefix cells a spreadsheet would run as formulas with
    ``'`` (see the module's docstring); False writes every cell exactly as stored.
    """
    if fmt not in FORMATS:
        raise InvalidRequest(f"unknown export format {fmt!r}; expected json or csv")
    with store.session() as session:
        project = visible_project(session, actor, project_id)
        columns = json.loads(project.columns_json)
    if fmt == "json":
        _write_json(store, project, out)
    else:
        _write_csv(store, project, columns, out, escape_formulas)
    logger.info("project %s: exported as %s", project_id, fmt)


def _rows(store: Store, project: Project) -> Iterator[tuple[int, list, tuple | None]]:
    """(row index, values, task or None) for every row, in dataset order."""
    with store.session() as rows_session, store.session() as tasks_session:
        chunks = rows_session.execute(
            select(DatasetChunk.start_row, DatasetChunk.payload)
            .where(DatasetChunk.project_id == project.id).order_by(DatasetChunk.start_row)
            .execution_options(yield_per=16))
        # Through the Core connection: the ORM's row processing cost a tenth of an export.
        tasks = tasks_session.connection().execute(
            select(Task.row_index, Task.status, Task.output, Task.error, Task.verification)
            .where(Task.project_id == project.id).order_by(Task.row_index)
            .execution_options(yield_per=_YIELD))
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


def _write_json(store: Store, project: Project, out: TextIO) -> None:
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
        out.write(("" if first else ",\n") +
                  f'{{"row": {index}, "status": "{status}", "output": {output}, "error": {error}, '
                  f'"verification": {verification}}}')
        first = False
    out.write("]\n")


def _output_keys(store: Store, project_id: int) -> list[str] | None:
    """The union of keys if every stored output is a JSON object, else None."""
    keys: dict[str, None] = {}
    seen_any = False
    with store.session() as session:
        outputs = session.execute(
            select(Task.output).where(Task.project_id == project_id,
                                      Task.status == TaskStatus.SUCCEEDED.value)
            .execution_options(yield_per=_YIELD)).scalars()
        for text in outputs:
            if text is None or text == "null":
                continue
            if not text.startswith("{"):
                return None
            seen_any = True
            for key in json.loads(text):
                keys.setdefault(key, None)
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
    plain = csv.writer(out, lineterminator="\n").writerow
    # The csv module leaves a \r unquoted when lines end in \n: a reader would split the
    # row there. Such rows (rare) are written with every cell quoted.
    quoted = csv.writer(out, lineterminator="\n", quoting=csv.QUOTE_ALL).writerow

    def write(row: list[str]) -> None:
        (quoted if "\r" in "".join(row) else plain)(row)
    return write


def _write_csv(store: Store, project: Project, columns: list[str], out: TextIO,
               escape_formulas: bool) -> None:
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
            write(cells + outputs + [text(task[3]) if task[3] else "", task[4]])
