"""The dispatcher: fans projects' rows out over Ray in batches and stores what comes back.

One dispatcher runs at a time, holding the lease in the store; the portal's
``engine serve`` keeps one warm, and ``submit --wait`` hands its project to it (or runs
one itself when none is live). On start it recovers: projects still ``running`` resume,
and only rows without a stored result are dispatched again.

A task is one row, but rows travel in batches (one Ray call per row is ~1.4k rows/s).
Batches are contiguous row ranges. A row that already has a result keeps it, so a batch
that runs twice never counts a row twice. Batches are never pinned to a node (a task
pinned to a dead node waits forever): nodes are only excluded, with a label selector.

Two kinds of failure are kept apart (``engine.node.result.FailureKind``). The script's:
it raised while being imported on a node; that node is excluded for the project, which
fails only when no node able to run it can import it. The infrastructure's: the node
could not do the work (its code cannot load, no sandbox, a worker crash, a node death).
Those never fail rows while another node may run them, and never count towards the
systematic-failure stop: the batch goes to another node, and its rows fail (as
``NodeFailure``) only once it failed on ``max_batch_attempts`` different nodes, or that
many times with no other node to try. The node itself is quarantined by
``engine.health``, which also checks every node when it joins.

Failures of the store (disk full, a locked or read-only database) do not lose results:
the batch's results stay in memory and are written again until the write succeeds,
and the project cannot complete before they are.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import socket
import threading
import time
import uuid
from collections import deque
from typing import Any, Callable

from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError

from engine import cluster, credit, drivers, nodes, projects, replication
from engine.batching import BatchSizer
from engine.health import NodeHealthBook, ray_failure
from engine.models import DatasetChunk, DispatcherLease, Node, NodeScriptFailure, Project, Task
from engine.node import entry
from engine.node.result import BatchFailure, BatchReport, FailureKind, RowResult
from engine.node.sandbox import Limits
from engine.nodes import short_id
from engine.replication import ReplicaTracker
from engine.run import Batch, Run, missing_ranges
from engine.settings import Settings
from engine.status import (NODE_FAILURE, ProjectStatus, StorageQuota, admit_results,
                           record_results, transition_project)
from engine.store import Store
from engine.verification import Comparison

logger = logging.getLogger(__name__)

_REFRESH_SECONDS = 0.25
_NEW_WORK_SECONDS = 0.03  # how often an idle dispatcher looks for a new submission
_REGISTRY_SECONDS = 2.0
_HEAD_LOST_SECONDS = 10.0
# Once this share of a project's rows is done, its batches still in flight are also sent
# to idle CPUs: the first copy back wins (a slow or silent node no longer holds the end).
STRAGGLER_FRACTION = 0.9
_WAITING = "waiting for "  # how the notice of a project that cannot go on begins
_UNSANDBOXED = ("warning: some rows ran on a node without a working sandbox "
                "(allowed by the administrator)")


class LeaseLost(RuntimeError):
    """Another dispatcher took the lease: this one must stop at once."""


class HeadLost(RuntimeError):
    """The Ray head stopped answering; the driver must go (Ray would kill it in ~60 s)."""


class Dispatcher:
    def __init__(self, store: Store, settings: Settings):
        self.store = store
        self.settings = settings
        self.quota = StorageQuota.from_settings(settings)
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._runs: dict[int, Run] = {}
        self._owner_cycle: deque[int] = deque()
        self._remote = self._remote_fn = None
        self._max_inflight = 4
        self._alive_nodes: set[str] = set()
        self._excluded_nodes: set[str] = set()   # no work: unclaimed, checking or quarantined
        self._unclaimed: set[str] = set()         # unclaimed nodes, unless the admin allows them
        self._registered: set[str] = set()        # every node id in the registry
        self.health = NodeHealthBook(store, settings)
        self.health.on_facts = self._record_facts
        self._party_of: dict[str, str] = {}       # node id -> volunteer name, or "head"
        self._nodes_of: dict[str, set[str]] = {}  # volunteer name or "head" -> its node ids
        self._last_registry_sync = 0.0
        self._facts_recorded: set[str] = set()
        self._head_lost_since: float | None = None
        self._unstored: list[tuple[Run, list[RowResult], str | None]] = []
        self._credit_thread: threading.Thread | None = None
        self._drain: Callable[[str], None] = lambda node_id: None
        self.store_error: str = ""

    # -- lifecycle ----------------------------------------------------------------------

    def wait_for_lease(self, should_stop: Callable[[], bool] = lambda: False) -> bool:
        while not self.store.acquire_lease(self.holder, self.settings.lease_seconds):
            if should_stop():
                return False
            time.sleep(0.5)
        logger.info("dispatcher %s: holds the lease", self.holder)
        return True

    def run(self, until: Callable[[], bool] | None = None) -> None:
        """Dispatch until ``until()`` is true (never, if None). Needs the lease and Ray."""
        if not self.wait_for_lease(until or (lambda: False)):
            return
        cluster.connect(self.settings)
        import ray

        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        drivers.register(self.store, ray.get_runtime_context().get_job_id(), self.holder)
        self._drain = drivers.drain_with_ray(cluster.head_address(self.settings))
        self._remote_fn = ray.remote(num_cpus=1, max_retries=3)(entry.run_batch)
        self._remote = self._remote_fn
        check = ray.remote(num_cpus=0, max_retries=0)(entry.check_node)
        self.health._start_check = lambda node_id: check.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote()
        self._report("online", "")
        last_renew = last_refresh = 0.0
        try:
            while True:
                now = time.monotonic()
                if now - last_renew > self.settings.lease_seconds / 3:
                    self._renew()
                    last_renew = now
                if now - last_refresh > _REFRESH_SECONDS or (
                        not self._runs and now - last_refresh > _NEW_WORK_SECONDS
                        and self._submission_waiting()):
                    self._check_head()
                    if self._head_lost_since is not None:
                        time.sleep(0.5)  # Ray calls would block while the head is gone
                        continue
                    self._retry_unstored()
                    try:
                        self._refresh()
                    except SQLAlchemyError as exc:
                        logger.error("dispatcher %s: cannot read projects: %s", self.holder, exc)
                    last_refresh = now
                    if until is not None and until():
                        break
                self._fill()
                if not self._collect(timeout=0.05 if self._inflight_count() else 0.0):
                    if not self._inflight_count():
                        time.sleep(0.05)
        finally:
            for run in self._runs.values():
                self._cancel_inflight(run)
            self._runs.clear()
            if self._credit_thread is not None:
                self._credit_thread.join(timeout=10)
            self.store.release_lease(self.holder)
            logger.info("dispatcher %s: stopped", self.holder)

    def _submission_waiting(self) -> bool:
        """A cheap look for a submitted project, so that an idle dispatcher starts it at once."""
        try:
            with self.store.session() as session:
                return session.execute(select(Project.id).where(
                    Project.status == ProjectStatus.SUBMITTED.value).limit(1)).first() is not None
        except SQLAlchemyError:
            return False  # the full refresh reports store errors

    def _renew(self) -> None:
        try:
            if not self.store.acquire_lease(self.holder, self.settings.lease_seconds):
                raise LeaseLost(f"dispatcher {self.holder}: lost the lease")
            self._report("online" if self._head_lost_since is None else "unavailable",
                         self.store_error)
        except SQLAlchemyError as exc:
            # The lease outlives a few failed renewals; the store may be briefly unwritable.
            logger.error("dispatcher %s: cannot renew the lease: %s", self.holder, exc)

    def _report(self, status: str, message: str) -> None:
        """Tell the portal how the cluster is doing (through the lease row)."""
        with self.store.session() as session:
            session.execute(update(DispatcherLease).where(
                DispatcherLease.id == 1, DispatcherLease.holder == self.holder).values(
                cluster_status=status, cluster_message=message,
                cluster_cpus=float(self._max_inflight // 2)))

    def _check_head(self) -> None:
        if cluster.head_reachable(self.settings, timeout=0.5):
            self._head_lost_since = None
            return
        now = time.monotonic()
        if self._head_lost_since is None:
            self._head_lost_since = now
            logger.error("dispatcher %s: the Ray head is not answering", self.holder)
            self._report("unavailable", "the Ray head is not answering")
        elif now - self._head_lost_since > _HEAD_LOST_SECONDS:
            raise HeadLost(f"the Ray head has not answered for {_HEAD_LOST_SECONDS:.0f} s")

    # -- projects -----------------------------------------------------------------------

    def _refresh(self) -> None:
        import ray

        ray_nodes = ray.nodes()
        self._alive_nodes = {n["NodeID"] for n in ray_nodes
                             if n.get("Alive") and n.get("Resources", {}).get("CPU")}
        live = {n["NodeID"] for n in ray_nodes if n.get("Alive")}
        if (time.monotonic() - self._last_registry_sync > _REGISTRY_SECONDS
                or live - self._registered):  # a node joined: check it now
            self._sync_registry(ray_nodes)
        # Nodes are checked once they are in the registry, where what the check finds is kept.
        self.health.poll(live & self._registered)
        self._excluded_nodes = self._unclaimed | self.health.blocked(self._alive_nodes)
        usable = self._alive_nodes - self._excluded_nodes
        cpus = sum(n.get("Resources", {}).get("CPU", 0) for n in ray_nodes
                   if n["NodeID"] in usable)
        self._max_inflight = max(2, int(cpus) * 2)
        with self.store.session() as session:
            active = session.execute(
                select(Project.id, Project.status).where(
                    Project.status.in_([ProjectStatus.SUBMITTED.value, ProjectStatus.RUNNING.value]))
            ).all()
        active_ids = {pid for pid, _ in active}
        for pid in list(self._runs):
            if pid not in active_ids:  # cancelled, failed or completed elsewhere
                self._cancel_inflight(self._runs.pop(pid))
                logger.info("project %s: no longer active; dispatching stopped", pid)
        for pid, status in active:
            if pid not in self._runs:
                self._start(pid)
        for run in list(self._runs.values()):
            self._check_feasible(run)
            if run.project_id in self._runs:
                self._update_notice(run)

    def _sync_registry(self, ray_nodes: list[dict]) -> None:
        nodes.sync_registry(self.store, self.settings, ray_nodes, refresh_credit=False)
        self._registered |= {n["NodeID"] for n in ray_nodes}
        self._refresh_credit()
        self._unclaimed = nodes.excluded_node_ids(self.store, self.settings)
        # A party is who answers for a node's results: its verified volunteer, or the
        # operator (the head and trusted nodes). Unclaimed nodes never count towards a quorum.
        self._party_of = nodes.parties(self.store)
        self._nodes_of = {}
        for node_id, party in self._party_of.items():
            self._nodes_of.setdefault(party, set()).add(node_id)
        self._last_registry_sync = time.monotonic()
        self._watch_drivers()

    def _watch_drivers(self) -> None:
        """Answer any Ray driver that is not Constellation's (see engine.drivers)."""
        try:
            found = drivers.read_drivers()
        except Exception as exc:  # the GCS may be restarting; the next sync tries again
            logger.warning("dispatcher %s: cannot read Ray's drivers: %s", self.holder, exc)
            return
        for answer in drivers.watch(self.store, found, self._drain):
            if answer.removed_node:
                self.health.removed(answer.removed_node,
                                    "a driver that is not Constellation's came from it")
                self._unclaimed.add(answer.removed_node)

    def _refresh_credit(self) -> None:
        """Sum credit on a thread of its own, one refresh at a time.

        Summing a finished million-row project takes about a second; on the dispatching
        thread that second was a pause before the next project's first batch.
        """
        if self._credit_thread is not None and self._credit_thread.is_alive():
            return

        def refresh() -> None:
            try:
                credit.refresh(self.store)
            except SQLAlchemyError as exc:
                logger.error("dispatcher %s: cannot refresh credit: %s", self.holder, exc)

        self._credit_thread = threading.Thread(target=refresh, name="credit", daemon=True)
        self._credit_thread.start()

    def _parties_online(self) -> set[str]:
        return {self._party_of[n] for n in self._alive_nodes - self._excluded_nodes
                if n in self._party_of}

    def _node_label(self, node_id: str) -> str:
        """A node as the researcher reads it: "vic · laptop", from the registry."""
        with self.store.session() as session:
            return projects.label_of(node_id, session.get(Node, node_id))

    def _update_notice(self, run: Run) -> None:
        """What the project is waiting for, if anything: the one place its notice is decided."""
        notice = None
        usable = self._alive_nodes - self._excluded_nodes
        if self._alive_nodes and not usable:
            reasons = self.health.reasons(self._alive_nodes & self._excluded_nodes
                                          - self._unclaimed, self._node_label)
            notice = (f"{_WAITING}a node that can run it: "
                      + ("; ".join(reasons) if reasons else "no node may take work"))
        elif run.replicas is not None:
            online = self._parties_online()
            # The operator's own nodes settle rows alone: nothing to wait for while one is up.
            missing = 0 if nodes.TRUSTED_PARTY in online else run.replicas.replication - len(online)
            if missing > 0:
                notice = f"{_WAITING}{missing} more volunteer{'s' if missing > 1 else ''}"
        if notice is None and run.unsandboxed:
            notice = _UNSANDBOXED
        if notice != run.notice:
            run.notice = notice
            with self.store.session() as session:
                session.execute(update(Project).where(Project.id == run.project_id)
                                .values(notice=notice))
            if notice:
                logger.warning("project %s: %s", run.project_id, notice)

    def _start(self, project_id: int) -> None:
        import ray

        with self.store.session() as session:
            transition_project(session, project_id, ProjectStatus.RUNNING)
            project = session.get(Project, project_id)
            if project.status != ProjectStatus.RUNNING.value:
                return
            done = session.execute(
                select(Task.row_index).where(Task.project_id == project_id).order_by(Task.row_index)
            ).scalars()
            todo = missing_ranges(done, project.rows_total)
            run = Run(
                project_id=project_id, owner_id=project.owner_id, filename=project.script_name,
                columns=json.loads(project.columns_json),
                sizer=BatchSizer(fixed=project.batch_size or None,
                                 initial=self.settings.batch_size,
                                 target_seconds=self.settings.batch_seconds),
                rows_total=project.rows_total,
                # Node-wide limits from the settings, the project's row timeout, all capped
                # by the admin maxima.
                limits=Limits.from_settings(
                    self.settings, hidden_paths=(str(self.settings.data_path),),
                    project=project_id, row_timeout=project.row_timeout,
                    memory_bytes=(project.memory_limit_mb or self.settings.memory_limit_mb) << 20,
                    output_bytes=(project.output_limit_mb or self.settings.output_limit_mb) << 20),
                source_ref=ray.put(project.script_source),
                todo=deque(todo), script_sha256=project.script_sha256,
                # What an earlier dispatcher left: _update_notice writes only changes, so
                # it must start from it (or a stale one outlives the wait).
                notice=project.notice, unsandboxed=project.notice == _UNSANDBOXED,
                # Nodes known not to import this script (recorded before a restart).
                cannot_import=dict(session.execute(
                    select(NodeScriptFailure.node_id, NodeScriptFailure.error).where(
                        NodeScriptFailure.script_sha256 == project.script_sha256)).all()))
            if project.replication > 1:
                run.replicas = ReplicaTracker(
                    replication=project.replication, max_replicas=project.max_replicas,
                    comparison=Comparison(project.comparison), tolerance=project.tolerance,
                    spot_check_rate=self.settings.spot_check_rate)
                self._recover_replicas(session, run)
            if not todo:
                # Every row was stored before a restart; only the completion was missing.
                transition_project(session, project_id, ProjectStatus.COMPLETE)
                return
        self._runs[project_id] = run
        if run.owner_id not in self._owner_cycle:
            self._owner_cycle.append(run.owner_id)
        remaining = sum(e - s for s, e in todo)
        logger.info("project %s: dispatching %d rows (%s batches)", project_id, remaining,
                    f"fixed {run.sizer.fixed}-row" if run.sizer.fixed else "adaptive")

    def _recover_replicas(self, session, run: Run) -> None:
        """After a restart: rows with some replicas but no decision resume where they were."""
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

    def _inflight_count(self) -> int:
        return sum(len(run.inflight) for run in self._runs.values())

    def _fill(self) -> None:
        """Dispatch batches round-robin across owners, then across each owner's projects."""
        free = self._max_inflight - self._inflight_count()
        while free > 0:
            dispatched = False
            for _ in range(len(self._owner_cycle)):
                owner = self._owner_cycle[0]
                self._owner_cycle.rotate(-1)
                runs = [r for r in self._runs.values() if r.owner_id == owner and self._has_work(r)]
                if not runs:
                    continue
                run = min(runs, key=lambda r: len(r.inflight))
                if run.followups:
                    self._dispatch(run, run.followups.popleft())
                else:
                    self._dispatch(run, Batch(run.project_id, *run.next_range(max(1, self._max_inflight // 2))))
                dispatched = True
                free -= 1
                if free <= 0:
                    break
            if not dispatched:
                break
        if free > 0:
            self._duplicate_stragglers(free)
        self._owner_cycle = deque(o for o in self._owner_cycle
                                  if any(r.owner_id == o for r in self._runs.values()))

    def _has_work(self, run: Run) -> bool:
        if run.replicas is not None:
            online = self._parties_online()
            for used, rows in run.replicas.take_followups(online):
                size = max(1, run.sizer.next_size(len(rows), 1))
                for start in range(0, len(rows), size):
                    chunk = tuple(rows[start:start + size])
                    run.followups.append(Batch(run.project_id, chunk[0], chunk[-1] + 1,
                                                rows=chunk, exclude_parties=used))
        return bool(run.todo or run.followups)

    def _duplicate_stragglers(self, free: int) -> None:
        """With cores idle and 90% of a project done, run its in-flight batches a second time.

        Whichever copy finishes first is stored (a row keeps its first result) and the
        other is cancelled, so a slow or vanished node cannot hold back the end of a
        project, and no row is counted or credited twice.
        """
        for run in self._runs.values():
            if run.todo or not run.inflight or run.replicas is not None:
                continue
            with self.store.session() as session:
                project = session.get(Project, run.project_id)
                done = project.rows_succeeded + project.rows_failed
            if done < STRAGGLER_FRACTION * run.rows_total:
                continue
            for batch in sorted(run.inflight.values(), key=lambda b: b.start):
                if free <= 0:
                    return
                if batch.copy or batch.key in run.duplicated:
                    continue
                run.duplicated.add(batch.key)
                logger.info("project %s: duplicating straggler batch %d-%d on an idle core",
                            run.project_id, batch.start, batch.end)
                self._dispatch(run, Batch(run.project_id, batch.start, batch.end, batch.attempt,
                                           copy=True))
                free -= 1

    def _dispatch(self, run: Run, batch: Batch) -> None:
        excluded = self._excluded_for(run, batch)
        if self._alive_nodes and not self._alive_nodes - excluded:
            # Every live node is excluded: Ray would hold such a task forever. Keep the rows
            # here instead; the periodic check below decides what that means.
            self._hold(run, batch)
            return
        payload = pickle.dumps((batch.start, batch.end, batch.rows,
                                self._parts(run.project_id, batch.start, batch.end)),
                               protocol=pickle.HIGHEST_PROTOCOL)
        remote = self._remote
        selector = nodes.label_selector(excluded)
        if selector:
            # Keep the batch off unclaimed nodes and nodes that cannot import the script,
            # without pinning it to any node.
            remote = self._remote_fn.options(label_selector=selector)
        # Plain values only: a node that cannot import the engine must still take the call.
        ref = remote.remote(run.source_ref, run.filename, run.columns, payload,
                            dataclasses.asdict(run.limits))
        run.inflight[ref] = dataclasses.replace(
            batch, dispatched_off=frozenset(excluded) if selector else frozenset())
        logger.debug("project %s: batch %d-%d (%d rows) dispatched, selector %s", run.project_id,
                     batch.start, batch.end,
                     batch.end - batch.start if batch.rows is None else len(batch.rows), selector)

    def _excluded_for(self, run: Run, batch: Batch) -> set[str]:
        excluded = self._excluded_nodes | set(run.cannot_import)
        if self._alive_nodes - excluded - batch.failed_on:
            excluded |= batch.failed_on  # another node first; the same again only if none is left
        for party in batch.exclude_parties:
            excluded |= self._nodes_of.get(party, set())
        return excluded

    def _hold(self, run: Run, batch: Batch) -> None:
        if batch.copy:
            return  # a straggler copy is only an optimisation
        run.put_back(batch)
        run.held = True

    def _check_feasible(self, run: Run) -> None:
        """Catch in-flight batches that no live node may run (their nodes died or were excluded
        after dispatch): cancel and hold them. When the script cannot be imported on any live
        node, the project fails, as it would had the last node reported it."""
        for ref, batch in list(run.inflight.items()):
            # A node excluded when the batch went out stays excluded for it (its selector):
            # a batch sent while the head was still being checked cannot go there when its
            # own node dies, and Ray would hold it for ever.
            off = self._excluded_for(run, batch) | batch.dispatched_off
            if self._alive_nodes and not self._alive_nodes - off:
                _stop(ref)
                del run.inflight[ref]
                self._hold(run, batch)
        # Quarantined and checking nodes may still import it once they are back.
        if run.held and run.cannot_import and not (self._alive_nodes - self._unclaimed
                                                   - set(run.cannot_import)):
            error = next(iter(run.cannot_import.values()))
            with self.store.session() as session:
                transition_project(session, run.project_id, ProjectStatus.FAILED,
                                   error=f"the script raised while being imported: {error}")
            self._cancel_inflight(self._runs.pop(run.project_id))
            return
        run.held = False

    def _parts(self, project_id: int, start: int, end: int) -> list[tuple[int, str | list]]:
        """The dataset chunks holding rows [start, end), for ``batch_rows`` on the node.

        A chunk inside the range goes as stored; one the range only partly covers is cut
        here, so that a small batch does not carry a whole chunk of long rows.
        """
        with self.store.session() as session:
            chunks = session.execute(
                select(DatasetChunk.start_row, DatasetChunk.row_count, DatasetChunk.payload)
                .where(DatasetChunk.project_id == project_id,
                       DatasetChunk.start_row < end,
                       DatasetChunk.start_row + DatasetChunk.row_count > start)
                .order_by(DatasetChunk.start_row)).all()
        parts: list[tuple[int, str | list]] = []
        for first, count, text in chunks:
            if start <= first and first + count <= end:
                parts.append((first, text))
            else:
                lo, hi = max(start, first), min(end, first + count)
                parts.append((lo, json.loads(text)[lo - first:hi - first]))
        return parts

    # -- results ------------------------------------------------------------------------

    def _collect(self, timeout: float) -> bool:
        import ray

        refs = [ref for run in self._runs.values() for ref in run.inflight]
        if not refs:
            return False
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        if not ready:
            return False
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in ready:
            run = next((r for r in self._runs.values() if ref in r.inflight), None)
            if run is None:
                continue
            batch = run.inflight.pop(ref)
            self._finish(run, batch, ref)
        return True

    def _finish(self, run: Run, batch: Batch, ref: Any) -> None:
        import ray
        from ray.exceptions import RayError, TaskCancelledError

        # Straggler copies exist only for unreplicated projects; a replica follow-up covers
        # the same rows on purpose and must never be taken for a copy.
        copies = run.replicas is None
        if copies and batch.key in run.finished:
            return  # the other copy of a duplicated batch already delivered
        try:
            report = BatchReport.decode(ray.get(ref))
        except TaskCancelledError:
            return
        except RayError as exc:
            if copies and any(b.key == batch.key for b in run.inflight.values()):
                return  # its duplicate is still running and may yet deliver
            self._node_failed(run, batch, *ray_failure(exc))
            return
        node_id = report.node_id
        if report.facts:
            self._note_node(run, node_id, report.facts)
        if report.failure is not None:
            if report.failure.kind is FailureKind.SCRIPT_IMPORT:
                self._script_failed_on(run, batch, node_id, report.failure)
            else:
                self._node_failed(run, batch, node_id, report.failure)
            return
        self.health.batch_succeeded(node_id)
        # Only real results settle a range: a copy that could not run leaves its twin going.
        if copies:
            run.finished.add(batch.key)
            for other, sibling in list(run.inflight.items()):
                if sibling.key == batch.key:
                    _stop(other)
                    del run.inflight[other]
        run.sizer.observe(len(report.results), report.seconds)
        if run.replicas is not None:
            self._replicated(run, batch, node_id, report.results)
            return
        self._store(run, report.results, node_id)
        run.put_back_unreturned(batch, (r[0] for r in report.results))
        self._maybe_finish(run)

    def _replicated(self, run: Run, batch: Batch, node_id: str, results: list[RowResult]) -> None:
        """A volunteer's replica of some rows came back: keep it, decide what can be decided."""
        results = [RowResult._make(r) for r in results]
        party = self._party_of.get(node_id)
        if party is None:
            import ray

            self._sync_registry(ray.nodes())  # a node that joined a moment ago
            party = self._party_of.get(node_id)
        rows = [r.row_index for r in results]
        if party is None or party in batch.exclude_parties:
            # An unclaimed node, or a volunteer already used for these rows: it cannot count.
            logger.warning("project %s: results from node %s cannot count towards a quorum",
                           run.project_id, short_id(node_id))
            run.put_back(batch, rows)
            return
        with self.store.session() as session:
            if not admit_results(session, run.project_id, results, self.quota, party=party):
                return  # the project failed on its storage quota; _refresh stops its batches
            decided = replication.settle(session, run.replicas, run.project_id,
                                         run.script_sha256, party, node_id, results,
                                         self._parties_online())
        logger.debug("project %s: %d replicas from %s; %d rows decided, %d waiting",
                     run.project_id, len(results), party, len(decided), run.replicas.waiting_rows())
        run.put_back_unreturned(batch, (r.row_index for r in results))
        self._maybe_finish(run)

    def _record_facts(self, node_id: str, facts: dict) -> None:
        nodes.record_node_facts(self.store, node_id, **facts)
        self._facts_recorded.add(node_id)

    def _note_node(self, run: Run, node_id: str, facts: dict) -> None:
        """Record a node's own facts once, and warn on a project that ran unsandboxed."""
        if node_id not in self._facts_recorded:
            self._record_facts(node_id, facts)
        if (facts.get("sandbox", "available") != "available" and self.settings.allow_unsandboxed
                and not run.unsandboxed):
            run.unsandboxed = True
            logger.warning("project %s: rows ran unsandboxed on node %s", run.project_id,
                           short_id(node_id))
            self._update_notice(run)

    def _node_failed(self, run: Run, batch: Batch, node_id: str | None,
                     failure: BatchFailure) -> None:
        """A batch failed for reasons of the node, not of the script: run it elsewhere.

        The node is quarantined if it keeps failing (``engine.health``); the rows fail only
        once the batch failed on ``max_batch_attempts`` different nodes, or that many times
        with no other node to try, and never count towards the systematic-failure stop.
        """
        if node_id is not None:
            self.health.batch_failed(node_id, failure)
            failed_on = batch.failed_on | {node_id}
            unplaced = batch.unplaced_failures
        else:
            # Ray did not say where it ran: check the ready nodes again to find out.
            self.health.recheck(self._alive_nodes)
            failed_on, unplaced = batch.failed_on, batch.unplaced_failures + 1
        self._excluded_nodes |= self.health.blocked(self._alive_nodes)
        batch = dataclasses.replace(batch, attempt=batch.attempt + 1, copy=False,
                                    failed_on=failed_on, unplaced_failures=unplaced,
                                    last_failure=failure.message)
        where = f"node {short_id(node_id)}" if node_id else "a node Ray did not name"
        others = self._alive_nodes - self._excluded_nodes - failed_on
        distinct = len(failed_on) + unplaced
        limit = self.settings.max_batch_attempts
        if distinct < limit and (others or batch.attempt <= limit):
            logger.warning("project %s: batch %d-%d failed on %s (%s: %s); dispatching it again",
                           run.project_id, batch.start, batch.end, where, failure.kind.value,
                           failure.message)
            self._dispatch(run, batch)
            return
        logger.error("project %s: batch %d-%d failed on %d nodes (last: %s); failing its rows",
                     run.project_id, batch.start, batch.end, distinct, failure.message)
        error = (f"{NODE_FAILURE}: the batch holding this row failed on {distinct} "
                 f"node{'s' if distinct != 1 else ''} ({batch.attempt - 1} attempts); "
                 f"last: {failure.message}")
        self._store(run, [RowResult(i, False, None, error, None, 0.0)
                          for i in (batch.rows or range(batch.start, batch.end))], None)
        self._maybe_finish(run)

    def _script_failed_on(self, run: Run, batch: Batch, node_id: str,
                          failure: BatchFailure) -> None:
        """The script's top-level code raised on ``node_id``: try elsewhere, or fail the project."""
        run.cannot_import[node_id] = failure.message
        if run.replicas is None and any(b.key == batch.key for b in run.inflight.values()):
            return  # a copy of this range is running elsewhere
        with self.store.session() as session:
            session.merge(NodeScriptFailure(node_id=node_id, script_sha256=run.script_sha256,
                                            project_id=run.project_id, error=failure.message,
                                            failed_at=time.time()))
        others = self._alive_nodes - self._unclaimed - set(run.cannot_import)
        if others:
            logger.warning("project %s: the script cannot be imported on node %s (%s); "
                           "running its batches elsewhere", run.project_id, short_id(node_id),
                           failure.message)
            run.put_back(batch)
            return
        with self.store.session() as session:
            transition_project(
                session, run.project_id, ProjectStatus.FAILED,
                error=f"the script raised while being imported: {failure.message}",
                traceback=failure.traceback)
        self._cancel_inflight(self._runs.pop(run.project_id))

    def _store(self, run: Run, results: list[RowResult], node_id: str | None) -> None:
        try:
            with self.store.session() as session:
                # A project that goes over its storage quota fails here, as on the
                # systematic-failure stop, and _refresh stops its batches.
                record_results(session, run.project_id, results, node_id,
                               systematic_rows=self.settings.systematic_failure_rows,
                               quota=self.quota)
        except SQLAlchemyError as exc:
            # Keep the results and write them again later; the project cannot complete
            # meanwhile, because completion is decided in the same transaction.
            self.store_error = f"cannot write results to the database: {exc.orig or exc}"
            logger.error("project %s: %s; will retry", run.project_id, self.store_error)
            self._unstored.append((run, results, node_id))
            return
        if self.store_error and not self._unstored:
            self.store_error = ""
            logger.info("project %s: the database accepts writes again", run.project_id)

    def _retry_unstored(self) -> None:
        pending, self._unstored = self._unstored, []
        for run, results, node_id in pending:
            self._store(run, results, node_id)
        if pending and not self._unstored:
            self.store_error = ""
            for run, _results, _node in pending:
                self._maybe_finish(run)

    def _maybe_finish(self, run: Run) -> None:
        if run.todo or run.inflight or any(r is run for r, _, _ in self._unstored):
            return
        if run.followups or (run.replicas is not None and run.replicas.waiting_rows()):
            return
        self._runs.pop(run.project_id, None)
        logger.info("project %s: all rows dispatched and stored", run.project_id)

    def _cancel_inflight(self, run: Run) -> None:
        for ref in list(run.inflight):
            _stop(ref)
        run.inflight.clear()


def _stop(ref) -> None:
    """Cancel a batch, keeping its Ray worker (one still waiting for a node is just dropped).

    ``force=True`` would kill the worker process, and the next batch would wait about a
    second for Ray to start another. Without it the task gets a KeyboardInterrupt, on
    which the executor stops its sandboxed child (within a quarter of a second).
    """
    import ray

    ray.cancel(ref, force=False)
