"""Reading a project's results a page at a time, for the portal.

Nothing here loads a whole result set: a page reads the one or two dataset chunks and
the task rows of its row range by primary key, and the failed-rows view pages with a
key (the last row index shown) over the ``(project_id, status, row_index)`` index, so
page 1,000 costs what page 1 costs. Downloads stream through ``engine.export``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, text

from engine.accounts import visible_project
from engine.models import DatasetChunk, Task, failed_tasks
from engine.projects import CHUNK_ROWS
from engine.status import ProjectStatus, TaskStatus
from engine.store import Store

logger = logging.getLogger(__name__)

MAX_PAGE_ROWS = 1000
# What a row without a result is shown as once its project ended without it (failed or
# cancelled): it will not run, so "pending" would be wrong. Shown only; never stored.
NOT_RUN = "not run"


@dataclass(frozen=True)
class ResultRow:
    row: int
    values: dict[str, Any]
    status: str
    output: Any
    error: str | None
    verification: str | None = None  # verified, verified-by-trust, unverified, inconclusive


@dataclass(frozen=True)
class ResultsPage:
    """One page of results. ``next_after`` is the key of the next failed-rows page, if any."""

    columns: list[str]
    rows: list[ResultRow]
    total: int
    next_after: int | None

    def output_columns(self) -> dict[str, str] | None:
        """Column name -> key, when every output on this page is a JSON object: then a
        table shows one column per key, as the CSV export does (a key that clashes with a
        dataset column or ``error`` is ``output.KEY``). None: one ``output`` column."""
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
    """Rows ``start`` to ``start + limit - 1`` in dataset order, with their results."""
    limit = max(1, min(int(limit), MAX_PAGE_ROWS))
    start = max(0, int(start))
    with store.session() as session:
        project = visible_project(session, actor, project_id)
        columns = json.loads(project.columns_json)
        end = min(start + limit, project.rows_total)
        tasks = {t.row_index: t for t in session.execute(
            select(Task.row_index, Task.status, Task.output, Task.error, Task.verification)
            .where(Task.project_id == project_id, Task.row_index >= start,
                   Task.row_index < end)).all()}
        inputs = _inputs(session, project_id, range(start, end))
        unrun = unrun_status(project.status)
        return ResultsPage(columns=columns, total=project.rows_total, next_after=None,
                           rows=[_row(i, columns, inputs.get(i), tasks.get(i), unrun)
                                 for i in range(start, end)])


def failed_page(store: Store, actor, project_id: int, *, after: int = -1,
                start: int | None = None, limit: int = 100) -> ResultsPage:
    """Failed rows in dataset order: those with an index above ``after`` (keyset paging),
    or, with ``start``, from the ``start``-th failed row on (page numbers: the index is
    walked up to it, which costs little next to reading the page)."""
    limit = max(1, min(int(limit), MAX_PAGE_ROWS))
    with store.session() as session:
        project = visible_project(session, actor, project_id)
        columns = json.loads(project.columns_json)
        tasks = session.execute(text(
            "SELECT row_index, status, output, error, verification "
            f"FROM {failed_tasks(session)} WHERE project_id = :p AND status = 'failed' "
            "AND row_index > :after ORDER BY row_index LIMIT :n OFFSET :skip"),
            {"p": project_id, "after": int(after), "n": limit + 1,
             "skip": max(0, int(start or 0))}).all()
        more = len(tasks) > limit
        tasks = tasks[:limit]
        inputs = _inputs(session, project_id, [t.row_index for t in tasks])
        return ResultsPage(
            columns=columns, total=project.rows_failed,
            next_after=tasks[-1].row_index if more else None,
            rows=[_row(t.row_index, columns, inputs.get(t.row_index), t) for t in tasks])


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
            f"FROM {failed_tasks(session)} WHERE project_id = :p AND status = 'failed' "
            "GROUP BY kind ORDER BY n DESC, first"), {"p": project_id}).all()
        result = []
        for kind, count, first in groups:
            example = session.get(Task, (project_id, first))
            result.append(ErrorGroup(kind=kind or "(no message)", count=count, example_row=first,
                                     example_error=example.error or "",
                                     example_traceback=example.traceback))
        return result


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
    output = json.loads(task.output) if task.output is not None else None
    return ResultRow(index, as_dict, task.status, output, task.error, task.verification)
