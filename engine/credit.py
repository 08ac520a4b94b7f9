"""Credit: the rule, written once, and the leaderboard.

The rule (shown on the Leaderboard page as ``CREDIT_RULE``; docs/credit.md explains it):
every accepted result earns the same credit whichever node produced it, namely its
project's median measured CPU seconds per accepted result, and at least one microsecond.
Accepted means succeeded and verified: in a replicated project, each volunteer's replica
on the winning side of a verified row earns.

The unit is one CPU second of verified work, kept to the microsecond (6 decimals). A row's
CPU time is measured on the node outside the sandbox, from the kernel's count for the
process that ran it, shared out over its batch by wall time and capped at that wall time
(``engine.node.meter.price``); nothing research code says about time reaches credit.
The floor is what any verified row costs a node at the least (the Ray worker alone spends
more than a microsecond on each row's result), so that every verified row visibly counts
even when the median rounds below it.

Reading a million tasks for every leaderboard view would be far too slow, so two small
tables are derived from ``tasks`` and ``replicas`` by ``refresh`` (the dispatcher calls it
on a thread of its own every few seconds, beside its registry sync; the CLI calls it
before printing):

- ``credit_rollup``: per project, node and hour, the tasks a node completed, the ones it
  earns for, their CPU seconds and its last finish time;
- ``credit_projects``: per project, the median CPU seconds per accepted task, and the
  project's counters when it was last summed, so that an unchanged project is skipped.

A project is summed again only when its counters changed, and a running one at most every
``max(2 s, 20 x the last summing time)``, which keeps refreshing under 5 % of the
dispatcher's time even for a million-row project. The leaderboard's 24 h and 7 d windows
count whole hours: "24 h" covers the current hour and the 24 before it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from sqlalchemy import delete, func, insert, select, text

from engine.errors import InvalidRequest
from engine.models import CreditRollup, Project, ProjectCredit
from engine.status import NodeRole, ProjectStatus, TaskStatus, Verification
from engine.store import Store

logger = logging.getLogger(__name__)

CREDIT_RULE = (
    "Credit is counted in CPU seconds of verified work, to the microsecond. Every accepted "
    "result earns the same credit, whichever machine produced it: its project's median CPU "
    "time per accepted result, and at least 0.000001 (one microsecond), so that every "
    "verified row counts. A row's CPU time is measured by the volunteer's machine outside "
    "the sandbox, from the operating system's count for the process that ran the research "
    "code (never from anything that code reports), and is at most the row's wall time. A "
    "result is accepted when the row succeeded and was verified: other volunteers' machines "
    "computed the same result (or, for a volunteer with a long record of agreeing, a "
    "spot-checked single run). Each volunteer whose result agreed earns. A faster machine "
    "finishes more rows per hour and so earns more per hour; a machine cannot earn more by "
    "being slow, because its own times are only a few of the many that make the median. "
    "Unverified results, the work of the head and of the operator's trusted machines, and "
    "unclaimed machines (whose signature does not verify) earn nothing. Windows count whole "
    "hours: 24 h is the current hour and the 24 before it."
)

# The least an accepted result earns, in CPU seconds (see the module's docstring).
CREDIT_FLOOR_SECONDS = 1e-6
# Credit and CPU time are reported to the microsecond.
CREDIT_DECIMALS = 6

WINDOWS = {"24h": 24, "7d": 7 * 24, "all": None}

_MIN_REFRESH_SECONDS = 2.0
_REFRESH_COST_FACTOR = 20.0


# The results that earn: verified ones. A replicated project's executions are its
# replicas, and each replica on the winning side of a verified row earns (every volunteer
# who did the agreed work, BOINC-style). A project with verification turned off
# (replication 1) stores plain tasks, marked unverified: they earn nothing, because a
# node could return anything for them.
# Trusted results (the head's and trusted nodes') are accepted too, but earn nothing.
ACCEPTED_VERIFICATIONS = (Verification.VERIFIED.value, Verification.BY_TRUST.value)

# (source table, SQL for "this execution is accepted") by whether the project replicates.
_SOURCES = {
    True: ("replicas", f"x.agreed = TRUE AND x.status = '{TaskStatus.SUCCEEDED.value}'"),
    False: ("tasks", f"x.status = '{TaskStatus.SUCCEEDED.value}' AND x.verification IN ("
                     + ", ".join(f"'{v}'" for v in ACCEPTED_VERIFICATIONS) + ")"),
}


# The UNIX hour of a finish time. SQLite's CAST truncates; PostgreSQL's rounds, so it floors.
_HOUR = {"sqlite": "CAST(x.finished_at / 3600 AS INTEGER)",
         "postgresql": "CAST(FLOOR(x.finished_at / 3600) AS INTEGER)"}


def _rollup_sql(replicated: bool, dialect: str = "sqlite"):
    table, accepted = _SOURCES[replicated]
    earns = f"{accepted} AND (n.revoked_at IS NULL OR x.finished_at < n.revoked_at)"
    return text(f"""
        SELECT x.node_id, {_HOUR[dialect]} AS hour, COUNT(*),
               SUM(CASE WHEN {earns} THEN 1 ELSE 0 END),
               SUM(CASE WHEN {earns} THEN x.cpu_seconds ELSE 0 END),
               MAX(x.finished_at)
        FROM {table} AS x LEFT JOIN nodes AS n ON n.node_id = x.node_id
        WHERE x.project_id = :p AND x.node_id IS NOT NULL
        GROUP BY x.node_id, hour
    """)


def _replicated(session, project_id: int) -> bool:
    return (session.get(Project, project_id).replication or 1) > 1


def project_median(session, project_id: int) -> tuple[float, int]:
    """(median CPU seconds per accepted execution, accepted executions) of one project."""
    table, accepted = _SOURCES[_replicated(session, project_id)]
    count = session.execute(text(
        f"SELECT COUNT(*) FROM {table} AS x WHERE x.project_id = :p AND {accepted}"),
        {"p": project_id}).scalar_one()
    if count == 0:
        return 0.0, 0
    middle = session.execute(text(
        f"SELECT x.cpu_seconds FROM {table} AS x WHERE x.project_id = :p AND {accepted} "
        f"ORDER BY x.cpu_seconds LIMIT :n OFFSET :k"),
        {"p": project_id, "n": 2 - count % 2, "k": (count - 1) // 2}).scalars().all()
    return sum(middle) / len(middle), count


def refresh_interval(entry: ProjectCredit) -> float:
    """How long a running project's sums stand before they are summed again: at least
    ``_MIN_REFRESH_SECONDS``, and 20 times what the last summing took, so that summing a
    large project never takes more than a twentieth of the time."""
    return max(_MIN_REFRESH_SECONDS, _REFRESH_COST_FACTOR * entry.refresh_seconds)


def refresh(store: Store, *, force: bool = False) -> int:
    """Bring the credit tables up to date with ``tasks``; returns how many projects were summed."""
    now = time.time()
    with store.session() as session:
        projects = session.execute(select(
            Project.id, Project.status, Project.rows_succeeded, Project.rows_failed,
            Project.rows_verified, Project.executions, Project.attempt)).all()
        cached = {c.project_id: c for c in session.execute(select(ProjectCredit)).scalars()}
    summed = 0
    for pid, status, *counters in projects:
        snapshot = ":".join(str(c) for c in (status, *counters))
        entry = cached.get(pid)
        if entry is not None and not force:
            if entry.snapshot == snapshot:
                continue
            running = not ProjectStatus(status).is_terminal()
            if running and now - entry.refreshed_at < refresh_interval(entry):
                continue
        _sum_project(store, pid, snapshot)
        summed += 1
    return summed


def _sum_project(store: Store, project_id: int, snapshot: str) -> None:
    # Read first, write after: the sums take about a second over a million tasks, and in
    # SQLite a write transaction would hold off every other writer (the dispatcher storing
    # results) for that long. Reads do not block writers in WAL mode.
    started = time.perf_counter()
    with store.session() as session:
        median, accepted = project_median(session, project_id)
        rows = session.execute(_rollup_sql(_replicated(session, project_id),
                                           session.get_bind().dialect.name),
                               {"p": project_id}).all()
    with store.session() as session:
        session.execute(delete(CreditRollup).where(CreditRollup.project_id == project_id))
        if rows:
            session.execute(insert(CreditRollup), [
                {"project_id": project_id, "node_id": node_id, "hour": hour,
                 "completed": completed, "accepted": earned, "cpu_seconds": cpu,
                 "last_finished": last}
                for node_id, hour, completed, earned, cpu, last in rows])
        entry = session.get(ProjectCredit, project_id) or ProjectCredit(project_id=project_id)
        # What each accepted result earns: the median, at least the floor.
        entry.median_cpu_seconds = max(median, CREDIT_FLOOR_SECONDS) if accepted else 0.0
        entry.accepted, entry.snapshot = accepted, snapshot
        entry.refreshed_at = time.time()
        entry.refresh_seconds = time.perf_counter() - started
        session.merge(entry)
    logger.debug("project %s: credit summed (%d accepted, median %.4f s) in %.3f s",
                 project_id, accepted, median, time.perf_counter() - started)


@dataclass(frozen=True)
class LeaderboardRow:
    """One row of ``leaderboard --json`` and the Leaderboard page."""

    rank: int
    volunteer: str
    credit: float
    tasks: int
    cpu_seconds: float
    nodes: int
    last_active: str | None

    def to_dict(self) -> dict:
        return asdict(self)


_LEADERBOARD = text(f"""
    SELECT n.volunteer, SUM(r.accepted), SUM(r.accepted * c.median_cpu_seconds),
           SUM(r.cpu_seconds), COUNT(DISTINCT r.node_id), MAX(r.last_finished)
    FROM credit_rollup AS r
    JOIN nodes AS n ON n.node_id = r.node_id
    JOIN credit_projects AS c ON c.project_id = r.project_id
    WHERE r.hour >= :since AND r.accepted > 0 AND n.volunteer IS NOT NULL AND n.role != '{NodeRole.HEAD.value}'
      AND n.trusted IS NOT TRUE
    GROUP BY n.volunteer
""")


def leaderboard(store: Store, window: str = "all") -> list[LeaderboardRow]:
    """Volunteers ranked by credit in ``window`` ("24h", "7d" or "all"); ties share a rank.

    Reads only the credit tables: call ``refresh`` first when no dispatcher keeps them fresh.
    """
    if window not in WINDOWS:
        raise InvalidRequest(f"unknown window {window!r}; use one of {', '.join(WINDOWS)}")
    hours = WINDOWS[window]
    since = 0 if hours is None else int(time.time() // 3600) - hours
    with store.session() as session:
        rows = session.execute(_LEADERBOARD, {"since": since}).all()
    rows = sorted(rows, key=lambda r: (-r[2], r[0]))
    board: list[LeaderboardRow] = []
    for position, (volunteer, tasks, credit, cpu, nodes, last) in enumerate(rows, start=1):
        rank = board[-1].rank if board and round(board[-1].credit, 9) == round(credit, 9) else position
        board.append(LeaderboardRow(
            rank=rank, volunteer=volunteer, credit=round(credit, CREDIT_DECIMALS), tasks=int(tasks),
            cpu_seconds=round(cpu, CREDIT_DECIMALS), nodes=int(nodes),
            last_active=datetime.fromtimestamp(last, timezone.utc).isoformat(timespec="seconds")))
    return board


def node_activity(store: Store, node_ids: list[str]) -> dict[str, tuple[int, float | None]]:
    """node id -> (tasks completed, last finish time), from the credit tables."""
    if not node_ids:
        return {}
    with store.session() as session:
        rows = session.execute(
            select(CreditRollup.node_id, func.sum(CreditRollup.completed),
                   func.max(CreditRollup.last_finished))
            .where(CreditRollup.node_id.in_(node_ids)).group_by(CreditRollup.node_id)).all()
    return {node_id: (int(completed), last) for node_id, completed, last in rows}
