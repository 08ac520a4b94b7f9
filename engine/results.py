"""Reading a project's results a page at a time, for the portal.

Nothing here loads a whole result set: a page reads the one or two dataset chunks and
the task rows of its row range by primary key, and the failed-rows view pages with a
key (the last row index shown) over ``ix_tasks_failed``, the index of failed rows'
``(project_id, row_index)`` (``engine.models.failed_tasks``), so page 1,000 costs what
page 1 costs. Downloads stream through ``engine.export``.

A page is bounded by size as well as by rows: it carries at most ``MAX_PAGE_CHARS`` of
output and error text, and ends early (saying where the rest begins) when its rows'
outputs are large. An output or error longer than ``MAX_SHOWN_CHARS`` comes back as its
first ``PREVIEW_CHARS`` characters, cut in SQL, with its full size; ``full_output`` gives
one row's whole output for a download. 60 outputs of 9 MB once made one page a 540 MB
message, which Streamlit refused after the portal had grown to 6.2 GB (issue #13).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, func, select, text

from engine.accounts import visible_project
from engine.errors import NotFound
from engine.models import DatasetChunk, Task, failed_tasks
from engine.projects import CHUNK_ROWS
from engine.status import FAILED_ROW, ProjectStatus, TaskStatus
from engine.store import Store

logger = logging.getLogger(__name__)

MAX_PAGE_ROWS = 1000
# Sizes are counted in characters, as SQL's length() counts them on SQLite and PostgreSQL
# (bytes, for ASCII JSON). 8 MB keeps a page's message far below Streamlit's limit (200 MB).
MAX_PAGE_CHARS = 8 << 20
# An output or error longer than this is shown cut to its first PREVIEW_CHARS: a table
# cell holds no more that anyone reads, and the whole output is one download away.
MAX_SHOWN_CHARS = 1 << 20
PREVIEW_CHARS = 10_000
# What a row without a result is shown as once its project ended without it (failed or
# cancelled): it will not run, so "pending" would be wrong. Shown only; never stored.
NOT_RUN = "not run"


@dataclass(frozen=True)
class ResultRow:
    """One row. ``output`` is main's return value; when ``truncated``, it is instead the
    first ``PREVIEW_CHARS`` characters of its JSON text, whose full length is ``output_size``."""

    row: int
    values: dict[str, Any]
    status: str
    output: Any
    error: str | None
    verification: str | None = None  # verified, verified-by-trust, unverified, inconclusive
    output_size: int = 0             # characters of the output's JSON text
    truncated: bool = False


@dataclass(frozen=True)
class ResultsPage:
    """One page of results. ``next_after`` is the key of the next failed-rows page, if any.

    ``next_start``: the page ended before ``limit`` rows because their outputs reached
    ``MAX_PAGE_CHARS``; the rest begin there (pass it as ``start``). None: every row asked
    for is on the page. ``size``: characters of output and error text the page holds.
    """

    columns: list[str]
    rows: list[ResultRow]
    total: int
    next_after: int | None
    next_start: int | None = None
    size: int = 0

    def truncated_rows(self) -> list[ResultRow]:
        """The rows whose output is shown cut short (``full_output`` has the whole)."""
        return [r for r in self.rows if r.truncated]

    def output_columns(self) -> dict[str, str] | None:
        """Column name -> key, when every output on this page is a JSON object: then a
        table shows one column per key, as the CSV export does (a key that clashes with a
        dataset column or ``error`` is ``output.KEY``). None: one ``output`` column (also
        when an output is cut short: its text is no JSON value)."""
        outputs = [r.output for r in self.rows if r.output is not None]
        if not outputs or not all(isinstance(o, dict) for o in outputs):
            return None
        keys: dict[str, None] = {}
        for output in outputs:
            keys.update(dict.fromkeys(output))
        taken = set(self.columns) | {"error", "row", "status", "verification"}
        return {(f"output.{k}" if k in taken else str(k)): k for k in keys}


@dataclass(frozen=True)
class ErrorGroup:
    """Failed rows that raised the same exception type, with one example."""

    kind: str
    count: int
    example_row: int
    example_error: str
    example_traceback: str | None


def results_page(store: Store, actor, project_id: int, *, start: int = 0,
                 limit: int = 100) -> ResultsPage:
    """Rows ``start`` to ``start + limit - 1`` in dataset order, with their results; fewer
    when their outputs pass ``MAX_PAGE_CHARS`` (then ``next_start`` says where the rest begin)."""
    limit = max(1, min(int(limit), MAX_PAGE_ROWS))
    start = max(0, int(start))
    with store.session() as session:
        project = visible_project(session, actor, project_id)
        columns = json.loads(project.columns_json)
        end = min(start + limit, project.rows_total)
        # First the sizes (SQL's length() reads no text into Python), then the page's texts.
        sizes = {i: _shown(out) + _shown(err) for i, out, err in session.execute(
            select(Task.row_index, func.length(Task.output), func.length(Task.error))
            .where(Task.project_id == project_id, Task.row_index >= start,
                   Task.row_index < end)).all()}
        cut, size = _fit([sizes.get(i, 0) for i in range(start, end)])
        shown_end = start + cut
        tasks = {t.row_index: t for t in session.execute(text(
            f"SELECT row_index, status, {_CLIPPED}, verification FROM tasks "
            "WHERE project_id = :p AND row_index >= :lo AND row_index < :hi"),
            {"p": project_id, "lo": start, "hi": shown_end}).all()}
        inputs = _inputs(session, project_id, range(start, shown_end))
        unrun = unrun_status(project.status)
        return ResultsPage(columns=columns, total=project.rows_total, next_after=None,
                           next_start=shown_end if shown_end < end else None, size=size,
                           rows=[_row(i, columns, inputs.get(i), tasks.get(i), unrun)
                                 for i in range(start, shown_end)])


def failed_page(store: Store, actor, project_id: int, *, after: int = -1,
                start: int | None = None, limit: int = 100) -> ResultsPage:
    """Failed rows in dataset order: those with an index above ``after`` (keyset paging),
    or, with ``start``, from the ``start``-th failed row on (page numbers: the index is
    walked up to it, which costs little next to reading the page). Bounded by size as
    ``results_page`` is; ``next_start`` then counts failed rows, as ``start`` does."""
    limit = max(1, min(int(limit), MAX_PAGE_ROWS))
    skip = max(0, int(start or 0))
    with store.session() as session:
        project = visible_project(session, actor, project_id)
        columns = json.loads(project.columns_json)
        failed = failed_tasks(session)
        keys = session.execute(text(
            "SELECT row_index, length(output), length(error) "
            f"FROM {failed} WHERE project_id = :p AND {FAILED_ROW} "
            "AND row_index > :after ORDER BY row_index LIMIT :n OFFSET :skip"),
            {"p": project_id, "after": int(after), "n": limit + 1, "skip": skip}).all()
        more = len(keys) > limit
        keys = keys[:limit]
        cut, size = _fit([_shown(out) + _shown(err) for _, out, err in keys])
        cut_short = cut < len(keys)
        keys = keys[:cut]
        # The rows found above, by primary key.
        tasks = session.execute(text(
            f"SELECT row_index, status, {_CLIPPED}, verification FROM tasks "
            "WHERE project_id = :p AND row_index IN :rows ORDER BY row_index")
            .bindparams(bindparam("rows", expanding=True)),
            {"p": project_id, "rows": [k[0] for k in keys]}).all() if keys else []
        inputs = _inputs(session, project_id, [t.row_index for t in tasks])
        return ResultsPage(
            columns=columns, total=project.rows_failed,
            next_after=keys[-1][0] if (more or cut_short) and keys else None,
            next_start=skip + cut if cut_short else None, size=size,
            rows=[_row(t.row_index, columns, inputs.get(t.row_index), t) for t in tasks])


def full_output(store: Store, actor, project_id: int, row: int) -> str:
    """One row's whole output, as its JSON text (for a download of a truncated output)."""
    with store.session() as session:
        visible_project(session, actor, project_id)
        output = session.execute(select(Task.output).where(
            Task.project_id == project_id, Task.row_index == int(row))).scalar_one_or_none()
    if output is None:
        raise NotFound(f"row {row} of project {project_id} has no output")
    return output


def error_groups(store: Store, actor, project_id: int) -> list[ErrorGroup]:
    """Failed rows grouped by exception type, most frequent first, with one example each."""
    with store.session() as session:
        visible_project(session, actor, project_id)
        # The type is the error text before its first colon ("ValueError: ...").
        # SQLite's instr is PostgreSQL's strpos (same arguments).
        find = "strpos" if session.get_bind().dialect.name == "postgresql" else "instr"
        groups = session.execute(text(
            f"SELECT CASE WHEN {find}(error, ':') > 0 THEN substr(error, 1, {find}(error, ':') - 1) "
            "ELSE error END AS kind, count(*) AS n, min(row_index) AS first "
            f"FROM {failed_tasks(session)} WHERE project_id = :p AND {FAILED_ROW} "
            "GROUP BY kind ORDER BY n DESC, first"), {"p": project_id}).all()
        result = []
        for kind, count, first in groups:
            example = session.get(Task, (project_id, first))
            result.append(ErrorGroup(kind=kind or "(no message)", count=count, example_row=first,
                                     example_error=example.error or "",
                                     example_traceback=example.traceback))
        return result


def _shown(length: int | None) -> int:
    """Characters of a text of ``length`` that a page carries (a long one is cut)."""
    length = length or 0
    return PREVIEW_CHARS if length > MAX_SHOWN_CHARS else length


def _fit(sizes: list[int]) -> tuple[int, int]:
    """How many of the rows (in order) fit in ``MAX_PAGE_CHARS``, at least one, and their size."""
    total = 0
    for count, size in enumerate(sizes):
        if count and total + size > MAX_PAGE_CHARS:
            return count, total
        total += size
    return len(sizes), total


def _clip(column: str) -> str:
    # Cut in SQL, so that a huge text never reaches Python; the same SQL on SQLite and
    # PostgreSQL. The numbers are literals, so no driver's typing of parameters meets substr.
    return (f"CASE WHEN length({column}) > {MAX_SHOWN_CHARS} "
            f"THEN substr({column}, 1, {PREVIEW_CHARS}) ELSE {column} END AS {column}, "
            f"length({column}) AS {column}_size")


# A task's output and error, each cut to PREVIEW_CHARS when longer than MAX_SHOWN_CHARS,
# with their full lengths.
_CLIPPED = f"{_clip('output')}, {_clip('error')}"


def _inputs(session, project_id: int, indices) -> dict[int, list]:
    wanted = sorted(set(indices))
    if not wanted:
        return {}
    chunk_ids = sorted({i // CHUNK_ROWS for i in wanted})
    found: dict[int, list] = {}
    for start, payload in session.execute(
            select(DatasetChunk.start_row, DatasetChunk.payload)
            .where(DatasetChunk.project_id == project_id,
                   DatasetChunk.chunk_index.in_(chunk_ids))):
        rows = json.loads(payload)
        for i in wanted:
            if start <= i < start + len(rows):
                found[i] = rows[i - start]
    return found


def unrun_status(project_status: str) -> str:
    """How a row without a result reads in a project of ``project_status``."""
    ended = project_status in (ProjectStatus.FAILED.value, ProjectStatus.CANCELLED.value)
    return NOT_RUN if ended else TaskStatus.PENDING.value


def _row(index: int, columns: list[str], values: list | None, task,
         unrun: str = TaskStatus.PENDING.value) -> ResultRow:
    as_dict = dict(zip(columns, values or []))
    if task is None:
        return ResultRow(index, as_dict, unrun, None, None)
    size = task.output_size or 0
    truncated = size > MAX_SHOWN_CHARS
    output = task.output if truncated or task.output is None else json.loads(task.output)
    error = task.error
    if (task.error_size or 0) > MAX_SHOWN_CHARS:
        error = f"{error} … (cut short: {task.error_size:,} characters in all)"
    return ResultRow(index, as_dict, task.status, output, error, task.verification,
                     output_size=size, truncated=truncated)
