"""The dispatcher: fans projects' rows out over Ray in batches and stores what comes back.

One dispatcher runs at a time, holding the lease in the store; the portal's
``engine serve`` keeps one warm, and ``submit --wait`` hands its project to it (or runs
one itself when none is live). On start it recovers (``recover_running``): projects still
``running`` resume, and only rows without a stored result are dispatched again.

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
and the project cannot complete before they are (``engine.recorder``, for replicated
projects and others alike).

The dispatcher's parts, each owning its data: ``engine.run`` the projects' rows (``Runs``,
``Run``, ``Batch``; ``load_run`` builds a run from the store), ``engine.placement`` the
nodes, parties and label selectors, ``engine.courier`` the batches' trips to the cluster
and back, ``engine.recorder`` the writing of results, ``engine.lease`` the lease, and
``engine.health`` the nodes' health. Here: the loop, which decides what is sent when.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from engine import cluster, credit, drivers
from engine.courier import Courier
from engine.health import NodeHealthBook
from engine.lease import Lease
from engine.models import Project
from engine.placement import Placement
from engine.recorder import ResultWriter
from engine.run import Batch, Run, Runs, load_run
from engine.settings import Settings
from engine.status import ClusterStatus, ProjectStatus
from engine.store import Store

logger = logging.getLogger(__name__)

_REFRESH_SECONDS = 0.25
_NEW_WORK_SECONDS = 0.03  # how often an idle dispatcher looks for a new submission
_HEAD_LOST_SECONDS = 10.0


class HeadLost(RuntimeError):
    """The Ray head stopped answering; the driver must go (Ray would kill it in ~60 s)."""


class Dispatcher:
    def __init__(self, store: Store, settings: Settings):
        self.store = store
        self.settings = settings
        self.lease = Lease(store, settings, cpus=lambda: self._max_inflight // 2)
        self.holder = self.lease.holder
        self.health = NodeHealthBook(store, settings)
        self.placement = Placement(store, settings, self.health)
        self.writer = ResultWriter(store, settings)
        self._runs = Runs()
        self.courier = Courier(store, settings, self._runs, self.placement, self.health,
                               self.writer, resync=self._resync)
        self._max_inflight = 4
        self._head_lost_since: float | None = None
        self._credit_thread: threading.Thread | None = None
        self._drain: Callable[[str], None] = lambda node_id: None

    @property
    def store_error(self) -> str:
        """Why the store refuses results, while it does ("" once it accepts them)."""
        return self.writer.error

    # -- the loop -----------------------------------------------------------------------

    def run(self, until: Callable[[], bool] | None = None) -> None:
        """Dispatch until ``until()`` is true (never, if None). Needs the lease and Ray.

        A turn: keep the lease; four times a second (at once when idle and a project was
        submitted) make sure the head answers, write again what the store refused, and
        look at nodes and projects; then send batches to free CPUs and take in what came
        back.
        """
        if not self.lease.wait(until or (lambda: False)):
            return
        self._connect()
        looked = 0.0
        try:
            self.recover_running()
            while True:
                now = time.monotonic()
                self.lease.keep(now, self._cluster_status(), self.store_error)
                if self._time_to_look(now - looked):
                    if not self._head_answers():
                        time.sleep(0.5)  # Ray calls would block while the head is gone
                        continue
                    self._retry_unstored()
                    self._refresh()
                    looked = now
                    if until is not None and until():
                        break
                self._fill()
                self._collect()
        finally:
            self._shut_down()

    def recover_running(self) -> list[int]:
        """Resume the projects a previous dispatcher left running; called once, at start-up.

        What was stored outlives a dispatcher (``engine.run.load_run``): each project
        resumes with only its rows without a stored result to do, its replicas stored
        without a decision waiting for their next replica, and the nodes that could not
        import its script still excluded; one whose rows were all stored is completed.
        Its batches that were in flight are dispatched again (a row keeps its first stored
        result, so none counts twice). A project missed here (the store failing) is started
        by a later refresh, as every active project is. Returns the projects resumed.
        """
        try:
            with self.store.session() as session:
                running = session.execute(select(Project.id).where(
                    Project.status == ProjectStatus.RUNNING.value).order_by(Project.id)).scalars().all()
            for project_id in running:
                self._start(project_id)
        except SQLAlchemyError as exc:
            logger.error("dispatcher %s: cannot read projects: %s", self.holder, exc)
        resumed = sorted(self._runs.ids())
        if resumed:
            logger.info("dispatcher %s: resumed projects %s", self.holder, resumed)
        return resumed

    def _connect(self) -> None:
        """Join the cluster as one of Constellation's own drivers, with the remote calls."""
        cluster.connect(self.settings)
        import ray

        drivers.register(self.store, ray.get_runtime_context().get_job_id(), self.holder)
        self._drain = drivers.drain_with_ray(cluster.head_address(self.settings))
        self.courier.connect()
        self.lease.report(ClusterStatus.ONLINE.value, "")

    def _shut_down(self) -> None:
        for run in self._runs:
            self.courier.cancel(run)
        self._runs.clear()
        if self._credit_thread is not None:
            self._credit_thread.join(timeout=10)
        self.lease.release()
        logger.info("dispatcher %s: stopped", self.holder)

    def _time_to_look(self, since: float) -> bool:
        return since > _REFRESH_SECONDS or (not self._runs and since > _NEW_WORK_SECONDS
                                            and self._submission_waiting())

    def _submission_waiting(self) -> bool:
        """A cheap look for a submitted project, so that an idle dispatcher starts it at once."""
        try:
            with self.store.session() as session:
                return session.execute(select(Project.id).where(
                    Project.status == ProjectStatus.SUBMITTED.value).limit(1)).first() is not None
        except SQLAlchemyError:
            return False  # the full refresh reports store errors

    def _cluster_status(self) -> str:
        return (ClusterStatus.ONLINE if self._head_lost_since is None
                else ClusterStatus.UNAVAILABLE).value

    def _head_answers(self) -> bool:
        if cluster.head_reachable(self.settings, timeout=0.5):
            self._head_lost_since = None
            return True
        now = time.monotonic()
        if self._head_lost_since is None:
            self._head_lost_since = now
            logger.error("dispatcher %s: the Ray head is not answering", self.holder)
            self.lease.report(ClusterStatus.UNAVAILABLE.value, "the Ray head is not answering")
        elif now - self._head_lost_since > _HEAD_LOST_SECONDS:
            raise HeadLost(f"the Ray head has not answered for {_HEAD_LOST_SECONDS:.0f} s")
        return False

    def _retry_unstored(self) -> None:
        for project_id in self.writer.retry():
            if project_id in self._runs:
                self.courier.finish_if_done(self._runs.get(project_id))

    # -- nodes and projects -------------------------------------------------------------

    def _refresh(self) -> None:
        import ray

        try:
            ray_nodes = ray.nodes()
            self.placement.observe(ray_nodes)
            if self.placement.sync_due():
                self._sync_registry(ray_nodes)
            self.placement.check_health()
            self._max_inflight = max(2, int(self.placement.usable_cpus()) * 2)
            self._see_projects()
        except SQLAlchemyError as exc:
            logger.error("dispatcher %s: cannot read projects: %s", self.holder, exc)

    def _see_projects(self) -> None:
        """Stop the runs of projects no longer active, start the new ones, and see whether
        each can go on."""
        with self.store.session() as session:
            active = session.execute(select(Project.id).where(Project.status.in_(
                [ProjectStatus.SUBMITTED.value, ProjectStatus.RUNNING.value]))).scalars().all()
        for pid in self._runs.ids() - set(active):  # cancelled, failed or completed elsewhere
            self.courier.cancel(self._runs.pop(pid))
            logger.info("project %s: no longer active; dispatching stopped", pid)
        for pid in active:
            if pid not in self._runs:
                self._start(pid)
        for run in self._runs:
            self.courier.check_feasible(run)
            if run.project_id in self._runs:
                self.placement.update_notice(run)

    def _sync_registry(self, ray_nodes: list[dict]) -> None:
        self.placement.sync(ray_nodes)
        self.refresh_credit()
        self._watch_drivers()

    def _resync(self) -> None:
        import ray

        self._sync_registry(ray.nodes())

    def _watch_drivers(self) -> None:
        """Answer any Ray driver that is not Constellation's (see engine.drivers)."""
        for answer in drivers.answer_rogues(self.store, self._drain):
            if answer.removed_node:
                self.placement.removed(answer.removed_node,
                                       "a driver that is not Constellation's came from it")

    def refresh_credit(self) -> threading.Thread:
        """Sum credit on a thread of its own, one refresh at a time; returns that thread.

        Summing a finished million-row project takes about a second; on the dispatching
        thread that second was a pause before the next project's first batch.
        """
        if self._credit_thread is not None and self._credit_thread.is_alive():
            return self._credit_thread

        def refresh() -> None:
            try:
                credit.refresh(self.store)
            except SQLAlchemyError as exc:
                logger.error("dispatcher %s: cannot refresh credit: %s", self.holder, exc)

        self._credit_thread = threading.Thread(target=refresh, name="credit", daemon=True)
        self._credit_thread.start()
        return self._credit_thread

    def _start(self, project_id: int) -> None:
        import ray

        with self.store.session() as session:
            run = load_run(session, self.settings, project_id, ray.put)
        if run is None:
            return
        self._runs.add(run)
        logger.info("project %s: dispatching %d rows (%s batches)", project_id, run.remaining(),
                    f"fixed {run.sizer.fixed}-row" if run.sizer.fixed else "adaptive")

    # -- sending batches ----------------------------------------------------------------

    def _fill(self) -> None:
        """Send batches to free CPUs, fairly (``Runs.fair_batches``); a project's last
        batches go out twice while CPUs are idle (``Runs.stragglers``)."""
        free = self._max_inflight - self._runs.inflight_count()
        cores = max(1, self._max_inflight // 2)
        for run, batch in self._runs.fair_batches(free, cores, self.placement.parties_online):
            self._dispatch(run, batch)
            free -= 1
        if free > 0:
            for run, copy in self._runs.stragglers(free, self._rows_done):
                logger.info("project %s: duplicating straggler batch %d-%d on an idle core",
                            run.project_id, copy.start, copy.end)
                self._dispatch(run, copy)
        self._runs.forget_idle_owners()

    def _rows_done(self, project_id: int) -> int:
        with self.store.session() as session:
            project = session.get(Project, project_id)
            return project.rows_succeeded + project.rows_failed

    # bench/scaling.py times these two steps of a batch.
    def _dispatch(self, run: Run, batch: Batch) -> None:
        self.courier.send(run, batch)

    def _collect(self) -> None:
        for run, batch, ref in self.courier.arrived():
            self._finish(run, batch, ref)

    def _finish(self, run: Run, batch: Batch, ref: Any) -> None:
        self.courier.take(run, batch, ref)
