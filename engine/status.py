"""Project and task statuses, and the only code that changes them.

Every status change goes through ``transition_project``, ``record_results`` or
``rerun_failed``. Each writes the change and its side effects (results, counters,
completion, history) in the caller's transaction, as one compare-and-set, so two
dispatchers can never both complete or double-count a project.

A terminal status is never left by the engine on its own: late results of a cancelled
project are dropped, and a complete project stays complete. The one way out is a
researcher's explicit "re-run failed rows", which starts a new attempt of the project.
"""

from __future__ import annotations

import enum
import logging
import time
from typing import NamedTuple, Sequence

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


class RowResult(NamedTuple):
    """One row's outcome as it comes back from a node.

    A NamedTuple, not a dataclass: a million of them cross Ray and the store per big
    project, and tuples pickle and unpickle several times faster.
    """

    row_index: int
    succeeded: bool
    output: str | None       # JSON text of main's return value
    error: str | None        # "ExceptionType: message"
    traceback: str | None
    cpu_seconds: float


_INSERT_TASK = ("INSERT INTO tasks (project_id, row_index, status, output, error, traceback, "
                "node_id, cpu_seconds, finished_at) VALUES ({}) ON CONFLICT DO NOTHING")


def _insert_sql(session: Session) -> str:
    marker = "?" if session.get_bind().dialect.paramstyle == "qmark" else "%s"
    return _INSERT_TASK.format(", ".join([marker] * 9))


def record_results(session: Session, project_id: int, results: Sequence[RowResult],
                   node_id: str | None, *, systematic_rows: int = 0) -> tuple[int, int]:
    """Store row outcomes, bump the project's counters, and complete it when every row is in.

    A row that already has a result keeps it (a retried or duplicated batch cannot count a
    row twice). Results for a project that is no longer running are not stored. When the
    first ``systematic_rows`` completed rows all raised the same exception type, the
    project stops as failed (a broken script should not run over a million rows).
    Returns (succeeded, failed) counts actually stored.
    """
    status = session.execute(
        text("SELECT status FROM projects WHERE id = :p"), {"p": project_id}).scalar_one_or_none()
    if status != ProjectStatus.RUNNING.value:
        return (0, 0)
    now = time.time()
    sql = _insert_sql(session)
    connection = session.connection()
    stored = []
    # Plain tuples through the driver's executemany: the named-parameter path of SQLAlchemy
    # costs several microseconds per row, which bounds a million-row project.
    for outcome, keep in ((TaskStatus.SUCCEEDED.value, True), (TaskStatus.FAILED.value, False)):
        subset = [(project_id, r[0], outcome, r[2], r[3], r[4], node_id, r[5], now)
                  for r in results if bool(r[1]) is keep]
        if not subset:
            stored.append(0)
            continue
        cursor = connection.exec_driver_sql(sql, subset)
        stored.append(max(cursor.rowcount, 0))
    succeeded, failed = stored
    if succeeded or failed:
        session.execute(
            update(Project).where(Project.id == project_id).values(
                rows_succeeded=Project.rows_succeeded + succeeded,
                rows_failed=Project.rows_failed + failed,
            )
        )
    total, ok, bad = session.execute(
        text("SELECT rows_total, rows_succeeded, rows_failed FROM projects WHERE id = :p"),
        {"p": project_id}).one()
    if systematic_rows and ok == 0 and bad >= systematic_rows and failed:
        _stop_if_systematic(session, project_id, systematic_rows)
    if ok + bad >= total:
        transition_project(session, project_id, ProjectStatus.COMPLETE)
    return succeeded, failed


def _stop_if_systematic(session: Session, project_id: int, rows: int) -> None:
    first = session.execute(
        text("SELECT error, traceback FROM tasks WHERE project_id = :p AND status = 'failed' "
             "ORDER BY finished_at, row_index LIMIT :n"), {"p": project_id, "n": rows}).all()
    kinds = {(error or "").split(":", 1)[0] for error, _ in first}
    if len(first) >= rows and len(kinds) == 1:
        kind = kinds.pop()
        example = next((tb for _, tb in first if tb), None) or first[0][0]
        transition_project(session, project_id, ProjectStatus.FAILED,
                           error=f"stopped: the first {rows} rows all raised {kind}",
                           traceback=example)


def rerun_failed(session: Session, project_id: int) -> int:
    """Start a new attempt of a finished project that re-runs only its failed rows.

    The failed outcomes move to ``task_history`` (kept, numbered by attempt), and the
    project goes back to ``submitted`` so that a dispatcher picks up the rows that now
    have no result. Returns how many rows will run again.
    """
    project = session.get(Project, project_id)
    if project.status not in (ProjectStatus.COMPLETE.value, ProjectStatus.FAILED.value):
        return -1
    attempt = project.attempt
    session.execute(text(
        "INSERT INTO task_history (project_id, row_index, attempt, status, output, error, "
        "traceback, node_id, cpu_seconds, finished_at) "
        "SELECT project_id, row_index, :a, status, output, error, traceback, node_id, "
        "cpu_seconds, finished_at FROM tasks WHERE project_id = :p AND status = 'failed'"),
        {"p": project_id, "a": attempt})
    moved = session.execute(text("DELETE FROM tasks WHERE project_id = :p AND status = 'failed'"),
                            {"p": project_id}).rowcount
    changed = session.execute(
        update(Project).where(Project.id == project_id, Project.status == project.status).values(
            status=ProjectStatus.SUBMITTED.value, attempt=attempt + 1,
            rows_failed=Project.rows_failed - moved, error=None, error_traceback=None,
            finished_at=None))
    if changed.rowcount != 1:
        raise RuntimeError(f"project {project_id} changed while it was being re-run")
    logger.info("project %s: attempt %d re-runs %d failed rows", project_id, attempt + 1, moved)
    return moved

