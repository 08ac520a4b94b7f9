"""The ledger of results: the one code that writes row outcomes to the store.

It owns the write path from a batch's ``RowResult``s to the tables: a batch's accepted
rows (``record_results``), a volunteer's replicas of a replicated project
(``record_replicas``), the rows those replicas decide (``decide_rows``), and the storage
quota's check before any of it (``admit_results``). Each call writes in the caller's
transaction: the inserts (a row that already has a result keeps it, so a retried or
duplicated batch counts nothing twice), the project's counters and its stored bytes.

What the results mean for the project's status is decided by ``engine.status``
(``complete_if_done``, with the systematic-failure stop; ``transition_project`` when a
quota is exceeded), in the same transaction. This module imports ``engine.status``,
never the reverse; the engine's one writer of results (``engine.recorder``) calls it.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Sequence

from sqlalchemy import text, update
from sqlalchemy.orm import Session

from engine.models import Project
from engine.node.result import RowResult
from engine.quota import StorageQuota, added_bytes, new_rows, over_quota, result_bytes
from engine.status import (ProjectStatus, TaskStatus, Verification, complete_if_done,
                           transition_project)

logger = logging.getLogger(__name__)

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
    # The stop is looked at only when this batch stored failed rows.
    complete_if_done(session, project_id, systematic_rows=systematic_rows if failed else 0)
    return succeeded, failed


_ACCEPTED = tuple(v.value for v in Verification if v.is_accepted())
_VERIFICATIONS = tuple(v.value for v in Verification)


# A row's status from its ``ok`` flag, in SQL: ``_OUTCOME.format(the flag's expression)``.
_OUTCOME = f"CASE WHEN {{}} THEN '{TaskStatus.SUCCEEDED.value}' ELSE '{TaskStatus.FAILED.value}' END"

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
           f"{_OUTCOME.format(m)}, {m}, {m}, {m}, {node_literal}, {m}, "
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
        f"{_OUTCOME.format('s')}, o, e, t, {node_literal}, c, "
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
    complete_if_done(session, project_id)
