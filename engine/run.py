"""A run: one project's work as the dispatcher holds it, with no Ray in it.

The dispatcher keeps one ``Run`` per project it is running. The run owns the project's
rows in three places:

- ``todo``: contiguous ``[start, end)`` ranges not dispatched yet, cut into batches by
  ``next_range`` at the size the run's ``BatchSizer`` measured;
- ``inflight``: the batches out on the cluster, by the Ray reference that will answer;
- for a replicated project, its ``ReplicaTracker``'s queue of follow-up rows, kept off the
  volunteers who already ran them.

Rows that must run again (their batch was held, lost, or its node could not import the
script) go back through ``put_back``, the one way back into the run.

``Runs`` holds a dispatcher's runs and deals their batches out fairly: round-robin
across owners, then across each owner's projects, and at a project's tail a second copy
of its batches still out (stragglers).

``load_run`` builds a run from the store, when a project starts and when a dispatcher
recovers the projects a previous one left running: only rows without a stored result
are to do, replicas stored without a decision wait for their next replica, and the
nodes known not to import the script stay excluded.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

from sqlalchemy import select
from sqlalchemy.orm import Session

from engine import replication
from engine.batching import BatchSizer
from engine.models import NodeScriptFailure, Project, Task
from engine.node.result import RowResult
from engine.node.sandbox import Limits
from engine.replication import ReplicaTracker
from engine.settings import Settings
from engine.status import NODE_FAILURE, ProjectStatus, transition_project
from engine.verification import Comparison

logger = logging.getLogger(__name__)

# Once this share of a project's rows is done, its batches still in flight are also sent
# to idle CPUs: the first copy back wins (a slow or silent node no longer holds the end).
STRAGGLER_FRACTION = 0.9

# The notice of a project some of whose rows ran without a sandbox.
UNSANDBOXED = ("warning: some rows ran on a node without a working sandbox "
               "(allowed by the administrator)")


@dataclass(frozen=True)
class Batch:
    """Rows sent to the cluster in one Ray call."""

    project_id: int
    start: int
    end: int
    attempt: int = 1
    copy: bool = False  # a speculative duplicate of a straggler at the tail
    # Replicated projects: an explicit set of rows, kept off the volunteers already used.
    rows: tuple[int, ...] | None = None
    exclude_parties: frozenset = frozenset()
    # Nodes this batch failed on for reasons of the node, and failures no node answered for.
    failed_on: frozenset = frozenset()
    unplaced_failures: int = 0
    last_failure: str = ""
    # The nodes its label selector keeps it off, as they were when it was dispatched: Ray
    # retries a task with the same selector, so those nodes cannot take it later either.
    dispatched_off: frozenset = frozenset()

    @property
    def key(self) -> tuple[int, int]:
        return (self.start, self.end)

    def row_indices(self) -> Iterable[int]:
        return self.rows if self.rows is not None else range(self.start, self.end)

    def nodes_failed(self) -> int:
        """On how many different nodes it failed for reasons of the node (as far as known)."""
        return len(self.failed_on) + self.unplaced_failures

    def failed_rows(self) -> list[RowResult]:
        """Its rows as failed, once it failed on too many nodes (``NODE_FAILURE``)."""
        distinct = self.nodes_failed()
        error = (f"{NODE_FAILURE}: the batch holding this row failed on {distinct} "
                 f"node{'s' if distinct != 1 else ''} ({self.attempt - 1} attempts); "
                 f"last: {self.last_failure}")
        return [RowResult(i, False, None, error, None, 0.0) for i in self.row_indices()]


@dataclass
class Run:
    """A project this dispatcher is running."""

    project_id: int
    owner_id: int
    filename: str
    columns: list[str]
    sizer: BatchSizer
    limits: Limits
    rows_total: int
    source_ref: Any
    todo: deque = field(default_factory=deque)        # (start, end) ranges not yet dispatched
    inflight: dict = field(default_factory=dict)      # ObjectRef -> Batch
    cannot_import: dict = field(default_factory=dict)  # node id -> the script's import error
    duplicated: set = field(default_factory=set)      # batch keys already copied at the tail
    finished: set = field(default_factory=set)        # batch keys whose results are stored
    script_sha256: str = ""
    replicas: ReplicaTracker | None = None            # None when replication is 1
    followups: deque = field(default_factory=deque)   # replica batches ready to dispatch
    notice: str | None = None
    unsandboxed: bool = False                         # some rows ran without a sandbox
    held: bool = False                                # rows kept back: no live node may run them

    def remaining(self) -> int:
        """Rows in ``todo``."""
        return sum(end - start for start, end in self.todo)

    def next_range(self, cores: int) -> tuple[int, int]:
        """The next batch's ``[start, end)`` off the front of ``todo``, sized by the sizer for
        ``cores`` CPUs; the rest of that range stays at the front."""
        start, end = self.todo.popleft()
        cut = start + self.sizer.next_size(self.remaining() + (end - start), cores)
        if cut < end:
            self.todo.appendleft((cut, end))
        return start, min(cut, end)

    def has_work(self, parties_online: set[str]) -> bool:
        """Whether it has a batch to send; replicas that some online volunteer not yet used
        for them could run become follow-up batches here."""
        if self.replicas is not None:
            for used, rows in self.replicas.take_followups(parties_online):
                size = max(1, self.sizer.next_size(len(rows), 1))
                for start in range(0, len(rows), size):
                    chunk = tuple(rows[start:start + size])
                    self.followups.append(Batch(self.project_id, chunk[0], chunk[-1] + 1,
                                                rows=chunk, exclude_parties=used))
        return bool(self.todo or self.followups)

    def has_twin(self, batch: Batch) -> bool:
        """Whether another batch of the same range is still out (a straggler's copy)."""
        return any(b.key == batch.key for b in self.inflight.values())

    def next_batch(self, cores: int) -> Batch:
        """A follow-up first, else the next range of ``todo``."""
        if self.followups:
            return self.followups.popleft()
        return Batch(self.project_id, *self.next_range(cores))

    def put_back(self, batch: Batch, rows: Iterable[int] | None = None) -> None:
        """``rows`` of ``batch`` (all of them by default) are to run again: a replicated
        project's to the tracker's queue, still kept off the parties the batch excluded; any
        other's to the front of ``todo``, so that they go out next."""
        if self.replicas is not None and (batch.rows is not None or rows is not None):
            self.replicas.requeue(batch.exclude_parties,
                                  list(batch.row_indices() if rows is None else rows))
        elif rows is None:
            self.todo.appendleft((batch.start, batch.end))
        else:
            for start, end in reversed(ranges_of(sorted(set(rows)))):
                self.todo.appendleft((start, end))

    def hold(self, batch: Batch) -> None:
        """No live node may run ``batch`` now: keep its rows here (``held``) until one may."""
        if batch.copy:
            return  # a straggler copy is only an optimisation
        self.put_back(batch)
        self.held = True

    def put_back_unreturned(self, batch: Batch, returned: Iterable[int]) -> None:
        """A batch came back without some of its rows (its child died mid-batch): those go
        back, and the rows that came back are done."""
        done = set(returned)
        lost = [i for i in batch.row_indices() if i not in done]
        if lost:
            self.put_back(batch, lost)


class Runs:
    """The runs a dispatcher holds, by project id, and the order they get CPUs in."""

    def __init__(self) -> None:
        self._runs: dict[int, Run] = {}
        self._owners: deque[int] = deque()  # round-robin order of the owners with a run

    def add(self, run: Run) -> None:
        self._runs[run.project_id] = run
        if run.owner_id not in self._owners:
            self._owners.append(run.owner_id)

    def pop(self, project_id: int) -> Run | None:
        return self._runs.pop(project_id, None)

    def get(self, project_id: int) -> Run | None:
        return self._runs.get(project_id)

    def ids(self) -> set[int]:
        return set(self._runs)

    def __iter__(self) -> Iterator[Run]:
        return iter(list(self._runs.values()))

    def __contains__(self, project_id: int) -> bool:
        return project_id in self._runs

    def __bool__(self) -> bool:
        return bool(self._runs)

    def clear(self) -> None:
        self._runs.clear()

    def inflight_count(self) -> int:
        return sum(len(run.inflight) for run in self._runs.values())

    def refs(self) -> list:
        return [ref for run in self._runs.values() for ref in run.inflight]

    def holding(self, ref: Any) -> Run | None:
        """The run whose batch ``ref`` answers for."""
        return next((r for r in self._runs.values() if ref in r.inflight), None)

    def fair_batches(self, free: int, cores: int,
                     parties_online: Callable[[], set[str]]) -> Iterator[tuple[Run, Batch]]:
        """Up to ``free`` batches, round-robin across owners, then across each owner's
        projects (the one with fewest batches out first). Each is taken when asked for, so
        it sees the batches sent before it."""
        while free > 0:
            dealt = False
            for _ in range(len(self._owners)):
                owner = self._owners[0]
                self._owners.rotate(-1)
                runs = [r for r in self._runs.values()
                        if r.owner_id == owner and r.has_work(parties_online())]
                if not runs:
                    continue
                run = min(runs, key=lambda r: len(r.inflight))
                yield run, run.next_batch(cores)
                dealt = True
                free -= 1
                if free <= 0:
                    break
            if not dealt:
                break

    def stragglers(self, free: int, rows_done: Callable[[int], int]) -> Iterator[tuple[Run, Batch]]:
        """Up to ``free`` second copies of the batches still out of projects whose rows are
        ``STRAGGLER_FRACTION`` done (``rows_done``: a project's succeeded and failed rows).

        Whichever copy finishes first is stored (a row keeps its first result) and the
        other is cancelled, so a slow or vanished node cannot hold back the end of a
        project, and no row is counted or credited twice. Replicated projects get none:
        their follow-ups cover the same rows on purpose.
        """
        for run in list(self._runs.values()):
            if run.todo or not run.inflight or run.replicas is not None:
                continue
            if rows_done(run.project_id) < STRAGGLER_FRACTION * run.rows_total:
                continue
            for batch in sorted(run.inflight.values(), key=lambda b: b.start):
                if free <= 0:
                    return
                if batch.copy or batch.key in run.duplicated:
                    continue
                run.duplicated.add(batch.key)
                yield run, Batch(run.project_id, batch.start, batch.end, batch.attempt, copy=True)
                free -= 1

    def forget_idle_owners(self) -> None:
        self._owners = deque(o for o in self._owners
                             if any(r.owner_id == o for r in self._runs.values()))


def ranges_of(indices: list[int]) -> list[tuple[int, int]]:
    """Sorted row indices as contiguous ``[start, end)`` ranges."""
    ranges: list[tuple[int, int]] = []
    for index in indices:
        if ranges and ranges[-1][1] == index:
            ranges[-1] = (ranges[-1][0], index + 1)
        else:
            ranges.append((index, index + 1))
    return ranges


def missing_ranges(done_indices, total: int, first: int = 0) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges in [first, total) that are not in the sorted ``done_indices``."""
    ranges = []
    expected = first
    for index in done_indices:
        if index > expected:
            ranges.append((expected, index))
        expected = max(expected, index + 1)
    if expected < total:
        ranges.append((expected, total))
    return ranges


def load_run(session: Session, settings: Settings, project_id: int,
             put: Callable[[str], Any]) -> Run | None:
    """Start (or resume) ``project_id``: its run, built from the store.

    ``put`` ships the script's source to the cluster once (``ray.put``). Returns None when
    there is nothing to run: the project is not to run, or every row was stored before a
    restart (only the completion was missing; it is completed here).
    """
    transition_project(session, project_id, ProjectStatus.RUNNING)
    project = session.get(Project, project_id)
    if project.status != ProjectStatus.RUNNING.value:
        return None
    done = session.execute(
        select(Task.row_index).where(Task.project_id == project_id).order_by(Task.row_index)
    ).scalars()
    todo = missing_ranges(done, project.rows_total)
    run = Run(
        project_id=project_id, owner_id=project.owner_id, filename=project.script_name,
        columns=json.loads(project.columns_json),
        sizer=BatchSizer(fixed=project.batch_size or None, initial=settings.batch_size,
                         target_seconds=settings.batch_seconds),
        rows_total=project.rows_total,
        # Node-wide limits from the settings, the project's row timeout, all capped by the
        # admin maxima.
        limits=Limits.from_settings(
            settings, hidden_paths=(str(settings.data_path),), project=project_id,
            row_timeout=project.row_timeout,
            memory_bytes=(project.memory_limit_mb or settings.memory_limit_mb) << 20,
            output_bytes=(project.output_limit_mb or settings.output_limit_mb) << 20),
        source_ref=put(project.script_source),
        todo=deque(todo), script_sha256=project.script_sha256,
        # What an earlier dispatcher left: the notice is written only when it changes, so
        # it must start from it (or a stale one outlives the wait).
        notice=project.notice, unsandboxed=project.notice == UNSANDBOXED,
        # Nodes known not to import this script (recorded before a restart).
        cannot_import=dict(session.execute(
            select(NodeScriptFailure.node_id, NodeScriptFailure.error).where(
                NodeScriptFailure.script_sha256 == project.script_sha256)).all()))
    if project.replication > 1:
        run.replicas = ReplicaTracker(
            replication=project.replication, max_replicas=project.max_replicas,
            comparison=Comparison(project.comparison), tolerance=project.tolerance,
            spot_check_rate=settings.spot_check_rate)
        _recover_replicas(session, run)
    if not todo:
        # Every row was stored before a restart; only the completion was missing.
        transition_project(session, project_id, ProjectStatus.COMPLETE)
        return None
    return run


def _recover_replicas(session: Session, run: Run) -> None:
    """Rows with some replicas but no decision resume where they were."""
    rows = replication.recover(session, run.replicas, run.project_id)
    if not rows:
        return
    # Those rows are not dispatched from scratch again; their next replicas are follow-ups.
    remaining = []
    for start, end in run.todo:
        remaining += missing_ranges(iter(sorted(i for i in rows if start <= i < end)), end,
                                     first=start)
    run.todo = deque(remaining)
    logger.info("project %s: %d rows resume with the replicas stored before", run.project_id,
                len(rows))
