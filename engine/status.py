"""Project and task statuses, and the only code that changes them.

Every status change goes through ``transition_project`` or ``record_results``. Each
writes the change and its side effects (results, counters, completion) in the caller's
transaction, as one compare-and-set, so a terminal status is never left and two
dispatchers can never both complete or double-count a project.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass
from typing import Iterable, Sequence

from sqlalchemy import text, update
from sqlalchemy.orm import Session

from engine.models import Project

logger = logging.getLogger(__name__)


class ProjectStatus(str, enum.Enum):
    SUBMITTED = "submitted"
    RUNNING = "running"
    COMPLETE = "complete"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def is_terminal(self) -> bool:
        return self in _TERMINAL

    def __str__(self) -> str:
        return self.value


class TaskStatus(str, enum.Enum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


_TERMINAL = frozenset({ProjectStatus.COMPLETE, ProjectStatus.FAILED, ProjectStatus.CANCELLED})

# Which statuses each status may be entered from.
_ENTERED_FROM: dict[ProjectStatus, frozenset[ProjectStatus]] = {
    ProjectStatus.SUBMITTED: frozenset(),
    ProjectStatus.RUNNING: frozenset({ProjectStatus.SUBMITTED}),
    ProjectStatus.COMPLETE: frozenset({ProjectStatus.RUNNING}),
    ProjectStatus.FAILED: frozenset({ProjectStatus.SUBMITTED, ProjectStatus.RUNNING}),
    ProjectStatus.CANCELLED: frozenset({ProjectStatus.SUBMITTED, ProjectStatus.RUNNING}),
}


def can_transition(old: ProjectStatus, new: ProjectStatus) -> bool:
    return old in _ENTERED_FROM[new]


def transition_project(session: Session, project_id: int, new: ProjectStatus, *,
                       error: str | None = None, traceback: str | None = None) -> bool:
    """Move a project to ``new`` if its current status allows it; return whether it moved.

    The check and the write are one UPDATE, so concurrent callers cannot both win.
    """
    now = time.time()
    values: dict = {"status": new.value}
    if new is ProjectStatus.RUNNING:
        values["started_at"] = now
    if new.is_terminal():
        values["finished_at"] = now
    if error is not None:
        values["error"] = error
        values["error_traceback"] = traceback
    result = session.execute(
        update(Project)
        .where(Project.id == project_id,
               Project.status.in_([s.value for s in _ENTERED_FROM[new]]))
        .values(**values)
    )
    moved = result.rowcount == 1
    if moved:
        logger.info("project %s: -> %s", project_id, new.value)
    return moved


@dataclass(frozen=True)
class RowResult:
    """One row's outcome as it comes back from a node."""

    row_index: int
    succeeded: bool
    output: str | None       # canonical JSON text of main's return value
    error: str | None        # "ExceptionType: message"
    traceback: str | None
    cpu_seconds: float


_INSERT_TASK = text(
    "INSERT INTO tasks (project_id, row_index, status, output, error, traceback, "
    "node_id, cpu_seconds, finished_at) "
    "VALUES (:p, :i, :s, :o, :e, :t, :n, :c, :f) ON CONFLICT DO NOTHING"
)


def record_results(session: Session, project_id: int, results: Sequence[RowResult],
                   node_id: str | None) -> tuple[int, int]:
    """Store row outcomes, bump the project's counters, and complete it when every row is in.

    A row that already has a result keeps it (a retried or duplicated batch cannot count a
    row twice). Results for a project that is no longer running are not stored. Returns
    (succeeded, failed) counts actually stored.
    """
    status = session.execute(
        text("SELECT status FROM projects WHERE id = :p"), {"p": project_id}).scalar_one_or_none()
    if status != ProjectStatus.RUNNING.value:
        return (0, 0)
    now = time.time()
    stored = []
    for outcome, subset in ((TaskStatus.SUCCEEDED, [r for r in results if r.succeeded]),
                            (TaskStatus.FAILED, [r for r in results if not r.succeeded])):
        if not subset:
            stored.append(0)
            continue
        cursor = session.execute(_INSERT_TASK, [
            {"p": project_id, "i": r.row_index, "s": outcome.value, "o": r.output,
             "e": r.error, "t": r.traceback, "n": node_id, "c": r.cpu_seconds, "f": now}
            for r in subset
        ])
        stored.append(max(cursor.rowcount, 0))
    succeeded, failed = stored
    if succeeded or failed:
        session.execute(
            update(Project).where(Project.id == project_id).values(
                rows_succeeded=Project.rows_succeeded + succeeded,
                rows_failed=Project.rows_failed + failed,
            )
        )
    done = session.execute(
        text("SELECT rows_succeeded + rows_failed >= rows_total FROM projects WHERE id = :p"),
        {"p": project_id}).scalar_one()
    if done:
        transition_project(session, project_id, ProjectStatus.COMPLETE)
    return succeeded, failed


def statuses(values: Iterable[str]) -> list[ProjectStatus]:
    return [ProjectStatus(v) for v in values]
