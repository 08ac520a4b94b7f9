"""Project and task statuses, and the only code that changes them.

Every status change goes through ``transition_project``, ``record_results`` or
``rerun_failed``. Each writes the change and its side effects (results, counters,
completion, history) in the caller's transaction, as one compare-and-set, so two
dispatchers can never both complete or double-count a project.

A terminal status is never left by the engine on its own: late results of a cancelled
project are dropped, and a complete project stays complete. The one way out is a
researcher's explicit "re-run failed rows", which starts a new attempt of the project.

The words written to status-like columns are enums here too: node health, whether a node
is online, whom a node belongs to, and the cluster's state. tests/test_layout.py fails
when one of their words is typed as a string elsewhere.

Why this module is over 400 lines: the write path for results (``record_results``,
``record_replicas``, ``decide_rows``, ``admit_results`` and their inserts, about 250
lines) is still here. It is the seam to cut next, into a module of its own, but it uses
these enums, so this module cannot re-export it without an import cycle; it moves once
its callers (engine.recorder, engine.replication, 15 test files) import it from there.
The bytes and the storage quota already live apart (``engine.quota``).
"""

from __future__ import annotations

import enum
import logging
import re
import time
from typing import Sequence

from sqlalchemy import text, update
from sqlalchemy.orm import Session

from engine.models import Project, failed_tasks
from engine.node.result import RowResult
from engine.quota import StorageQuota, added_bytes, new_rows, over_quota, result_bytes

logger = logging.getLogger(__name__)


class ProjectStatus(enum.StrEnum):
    SUBMITTED = "submitted"
    RUNNING = "running"
    COMPLETE = "complete"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def is_terminal(self) -> bool:
        return self in _TERMINAL


class TaskStatus(enum.StrEnum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    def is_terminal(self) -> bool:
        """Whether the row has its outcome (a re-run of failed rows starts it again)."""
        return self is not TaskStatus.PENDING


class Verification(enum.StrEnum):
    """How a row's stored result was accepted (see ``engine.verification``)."""

    VERIFIED = "verified"                # replicas of different parties agreed
    BY_TRUST = "verified-by-trust"       # a volunteer with a long record, spot-checked
    TRUSTED = "trusted"                  # computed by the operator's own (trusted) nodes
    UNVERIFIED = "unverified"            # replication 1: nobody checked it
    INCONCLUSIVE = "inconclusive"        # replicas disagreed; every candidate is kept

    def is_accepted(self) -> bool:
        return self in (Verification.VERIFIED, Verification.BY_TRUST, Verification.TRUSTED)


class NodeHealth(enum.StrEnum):
    """Whether a node may get work. Changed by ``engine.health``, and to ``REMOVED`` by
    ``engine.drivers`` alone."""

    CHECKING = "checking"        # joined; the node check has not answered yet
    READY = "ready"              # passed its check, and its batches succeed
    QUARANTINED = "quarantined"  # failed its check or batches; no work until its back-off ends
    REMOVED = "removed"          # a rogue driver came through it (engine.drivers): no work, ever


class NodeStatus(enum.StrEnum):
    """Whether a node is in the cluster now (``NodeView.status``); whether it may get work
    is its ``NodeHealth``."""

    ONLINE = "online"
    OFFLINE = "offline"      # it left, or the head restarted and forgot it; it stays listed


class NodeRole(enum.StrEnum):
    """Who answers for a node's results (the registry's ``role``).

    A node belongs to the head (the operator's machine; nodes an admin trusts answer as
    the head too, see ``engine.parties``), to a volunteer (by name, once its signature
    verifies), or to nobody (unclaimed). A node's attribution, as lists show it, is
    ``head``, the volunteer's name, or ``unclaimed``.
    """

    HEAD = "head"
    VOLUNTEER = "volunteer"
    UNCLAIMED = "unclaimed"


class ClusterStatus(enum.StrEnum):
    """How the cluster is doing, as the dispatcher reports it through its lease row
    (``Store.cluster_health``)."""

    ONLINE = "online"
    UNAVAILABLE = "unavailable"        # the Ray head is not answering
    NO_DISPATCHER = "no dispatcher"    # no live lease: nothing runs


# The error of a row whose batch failed on too many nodes for reasons of the nodes. Such
# rows never count towards the systematic-failure stop: the script did not fail.
NODE_FAILURE = "NodeFailure"

# A literal, not a bound parameter: SQLite uses the partial index on failed rows
# (``failed_tasks``) only when the query repeats its WHERE clause word for word. The
# index's own DDL in engine.models spells it too (models cannot import this module, which
# imports it); tests/test_layout.py checks that the two are the same.
FAILED_ROW = f"status = '{TaskStatus.FAILED.value}'"

_TERMINAL = frozenset({ProjectStatus.COMPLETE, ProjectStatus.FAILED, ProjectStatus.CANCELLED})

# Which statuses each status may be entered from.
_ENTERED_FROM: dict[ProjectStatus, frozenset[ProjectStatus]] = {
    # Re-opened: a finished project's failed rows run again (rerun_failed).
    ProjectStatus.SUBMITTED: frozenset({ProjectStatus.COMPLETE, ProjectStatus.FAILED}),
    ProjectStatus.RUNNING: frozenset({ProjectStatus.SUBMITTED}),
    ProjectStatus.COMPLETE: frozenset({ProjectStatus.RUNNING}),
    ProjectStatus.FAILED: frozenset({ProjectStatus.SUBMITTED, ProjectStatus.RUNNING}),
    ProjectStatus.CANCELLED: frozenset({ProjectStatus.SUBMITTED, ProjectStatus.RUNNING}),
}


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


_INSERT_TASK = ("INSERT INTO tasks (project_id, row_index, status, output, error, traceback, "
                "node_id, cpu_seconds, finished_at, verification) VALUES ({}) "
                "ON CONFLICT DO NOTHING")
_INSERT_REPLICA = ("INSERT INTO replicas (project_id, row_index, party, node_id, status, output, "
                   "error, traceback, cpu_seconds, finished_at) VALUES ({}) ON CONFLICT DO NOTHING")


def _marker(session: Session) -> str:
    return "?" if session.get_bind().dialect.paramstyle == "qmark" else "%s"


def _sql(session: Session, template: str, columns: int) -> str:
    return template.format(", ".join([_marker(session)] * columns))


def _without_nul(session: Session, rows: list[tuple]) -> list[tuple]:
    # PostgreSQL's text cannot hold NUL, which a script's error message (or a child writing
    # junk to its result pipe) may contain; a rejected batch would be retried forever.
    # It is written as the JSON escape, so an output stays the same JSON value.
    if session.get_bind().dialect.name != "postgresql":
        return rows
    return [tuple(v.replace("\x00", "\\u0000") if v.__class__ is str else v for v in row)
            if any(v.__class__ is str and "\x00" in v for v in row) else row for row in rows]


def record_results(session: Session, project_id: int, results: Sequence[RowResult],
                   node_id: str | None, *, systematic_rows: int = 0,
                   verification: str = Verification.UNVERIFIED.value,
                   quota: StorageQuota | None = None) -> tuple[int, int]:
    """Store row outcomes, bump the project's counters, and complete it when every row is in.

    A row that already has a result keeps it (a retried or duplicated batch cannot count a
    row twice). Results for a project that is no longer running are not stored. When the
    first ``systematic_rows`` completed rows all raised the same exception type, the
    project stops as failed (a broken script should not run over a million rows). When
    storing the results would take the project or its owner over ``quota``, the project
    fails instead and none of them is stored (see ``admit_results``).
    Returns (succeeded, failed) counts actually stored.
    """
    project = session.execute(
        text("SELECT status, owner_id, stored_bytes FROM projects WHERE id = :p"),
        {"p": project_id}).one_or_none()
    if project is None or project.status != ProjectStatus.RUNNING.value:
        return (0, 0)
    size = result_bytes(results)
    if quota is not None and not _admit(session, project_id, project, results, size, quota):
        return (0, 0)
    now = time.time()
    succeeded, failed = _insert_tasks(session, project_id, [(r, node_id) for r in results],
                                      verification, now)
    if succeeded or failed:
        verified = succeeded + failed if verification in _ACCEPTED else 0
        session.execute(
            update(Project).where(Project.id == project_id).values(
                rows_succeeded=Project.rows_succeeded + succeeded,
                rows_failed=Project.rows_failed + failed,
                rows_verified=Project.rows_verified + verified,
                rows_inconclusive=Project.rows_inconclusive + (
                    succeeded + failed if verification == Verification.INCONCLUSIVE.value else 0),
                stored_bytes=Project.stored_bytes + added_bytes(
                    session, "tasks", project_id, results, succeeded + failed, size, now),
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


_ACCEPTED = tuple(v.value for v in Verification if v.is_accepted())
_VERIFICATIONS = tuple(v.value for v in Verification)


_NODE_ID = re.compile(r"[0-9a-fA-F]{1,64}")


def _insert_tasks(session: Session, project_id: int, rows: Sequence[tuple[RowResult, str | None]],
                  verification: str, now: float) -> tuple[int, int]:
    """Insert outcomes that have no result yet; returns (succeeded, failed) actually inserted."""
    nodes = {node for _, node in rows}
    if len(nodes) == 1 and verification in _VERIFICATIONS:
        node = nodes.pop()
        if node is None or _NODE_ID.fullmatch(node):
            return _insert_from_one_node(session, project_id, [r for r, _ in rows], node, now,
                                         verification)
    sql = _sql(session, _INSERT_TASK, 10)
    connection = session.connection()
    stored = []
    for outcome, keep in ((TaskStatus.SUCCEEDED.value, True), (TaskStatus.FAILED.value, False)):
        subset = [(project_id, r[0], outcome, r[2], r[3], r[4], node, r[5], now, verification)
                  for r, node in rows if bool(r[1]) is keep]
        if not subset:
            stored.append(0)
            continue
        cursor = connection.exec_driver_sql(sql, _without_nul(session, subset))
        stored.append(max(cursor.rowcount, 0))
    return stored[0], stored[1]


def _insert_from_one_node(session: Session, project_id: int, results: Sequence[RowResult],
                          node: str | None, now: float, verification: str) -> tuple[int, int]:
    # The hot path of a million-row project: the results themselves are the parameter
    # tuples, and what they share (project, node, time, verification) is written into the
    # statement, so no Python work is done per row. Every literal is engine-made and
    # checked above (an int, a hex node id, a float, a fixed word).
    m = _marker(session)
    node_literal = "NULL" if node is None else f"'{node}'"
    sql = (f"INSERT INTO tasks (project_id, row_index, status, output, error, traceback, node_id, "
           f"cpu_seconds, finished_at, verification) VALUES ({int(project_id)}, {m}, "
           f"CASE WHEN {m} THEN 'succeeded' ELSE 'failed' END, {m}, {m}, {m}, {node_literal}, {m}, "
           f"{float(now)!r}, '{verification}') ON CONFLICT DO NOTHING")
    if not results:
        return 0, 0
    if session.get_bind().dialect.name == "postgresql":
        inserted = _insert_columns(session, project_id, node_literal, now, verification, results)
    else:
        cursor = session.connection().exec_driver_sql(sql, [tuple(r) for r in results])
        inserted = max(cursor.rowcount, 0)
    if inserted == len(results):
        succeeded = sum(1 for r in results if r[1])
        return succeeded, inserted - succeeded
    # Some rows already had a result (a retried or duplicated batch): count what went in.
    counts = dict(session.execute(
        text("SELECT status, COUNT(*) FROM tasks WHERE project_id = :p AND finished_at = :now "
             "AND row_index BETWEEN :lo AND :hi GROUP BY status"),
        {"p": project_id, "now": now, "lo": min(r[0] for r in results),
         "hi": max(r[0] for r in results)}).all())
    return counts.get(TaskStatus.SUCCEEDED.value, 0), counts.get(TaskStatus.FAILED.value, 0)


def _insert_columns(session: Session, project_id: int, node_literal: str, now: float,
                    verification: str, results: Sequence[RowResult]) -> int:
    # PostgreSQL runs each row of an executemany as its own statement; one INSERT over one
    # array per column halved the head's CPU per row and raised rows/s by 1.3-2.8x
    # (50,000 results, on a busy 2-core machine).
    columns = [list(column) for column in zip(*results)]
    columns[5] = [float(c) for c in columns[5]]
    for k in (2, 3, 4):  # no NUL in PostgreSQL's text (see _without_nul)
        if "\x00" in "".join(filter(None, columns[k])):
            columns[k] = [v.replace("\x00", "\\u0000") if v else v for v in columns[k]]
    cursor = session.connection().exec_driver_sql(
        "INSERT INTO tasks (project_id, row_index, status, output, error, traceback, node_id, "
        f"cpu_seconds, finished_at, verification) SELECT {int(project_id)}, r, "
        f"CASE WHEN s THEN 'succeeded' ELSE 'failed' END, o, e, t, {node_literal}, c, "
        f"{float(now)!r}, '{verification}' FROM unnest(%s::int[], %s::bool[], %s::text[], "
        "%s::text[], %s::text[], %s::float8[]) AS u(r, s, o, e, t, c) ON CONFLICT DO NOTHING",
        tuple(columns))
    return max(cursor.rowcount, 0)


def record_replicas(session: Session, project_id: int, party: str, node_id: str,
                    results: Sequence[RowResult]) -> int:
    """Keep one volunteer's results for rows of a replicated project; returns how many were new.

    Nothing is kept for a project that has ended (cancelled, or failed on its storage
    quota while these were running). The dispatcher checks the quota first, in the same
    transaction (``admit_results``).
    """
    status = session.execute(
        text("SELECT status FROM projects WHERE id = :p"), {"p": project_id}).scalar_one_or_none()
    if status is None or ProjectStatus(status).is_terminal():
        return 0
    now = time.time()
    rows = [(project_id, r[0], party, node_id,
             TaskStatus.SUCCEEDED.value if r[1] else TaskStatus.FAILED.value,
             r[2], r[3], r[4], r[5], now) for r in results]
    if not rows:
        return 0
    cursor = session.connection().exec_driver_sql(_sql(session, _INSERT_REPLICA, 10),
                                                  _without_nul(session, rows))
    added = max(cursor.rowcount, 0)
    session.execute(update(Project).where(Project.id == project_id).values(
        executions=Project.executions + added,
        stored_bytes=Project.stored_bytes + added_bytes(
            session, "replicas", project_id, results, added, result_bytes(results), now, party)))
    return added


def admit_results(session: Session, project_id: int, results: Sequence[RowResult],
                  quota: StorageQuota, *, party: str | None = None) -> bool:
    """Whether storing ``results`` keeps the project and its owner within ``quota``.

    If not, the project fails with an error that names the quota, the size reached and
    the setting, and the caller stores none of them: the results stored before stay, and
    nothing is half-stored. With ``party`` they are that volunteer's replicas, and room is
    kept for each to become its row's accepted result as well (``decide_rows`` copies it),
    so that a replicated project does not go over its quota either. Rows already stored
    (a batch that ran twice) add nothing.
    """
    project = session.execute(
        text("SELECT status, owner_id, stored_bytes FROM projects WHERE id = :p"),
        {"p": project_id}).one_or_none()
    if project is None or project.status != ProjectStatus.RUNNING.value:
        return True  # nothing will be stored, so there is nothing to refuse
    return _admit(session, project_id, project, results, result_bytes(results), quota, party)


def _admit(session: Session, project_id: int, project, results: Sequence[RowResult], size: int,
           quota: StorageQuota, party: str | None = None) -> bool:
    copies = 1 if party is None else 2
    error = over_quota(session, project_id, project, copies * size, quota)
    if error is None:
        return True
    # Only rows without a stored result add bytes; looked up at the quota's edge only.
    fresh = new_rows(session, project_id, results, party)
    if len(fresh) < len(results):
        error = over_quota(session, project_id, project, copies * result_bytes(fresh), quota)
        if error is None:
            return True
    if transition_project(session, project_id, ProjectStatus.FAILED, error=error):
        logger.warning("project %s: %s", project_id, error)
    return False


def decide_rows(session: Session, project_id: int,
                decided: Sequence[tuple[RowResult, str | None, str, Sequence[str], Sequence[str]]]) -> None:
    """Store the outcome of rows whose replicas were decided, and complete the project if done.

    Each item is (kept result, its node, verification, parties on the winning side, every
    party that returned a replica). The replicas are marked agreed or not, which is what
    credit and trust go by.
    """
    if not decided:
        return
    status = session.execute(
        text("SELECT status FROM projects WHERE id = :p"), {"p": project_id}).scalar_one_or_none()
    if status != ProjectStatus.RUNNING.value:
        return
    succeeded = failed = verified = inconclusive = trusted = stored = 0
    for verification in {item[2] for item in decided}:
        group = [(result, node) for result, node, v, _, _ in decided if v == verification]
        now = time.time()
        ok, bad = _insert_tasks(session, project_id, group, verification, now)
        succeeded, failed = succeeded + ok, failed + bad
        # Counted, never refused: admitting the replicas kept room for these copies.
        kept = [result for result, _ in group]
        stored += added_bytes(session, "tasks", project_id, kept, ok + bad,
                               result_bytes(kept), now)
        if verification == Verification.INCONCLUSIVE.value:
            inconclusive += ok + bad
        else:
            verified += ok + bad
            if verification == Verification.TRUSTED.value:
                trusted += ok + bad
    marks = [(party in agreeing, project_id, result[0], party)
             for result, _node, _v, agreeing, parties in decided for party in parties]
    marker = _marker(session)
    session.connection().exec_driver_sql(
        f"UPDATE replicas SET agreed = {marker} WHERE project_id = {marker} "
        f"AND row_index = {marker} AND party = {marker}", marks)
    session.execute(update(Project).where(Project.id == project_id).values(
        rows_succeeded=Project.rows_succeeded + succeeded,
        rows_failed=Project.rows_failed + failed,
        rows_verified=Project.rows_verified + verified,
        rows_inconclusive=Project.rows_inconclusive + inconclusive,
        rows_trusted=Project.rows_trusted + trusted,
        stored_bytes=Project.stored_bytes + stored))
    total, ok_rows, bad_rows = session.execute(
        text("SELECT rows_total, rows_succeeded, rows_failed FROM projects WHERE id = :p"),
        {"p": project_id}).one()
    if ok_rows + bad_rows >= total:
        transition_project(session, project_id, ProjectStatus.COMPLETE)


def _stop_if_systematic(session: Session, project_id: int, rows: int) -> None:
    first = session.execute(
        text(f"SELECT error, traceback FROM {failed_tasks(session)} WHERE project_id = :p "
             f"AND {FAILED_ROW} AND error NOT LIKE :infrastructure "
             "ORDER BY finished_at, row_index LIMIT :n"),
        {"p": project_id, "n": rows, "infrastructure": f"{NODE_FAILURE}:%"}).all()
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
    if ProjectStatus(project.status) not in _ENTERED_FROM[ProjectStatus.SUBMITTED]:
        return -1
    attempt = project.attempt
    failed = failed_tasks(session)
    session.execute(text(
        "INSERT INTO task_history (project_id, row_index, attempt, status, output, error, "
        "traceback, node_id, cpu_seconds, finished_at) "
        "SELECT project_id, row_index, :a, status, output, error, traceback, node_id, "
        f"cpu_seconds, finished_at FROM {failed} WHERE project_id = :p AND {FAILED_ROW}"),
        {"p": project_id, "a": attempt})
    moved = session.execute(text(f"DELETE FROM {failed} WHERE project_id = :p AND {FAILED_ROW}"),
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

