"""Node health: every node is checked as soon as it joins, and a node that cannot do the
work is quarantined instead of failing, stalling or soaking up projects.

A node starts ``checking``: the dispatcher runs the node check there (``engine.node.entry
.check_node``: Constellation's code loads, the sandbox self-test passes, one row goes there
and back) and the node gets work only once it is ``ready``. A node whose check fails, or
whose batches fail for reasons of the node (its code cannot load, no sandbox, its worker
crashes), is ``quarantined``: no work for a back-off period that doubles each time it is
quarantined again (``quarantine_seconds`` up to ``quarantine_max_seconds``), then it is
checked again, and a pass makes it ready. Its first successful batch clears its record.
Failures of the research script itself are never the node's: they do not count here.

The reason is kept in words a volunteer can act on ("this machine cannot load
Constellation's code: No module named 'x'"), in the registry, where the Join page, the
Admin page and ``nodes --json`` show it. ``NodeHealthBook`` is the only code that changes a
node's health.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

from sqlalchemy import select, update

from engine.models import Node
from engine.nodes import short_id
from engine.node.result import BatchFailure, BatchReport, FailureKind, describe, plain_text
from engine.settings import Settings
from engine.status import NodeHealth
from engine.store import Store

logger = logging.getLogger(__name__)

# Failures that will happen again on every batch: one is enough to quarantine the node.
_DETERMINISTIC = frozenset({FailureKind.CODE_UNLOADABLE, FailureKind.SANDBOX_UNAVAILABLE})
# Failures that may be bad luck (a worker killed once): quarantine on the second in a row.
_FAILURES_BEFORE_QUARANTINE = 2
# Ray's node ids are 28 bytes; its error texts name a node so when they name one.
_NODE_ID = re.compile(r"\b[Nn]ode(?: ID|_id|Id)?[:= ]+([0-9a-f]{56})\b")
# After a failure no node answers for, the ready nodes are checked again, at most this often.
_RECHECK_SECONDS = 30.0


@dataclass
class _Record:
    health: NodeHealth = NodeHealth.CHECKING
    failures: int = 0          # infrastructure failures in a row
    quarantines: int = 0       # quarantines since the node last completed a batch
    until: float = 0.0         # end of the quarantine, wall clock
    reason: str | None = None


def ray_failure(exc: BaseException) -> tuple[str | None, BatchFailure]:
    """What a Ray error says about a batch: the node it names (if any) and the failure."""
    from ray import exceptions as rx

    found = _NODE_ID.search(plain_text(exc))
    node_id = found.group(1) if found else None
    if isinstance(exc, (rx.NodeDiedError, rx.ObjectLostError)):
        return node_id, BatchFailure(FailureKind.NODE_DIED, "the node running the batch left the cluster")
    if isinstance(exc, rx.WorkerCrashedError):
        return node_id, BatchFailure(FailureKind.WORKER_CRASHED,
                                     "the Ray worker running the batch died unexpectedly")
    if isinstance(exc, rx.RuntimeEnvSetupError):
        return node_id, BatchFailure(FailureKind.CODE_UNLOADABLE,
                                     f"the machine could not set up Constellation's code: {_root(exc)}")
    return node_id, BatchFailure(FailureKind.NODE_ERROR, _root(exc))


def _root(exc: BaseException) -> str:
    """The innermost cause of a (possibly wrapped) Ray error, in plain text on one line."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None) or exc.__cause__
        if not isinstance(inner, BaseException):
            break
        exc = inner
    text = plain_text(exc).strip()
    for prefix in ("System error: ",):
        text = text.removeprefix(prefix)
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if not first:
        return describe(exc)
    return first if ":" in first.split(" ", 1)[0] else f"{type(exc).__name__}: {first}"


class NodeHealthBook:
    """The dispatcher's view of which nodes may get work, kept in the registry too."""

    def __init__(self, store: Store, settings: Settings,
                 start_check: Callable[[str], Any] | None = None):
        self.store = store
        self.settings = settings
        self._start_check = start_check      # node id -> a Ray ObjectRef of its check
        self._records: dict[str, _Record] = {}
        self._checks: dict[Any, tuple[str, float]] = {}  # ObjectRef -> (node id, deadline)
        self._last_recheck = 0.0
        self.on_facts: Callable[[str, dict], None] = lambda node_id, facts: None

    # -- what the dispatcher asks ---------------------------------------------------------

    def ready(self, node_id: str) -> bool:
        record = self._records.get(node_id)
        return record is not None and record.health is NodeHealth.READY

    def blocked(self, alive: set[str]) -> set[str]:
        """Live nodes that must get no work now: still checking, or quarantined."""
        return {n for n in alive if not self.ready(n)}

    def reasons(self, node_ids: set[str],
                label: Callable[[str], str] = lambda node_id: f"node {short_id(node_id)}") -> list[str]:
        """Why these nodes get no work, one line each; ``label`` names a node for people."""
        lines = []
        for node_id in sorted(node_ids):
            record = self._records.get(node_id)
            if record is None or record.health is NodeHealth.CHECKING:
                lines.append(f"{label(node_id)} is being checked")
            elif record.health is NodeHealth.QUARANTINED:
                lines.append(f"{label(node_id)} is quarantined: {record.reason}")
            elif record.health is NodeHealth.REMOVED:
                lines.append(f"{label(node_id)} was removed: {record.reason}")
        return lines

    # -- the node check -------------------------------------------------------------------

    def poll(self, alive: set[str]) -> None:
        """Start checks for new nodes and for quarantines that ended; collect answers."""
        import ray

        now = time.time()
        for node_id in alive:
            record = self._records.get(node_id)
            if record is None:
                record = self._records[node_id] = self._load(node_id)
            due = (record.health is NodeHealth.CHECKING
                   or (record.health is NodeHealth.QUARANTINED and now >= record.until))
            if due and not self._checking(node_id):
                self._check(node_id)
        for node_id in set(self._records) - alive:
            self._records.pop(node_id)  # gone: if it comes back, it is checked again
        if not self._checks:
            return
        done, _ = ray.wait(list(self._checks), num_returns=len(self._checks), timeout=0)
        for ref in done:
            node_id, _deadline = self._checks.pop(ref)
            try:
                report = BatchReport.decode(ray.get(ref))
            except Exception as exc:  # a Ray error: the check could not run there
                failure = ray_failure(exc)[1]
                report = BatchReport(node_id, failure=BatchFailure(
                    failure.kind, f"the node check failed: {failure.message}"))
            self.checked(node_id, report)
        for ref, (node_id, deadline) in list(self._checks.items()):
            if node_id not in alive:
                ray.cancel(ref, force=True)
                del self._checks[ref]
            elif time.monotonic() > deadline:
                ray.cancel(ref, force=True)
                del self._checks[ref]
                self._quarantine(node_id, FailureKind.NODE_ERROR,
                                 f"it did not answer the node check within "
                                 f"{self.settings.node_check_seconds:g} s")

    def recheck(self, alive: set[str]) -> None:
        """Check ready nodes again, keeping them ready meanwhile: after a failure that no
        node answers for, the one to blame shows itself."""
        if time.monotonic() - self._last_recheck < _RECHECK_SECONDS:
            return
        self._last_recheck = time.monotonic()
        for node_id in alive:
            if self.ready(node_id) and not self._checking(node_id):
                self._check(node_id)

    def _checking(self, node_id: str) -> bool:
        return any(n == node_id for n, _ in self._checks.values())

    def _check(self, node_id: str) -> None:
        if self._start_check is None:
            return
        ref = self._start_check(node_id)
        self._checks[ref] = (node_id, time.monotonic() + self.settings.node_check_seconds)
        logger.debug("node %s: checking", short_id(node_id))

    def removed(self, node_id: str, reason: str) -> None:
        """``engine.drivers`` removed the node: it gets nothing, ever (it wrote the registry)."""
        record = self._records.setdefault(node_id, _Record())
        record.health, record.reason = NodeHealth.REMOVED, reason

    def checked(self, node_id: str, report: BatchReport) -> None:
        """What the node check on ``node_id`` found: a pass makes it ready."""
        if self._is_removed(node_id):
            return
        if report.facts:
            self.on_facts(node_id, report.facts)
        if report.failure is not None:
            self._quarantine(node_id, report.failure.kind, report.failure.message)
            return
        record = self._records.setdefault(node_id, _Record())
        if record.health is not NodeHealth.READY:
            logger.info("node %s: ready (checked in %.2f s)", short_id(node_id), report.seconds)
            record.health, record.reason = NodeHealth.READY, None
            self._write(node_id, record, checked=True)

    # -- batches --------------------------------------------------------------------------

    def batch_succeeded(self, node_id: str) -> None:
        record = self._records.get(node_id)
        if record is not None and (record.failures or record.quarantines):
            record.failures = record.quarantines = 0
            self._write(node_id, record)

    def batch_failed(self, node_id: str, failure: BatchFailure) -> None:
        """A batch failed on ``node_id`` for reasons of the node."""
        record = self._records.setdefault(node_id, _Record())
        if record.health in (NodeHealth.QUARANTINED, NodeHealth.REMOVED):
            return  # batches already in flight when it was quarantined
        record.failures += 1
        if failure.kind in _DETERMINISTIC or record.failures >= _FAILURES_BEFORE_QUARANTINE:
            self._quarantine(node_id, failure.kind, failure.message)
        else:
            self._write(node_id, record)

    def _is_removed(self, node_id: str) -> bool:
        record = self._records.get(node_id)
        return record is not None and record.health is NodeHealth.REMOVED

    def _quarantine(self, node_id: str, kind: FailureKind, reason: str) -> None:
        if self._is_removed(node_id):
            return
        record = self._records.setdefault(node_id, _Record())
        record.quarantines += 1
        seconds = min(self.settings.quarantine_max_seconds,
                      self.settings.quarantine_seconds * 2 ** (record.quarantines - 1))
        record.health, record.reason, record.until = NodeHealth.QUARANTINED, reason, time.time() + seconds
        logger.warning("node %s: quarantined for %.0f s (%s): %s", short_id(node_id), seconds,
                       kind.value, reason)
        self._write(node_id, record, checked=True)

    # -- the registry ---------------------------------------------------------------------

    def _load(self, node_id: str) -> _Record:
        """A node's record as a previous dispatcher left it: a quarantine outlives a restart;
        anything else is checked again."""
        with self.store.session() as session:
            row = session.execute(select(Node.health, Node.health_reason, Node.failures,
                                         Node.quarantined_until)
                                  .where(Node.node_id == node_id)).first()
        if row is not None and row.health == NodeHealth.REMOVED.value:
            return _Record(NodeHealth.REMOVED, reason=row.health_reason)
        if row is not None and row.health == NodeHealth.QUARANTINED.value and row.quarantined_until:
            return _Record(NodeHealth.QUARANTINED, row.failures or 0, 1, row.quarantined_until,
                           row.health_reason)
        return _Record()

    def _write(self, node_id: str, record: _Record, checked: bool = False) -> None:
        values: dict[str, Any] = {
            "health": record.health.value, "health_reason": record.reason,
            "failures": record.failures,
            "quarantined_until": record.until if record.health is NodeHealth.QUARANTINED else None}
        if checked:
            values["checked_at"] = time.time()
        with self.store.session() as session:
            session.execute(update(Node).where(Node.node_id == node_id).values(**values))
