"""The courier: takes batches to the cluster, and sees to what they bring back.

``send`` turns a batch into one Ray call of ``engine.node.entry.run_batch``: its rows
(``batch_parts``), the project's limits, and a label selector that keeps it off
the nodes ``engine.placement`` excludes for it. It is the one place a batch becomes a Ray
task (where, later, a batch would get its environment). When no live node may take it,
its rows are held in the run instead.

``take`` sees to a batch that came back:

- results go to the writer (``engine.recorder``): a batch's rows, or a volunteer's
  replicas for the rows they decide; rows a batch did not return go back to its run;
- of a batch sent twice at a project's tail (a straggler), the first copy back wins and
  the other is cancelled;
- a failure of the node's (``engine.health`` counts it against the node) sends the batch
  to another node, until it failed on ``max_batch_attempts``: then its rows fail;
- a script that raised while being imported keeps the project off that node, and fails
  the project once no live node may import it.

A run whose rows are all dispatched and stored is done (``finish_if_done``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import time
from typing import Any, Callable, Iterator

from sqlalchemy import select
from sqlalchemy.orm import Session

from engine.health import NodeHealthBook, ray_failure
from engine.models import DatasetChunk, NodeScriptFailure
from engine.node import entry
from engine.node.result import BatchFailure, BatchReport, FailureKind, RowResult
from engine.nodes import short_id
from engine.placement import Placement
from engine.recorder import ResultWriter
from engine.run import Batch, Run, Runs
from engine.settings import Settings
from engine.status import ProjectStatus, transition_project
from engine.store import Store

logger = logging.getLogger(__name__)


class Courier:
    """Sends the batches of ``runs`` and sees to what comes back."""

    def __init__(self, store: Store, settings: Settings, runs: Runs, placement: Placement,
                 health: NodeHealthBook, writer: ResultWriter, resync: Callable[[], None]):
        self.store = store
        self.settings = settings
        self.runs = runs
        self.placement = placement
        self.health = health
        self.writer = writer
        self._resync = resync  # read the registry again (a node that joined a moment ago)
        self._remote = None

    def connect(self) -> None:
        """Make the remote calls (needs a connected Ray driver)."""
        import ray

        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self._remote = ray.remote(num_cpus=1, max_retries=3)(entry.run_batch)
        check = ray.remote(num_cpus=0, max_retries=0)(entry.check_node)
        self.health._start_check = lambda node_id: check.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote()

    # -- out ----------------------------------------------------------------------------

    def send(self, run: Run, batch: Batch) -> None:
        off = self.placement.place(run, batch)
        if off is None:
            # Every live node is excluded: Ray would hold such a task forever. Keep the rows
            # here instead; the periodic check (check_feasible) decides what that means.
            run.hold(batch)
            return
        with self.store.session() as session:
            parts = batch_parts(session, run.project_id, batch.start, batch.end)
        payload = pickle.dumps((batch.start, batch.end, batch.rows, parts),
                               protocol=pickle.HIGHEST_PROTOCOL)
        remote = self._remote
        selector = self.placement.selector(off)
        if selector:
            # Keep the batch off unclaimed nodes and nodes that cannot import the script,
            # without pinning it to any node.
            remote = self._remote.options(label_selector=selector)
        # Plain values only: a node that cannot import the engine must still take the call.
        ref = remote.remote(run.source_ref, run.filename, run.columns, payload,
                            dataclasses.asdict(run.limits))
        run.inflight[ref] = dataclasses.replace(batch, dispatched_off=off if selector else frozenset())
        logger.debug("project %s: batch %d-%d (%d rows) dispatched, selector %s", run.project_id,
                     batch.start, batch.end,
                     batch.end - batch.start if batch.rows is None else len(batch.rows), selector)

    def check_feasible(self, run: Run) -> None:
        """Catch in-flight batches that no live node may run (their nodes died or were excluded
        after dispatch): cancel and hold them. When the script cannot be imported on any live
        node, the project fails, as it would had the last node reported it."""
        for ref in self.placement.stranded(run):
            stop_batch(ref)
            run.hold(run.inflight.pop(ref))
        # Quarantined and checking nodes may still import it once they are back.
        if run.held and run.cannot_import and not self.placement.importers(run):
            error = next(iter(run.cannot_import.values()))
            self.fail(run, f"the script raised while being imported: {error}")
            return
        run.held = False

    def cancel(self, run: Run) -> None:
        for ref in list(run.inflight):
            stop_batch(ref)
        run.inflight.clear()

    def fail(self, run: Run, error: str, traceback: str | None = None) -> None:
        with self.store.session() as session:
            transition_project(session, run.project_id, ProjectStatus.FAILED, error=error,
                               traceback=traceback)
        self.runs.pop(run.project_id)
        self.cancel(run)

    # -- back ---------------------------------------------------------------------------

    def arrived(self) -> Iterator[tuple[Run, Batch, Any]]:
        """The batches that came back, waiting a moment for one; a pause if none is out."""
        import ray

        refs = self.runs.refs()
        if not refs:
            time.sleep(0.05)
            return
        ready, _ = ray.wait(refs, num_returns=1, timeout=0.05)
        if not ready:
            return
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in ready:
            run = self.runs.holding(ref)
            if run is not None:
                yield run, run.inflight.pop(ref), ref

    def take(self, run: Run, batch: Batch, ref: Any) -> None:
        """See to what ``batch`` of ``run`` brought back (``ref``: its Ray reference)."""
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
            if copies and run.has_twin(batch):
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
                    stop_batch(other)
                    del run.inflight[other]
        run.sizer.observe(len(report.results), report.seconds)
        if run.replicas is not None:
            self._replicated(run, batch, node_id, report.results)
            return
        self.writer.record(run.project_id, report.results, node_id)
        run.put_back_unreturned(batch, (r[0] for r in report.results))
        self.finish_if_done(run)

    def finish_if_done(self, run: Run) -> None:
        """Let go of a run whose rows are all dispatched and stored."""
        if run.todo or run.inflight or self.writer.pending(run.project_id):
            return
        if run.followups or (run.replicas is not None and run.replicas.waiting_rows()):
            return
        self.runs.pop(run.project_id)
        logger.info("project %s: all rows dispatched and stored", run.project_id)

    def _replicated(self, run: Run, batch: Batch, node_id: str, results: list[RowResult]) -> None:
        """A volunteer's replica of some rows came back: keep it, decide what can be decided."""
        party = self.placement.party(node_id)
        if party is None:
            self._resync()  # a node that joined a moment ago
            party = self.placement.party(node_id)
        rows = [r[0] for r in results]
        if party is None or party in batch.exclude_parties:
            # An unclaimed node, or a volunteer already used for these rows: it cannot count.
            logger.warning("project %s: results from node %s cannot count towards a quorum",
                           run.project_id, short_id(node_id))
            run.put_back(batch, rows)
            return
        if not self.writer.record_replicas(run.project_id, results, node_id=node_id, party=party,
                                           tracker=run.replicas, script_sha256=run.script_sha256,
                                           parties_online=self.placement.parties_online):
            return  # the project failed on its storage quota; the refresh stops its batches
        run.put_back_unreturned(batch, rows)
        self.finish_if_done(run)

    def _note_node(self, run: Run, node_id: str, facts: dict) -> None:
        """Record a node's own facts once, and warn on a project that ran unsandboxed."""
        self.placement.note_facts(node_id, facts)
        if (facts.get("sandbox", "available") != "available" and self.settings.allow_unsandboxed
                and not run.unsandboxed):
            run.unsandboxed = True
            logger.warning("project %s: rows ran unsandboxed on node %s", run.project_id,
                           short_id(node_id))
            self.placement.update_notice(run)

    def _node_failed(self, run: Run, batch: Batch, node_id: str | None,
                     failure: BatchFailure) -> None:
        """A batch failed for reasons of the node, not of the script: run it elsewhere.

        The node is quarantined if it keeps failing (``engine.health``); the rows fail only
        once the batch failed on ``max_batch_attempts`` different nodes, or that many times
        with no other node to try, and never count towards the systematic-failure stop.
        """
        batch = self.placement.failed(batch, node_id, failure)
        if self.placement.may_retry(batch):
            where = f"node {short_id(node_id)}" if node_id else "a node Ray did not name"
            logger.warning("project %s: batch %d-%d failed on %s (%s: %s); dispatching it again",
                           run.project_id, batch.start, batch.end, where, failure.kind.value,
                           failure.message)
            self.send(run, batch)
            return
        logger.error("project %s: batch %d-%d failed on %d nodes (last: %s); failing its rows",
                     run.project_id, batch.start, batch.end, batch.nodes_failed(), failure.message)
        self.writer.record(run.project_id, batch.failed_rows(), None)
        self.finish_if_done(run)

    def _script_failed_on(self, run: Run, batch: Batch, node_id: str,
                          failure: BatchFailure) -> None:
        """The script's top-level code raised on ``node_id``: try elsewhere, or fail the project."""
        run.cannot_import[node_id] = failure.message
        if run.replicas is None and run.has_twin(batch):
            return  # a copy of this range is running elsewhere
        with self.store.session() as session:
            session.merge(NodeScriptFailure(node_id=node_id, script_sha256=run.script_sha256,
                                            project_id=run.project_id, error=failure.message,
                                            failed_at=time.time()))
        if self.placement.importers(run):
            logger.warning("project %s: the script cannot be imported on node %s (%s); "
                           "running its batches elsewhere", run.project_id, short_id(node_id),
                           failure.message)
            run.put_back(batch)
            return
        self.fail(run, f"the script raised while being imported: {failure.message}",
                  failure.traceback)


def batch_parts(session: Session, project_id: int, start: int,
                end: int) -> list[tuple[int, str | list]]:
    """The dataset chunks holding rows [start, end), for ``batch_rows`` on the node.

    A chunk inside the range goes as stored; one the range only partly covers is cut
    here, so that a small batch does not carry a whole chunk of long rows.
    """
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


def stop_batch(ref) -> None:
    """Cancel a batch, keeping its Ray worker (one still waiting for a node is just dropped).

    ``force=True`` would kill the worker process, and the next batch would wait about a
    second for Ray to start another. Without it the task gets a KeyboardInterrupt, on
    which the executor stops its sandboxed child (within a quarter of a second).
    """
    import ray

    ray.cancel(ref, force=False)
