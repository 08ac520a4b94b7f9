"""Placement: which nodes may take a project's batches, and who answers for each node.

The dispatcher never pins a batch to a node (a task pinned to a dead node waits for
ever): it only keeps batches off nodes, with a Ray label selector. ``Placement`` holds
what that needs, from ``ray.nodes()`` and the registry:

- the live nodes with CPUs (``alive``), and those of them that get no work
  (``excluded``): unclaimed ones (unless the admin allows them), and the ones
  ``engine.health`` is checking or has quarantined;
- the parties: who answers for a node's results, its verified volunteer or the operator
  (``parties``); a replica counts once per party, never per node;
- for each batch, the nodes it must be kept off (``excluded_for``): the above, the
  nodes that could not import the project's script, the nodes it already failed on
  while another is left, and every node of the parties a replica must avoid;
- what a project waits for among the nodes, in its notice (``update_notice``).

A batch keeps the nodes its selector excluded when it went out (``Batch.dispatched_off``):
Ray retries a task with the same selector, so ``stranded`` counts them too.

No Ray in here: the dispatcher passes ``ray.nodes()`` in, and the label selector out.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from sqlalchemy import select, update

from engine import nodes, projects
from engine.health import NodeHealthBook
from engine.models import Node, Project
from engine.nodes import NODE_ID_LABEL
from engine.parties import TRUSTED_PARTY
from engine.node.result import BatchFailure
from engine.run import UNSANDBOXED, Batch, Run
from engine.settings import Settings
from engine.status import NodeRole
from engine.store import Store

logger = logging.getLogger(__name__)

REGISTRY_SECONDS = 2.0  # how often the registry is brought in line with ray.nodes()
WAITING = "waiting for "  # how the notice of a project that cannot go on begins


class Placement:
    """The dispatcher's view of the nodes: who is up, who may take work, who answers."""

    def __init__(self, store: Store, settings: Settings, health: NodeHealthBook):
        self.store = store
        self.settings = settings
        self.health = health
        self.alive: set[str] = set()       # live nodes with CPUs
        self.live: set[str] = set()        # every live node (the head may have no CPUs)
        self.excluded: set[str] = set()    # no work: unclaimed, checking or quarantined
        self.unclaimed: set[str] = set()   # unclaimed nodes, unless the admin allows them
        self.registered: set[str] = set()  # every node id in the registry
        self.party_of: dict[str, str] = {}       # node id -> volunteer name, or the operator's
        self.nodes_of: dict[str, set[str]] = {}  # party -> its node ids
        self._cpus: dict[str, float] = {}
        self._facts_recorded: set[str] = set()
        self._last_sync = 0.0
        health.on_facts = self.record_facts

    # -- what the cluster says ----------------------------------------------------------

    def observe(self, ray_nodes: list[dict]) -> None:
        """Take in ``ray.nodes()``."""
        self.alive = {n["NodeID"] for n in ray_nodes
                      if n.get("Alive") and n.get("Resources", {}).get("CPU")}
        self.live = {n["NodeID"] for n in ray_nodes if n.get("Alive")}
        self._cpus = {n["NodeID"]: n.get("Resources", {}).get("CPU", 0) for n in ray_nodes}

    def sync_due(self) -> bool:
        """Time to read the registry again: it is due, or a node joined (check it now)."""
        return (time.monotonic() - self._last_sync > REGISTRY_SECONDS
                or bool(self.live - self.registered))

    def sync(self, ray_nodes: list[dict]) -> None:
        """Bring the registry in line with ``ray.nodes()`` and read back who answers for what.

        The credit tables are left to the caller (the dispatcher sums them on a thread).
        """
        nodes.sync_registry(self.store, self.settings, ray_nodes, refresh_credit=False)
        self.registered |= {n["NodeID"] for n in ray_nodes}
        self.unclaimed = excluded_node_ids(self.store, self.settings)
        # A party is who answers for a node's results: its verified volunteer, or the
        # operator (the head and trusted nodes). Unclaimed nodes never count towards a quorum.
        self.party_of = parties(self.store)
        self.nodes_of = {}
        for node_id, party in self.party_of.items():
            self.nodes_of.setdefault(party, set()).add(node_id)
        self._last_sync = time.monotonic()

    def check_health(self) -> None:
        """Let ``engine.health`` check new and returning nodes, then exclude the ones that
        may not work. Nodes are checked once they are in the registry, where what the
        check finds is kept."""
        self.health.poll(self.live & self.registered)
        self.excluded = self.unclaimed | self.health.blocked(self.alive)

    def removed(self, node_id: str, reason: str) -> None:
        """``engine.drivers`` took the node out of the cluster: it gets no work again."""
        self.health.removed(node_id, reason)
        self.unclaimed.add(node_id)

    def record_facts(self, node_id: str, facts: dict) -> None:
        """Keep what a node says about itself (its sandbox, its versions) in the registry."""
        nodes.record_node_facts(self.store, node_id, **facts)
        self._facts_recorded.add(node_id)

    def note_facts(self, node_id: str, facts: dict) -> None:
        """Facts a batch brought back: recorded once per node."""
        if node_id not in self._facts_recorded:
            self.record_facts(node_id, facts)

    # -- what the dispatcher asks -------------------------------------------------------

    def usable(self) -> set[str]:
        return self.alive - self.excluded

    def usable_cpus(self) -> float:
        return sum(self._cpus.get(n, 0) for n in self.usable())

    def parties_online(self) -> set[str]:
        return {self.party_of[n] for n in self.usable() if n in self.party_of}

    def party(self, node_id: str) -> str | None:
        """Who answers for ``node_id``'s results; None for an unclaimed or unknown node."""
        return self.party_of.get(node_id)

    def label(self, node_id: str) -> str:
        """A node as the researcher reads it: "vic · laptop", from the registry."""
        with self.store.session() as session:
            return projects.label_of(node_id, session.get(Node, node_id))

    def excluded_for(self, run: Run, batch: Batch) -> set[str]:
        """The nodes ``batch`` must be kept off now."""
        excluded = self.excluded | set(run.cannot_import)
        if self.alive - excluded - batch.failed_on:
            excluded |= batch.failed_on  # another node first; the same again only if none is left
        for party in batch.exclude_parties:
            excluded |= self.nodes_of.get(party, set())
        return excluded

    def place(self, run: Run, batch: Batch) -> frozenset[str] | None:
        """The nodes to keep ``batch`` off, or None when every live node is excluded: Ray
        would hold such a task for ever, so the caller keeps its rows instead."""
        excluded = self.excluded_for(run, batch)
        if self.alive and not self.alive - excluded:
            return None
        return frozenset(excluded)

    @staticmethod
    def selector(excluded: frozenset[str]) -> dict[str, str] | None:
        """The Ray label selector that keeps a batch off ``excluded`` (None if empty)."""
        return label_selector(excluded)

    def stranded(self, run: Run) -> list:
        """The references of ``run``'s in-flight batches that no live node may run: their
        nodes died or were excluded after dispatch. A node excluded when the batch went out
        stays excluded for it (its selector): a batch sent while the head was still being
        checked cannot go there when its own node dies, and Ray would hold it for ever."""
        return [ref for ref, batch in run.inflight.items()
                if self.alive and not self.alive - (self.excluded_for(run, batch)
                                                    | batch.dispatched_off)]

    def importers(self, run: Run) -> set[str]:
        """Live nodes that may still import ``run``'s script: quarantined and checking nodes
        count (they may once they are back), unclaimed ones and known failures do not."""
        return self.alive - self.unclaimed - set(run.cannot_import)

    def failed(self, batch: Batch, node_id: str | None, failure: BatchFailure) -> Batch:
        """``batch`` failed for reasons of the node: count it against that node
        (``engine.health``), and return the batch as it would go out again."""
        if node_id is not None:
            self.health.batch_failed(node_id, failure)
            failed_on = batch.failed_on | {node_id}
            unplaced = batch.unplaced_failures
        else:
            # Ray did not say where it ran: check the ready nodes again to find out.
            self.health.recheck(self.alive)
            failed_on, unplaced = batch.failed_on, batch.unplaced_failures + 1
        self.excluded |= self.health.blocked(self.alive)
        return dataclasses.replace(batch, attempt=batch.attempt + 1, copy=False,
                                   failed_on=failed_on, unplaced_failures=unplaced,
                                   last_failure=failure.message)

    def may_retry(self, batch: Batch) -> bool:
        """Whether a batch that failed (``failed``) goes out again: only while it failed on
        fewer than ``max_batch_attempts`` nodes, and no more than that many times when no
        other node is left to try."""
        limit = self.settings.max_batch_attempts
        others = self.alive - self.excluded - batch.failed_on
        return batch.nodes_failed() < limit and (bool(others) or batch.attempt <= limit)

    def update_notice(self, run: Run) -> None:
        """What the project is waiting for, if anything: the one place its notice is decided,
        and written when it changes."""
        notice = self.waiting_for(run)
        if notice is None and run.unsandboxed:
            notice = UNSANDBOXED
        if notice != run.notice:
            run.notice = notice
            with self.store.session() as session:
                session.execute(update(Project).where(Project.id == run.project_id)
                                .values(notice=notice))
            if notice:
                logger.warning("project %s: %s", run.project_id, notice)

    def waiting_for(self, run: Run) -> str | None:
        """What ``run`` waits for among the nodes, in words for its researcher, if anything."""
        if self.alive and not self.usable():
            reasons = self.health.reasons(self.alive & self.excluded - self.unclaimed,
                                          self.label)
            return (f"{WAITING}a node that can run it: "
                    + ("; ".join(reasons) if reasons else "no node may take work"))
        if run.replicas is not None:
            online = self.parties_online()
            # The operator's own nodes settle rows alone: nothing to wait for while one is up.
            missing = 0 if TRUSTED_PARTY in online else run.replicas.replication - len(online)
            if missing > 0:
                return f"{WAITING}{missing} more volunteer{'s' if missing > 1 else ''}"
        return None


# -- what the registry says, for placement -------------------------------------------------

def excluded_node_ids(store: Store, settings: Settings) -> set[str]:
    """Online nodes that must not run work: the unclaimed ones, unless the admin allows them."""
    if settings.allow_unclaimed_nodes:
        return set()
    with store.session() as session:
        return set(session.execute(select(Node.node_id).where(
            Node.online.is_(True), Node.role != NodeRole.HEAD.value, Node.claimed.is_(False))).scalars())


def parties(store: Store) -> dict[str, str]:
    """node id -> who answers for its results: the verified volunteer, or ``TRUSTED_PARTY``
    for the head and the nodes an admin trusts.

    Unclaimed and voided nodes are absent: their results belong to nobody. Offline nodes
    stay, because a result can arrive from a node that has just died.
    """
    with store.session() as session:
        rows = session.execute(select(Node.node_id, Node.role, Node.volunteer, Node.trusted).where(
            (Node.role == NodeRole.HEAD.value) | Node.claimed.is_(True))).all()
    return {node_id: TRUSTED_PARTY if role == NodeRole.HEAD or trusted else volunteer
            for node_id, role, volunteer, trusted in rows}


def label_selector(excluded: set[str] | frozenset[str]) -> dict[str, str] | None:
    """A Ray ``label_selector`` that keeps a task off ``excluded`` nodes (None if empty).

    It only excludes, so the task can run on any other node: it is never pinned to one.
    """
    if not excluded:
        return None
    return {NODE_ID_LABEL: f"!in({','.join(sorted(excluded))})"}
