"""Project and task statuses, and the only code that decides them.

The vocabularies: a project's and a task's status, how a row's result was accepted
(``Verification``) and what its replicas decide (``Verdict``), a node's health, whether
it is online, whom it belongs to, and the cluster's state. tests/unit/test_layout.py fails
when one of their words is typed as a string outside this module.

The decisions: ``transition_project`` is the one way a project's status changes, along
the transition table (``_ENTERED_FROM``); ``complete_if_done`` completes a project once
every row has a result, or stops it as failed when its first rows all raised the same
exception (the systematic-failure stop); ``rerun_failed`` re-opens a finished project
for its failed rows. Each is one compare-and-set in the caller's transaction, so two
dispatchers can never both complete or double-count a project.

A terminal status is never left by the engine on its own: late results of a cancelled
project are dropped, and a complete project stays complete. The one way out is a
researcher's explicit "re-run failed rows", which starts a new attempt of the project.

Writing results is not here: ``engine.ledger`` stores them and calls these decisions in
the same transaction (it imports this module, never the reverse); the bytes and the
storage quota live in ``engine.quota``.
"""

from __future__ import annotations

import enum
import logging
import time

from sqlalchemy import text, update
from sqlalchemy.orm import Session

from engine.models import Project, failed_tasks

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


class Verdict(enum.StrEnum):
    """What a row's replicas so far decide (``engine.verification.decide``); a decided row
    is then stored with its ``Verification``."""

    VERIFIED = "verified"          # enough replicas agree, and they outnumber every other group
    MORE = "more"                  # ask one more volunteer
    INCONCLUSIVE = "inconclusive"  # no quorum, and no more replicas may (or can) be asked for


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
# imports it); tests/unit/test_layout.py checks that the two are the same.
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


def complete_if_done(session: Session, project_id: int, *, systematic_rows: int = 0) -> None:
    """Decide a running project's status after results were stored for it.

    It completes when every row has a result. With ``systematic_rows``, it first stops as
    failed when no row succeeded and its first ``systematic_rows`` failed rows all raised
    the same exception type (a broken script should not run over a million rows); rows
    that failed on their nodes (``NODE_FAILURE``) do not count.
    """
    total, ok, bad = session.execute(
        text("SELECT rows_total, rows_succeeded, rows_failed FROM projects WHERE id = :p"),
        {"p": project_id}).one()
    if systematic_rows and ok == 0 and bad >= systematic_rows:
        _stop_if_systematic(session, project_id, systematic_rows)
    if ok + bad >= total:
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

