"""engine.placement: which nodes a batch may go to, and who answers for each node.

On real SQLite, with hand-written entries shaped like ``ray.nodes()`` (no Ray cluster):
the registry, the health book and the placement are the dispatcher's own.
"""

import pytest
from sqlalchemy import select

from support import submit_numbers
from engine import accounts, nodes
from engine.accounts import Role
from engine.batching import BatchSizer
from engine.health import NodeHealthBook
from engine.models import Node, Project
from engine.node.result import BatchFailure, BatchReport, FailureKind
from engine.node.sandbox import Limits
from engine.parties import TRUSTED_PARTY
from engine.placement import Placement
from engine.replication import ReplicaTracker
from engine.run import Batch, Run
from engine.verification import Comparison

HEAD, A1, A2, B1, STRANGER = ("1" * 56, "a1" * 28, "a2" * 28, "b1" * 28, "e" * 56)
CRASH = BatchFailure(FailureKind.WORKER_CRASHED, "the Ray worker running the batch died unexpectedly")


def ray_node(node_id: str, volunteer: str | None = None, settings=None, alive: bool = True,
             head: bool = False, cpus: float = 2.0) -> dict:
    """An entry shaped like one item of ``ray.nodes()``, signed for ``volunteer``."""
    labels = {nodes.NODE_ID_LABEL: node_id}
    if volunteer:
        labels |= {nodes.VOLUNTEER_LABEL: volunteer,
                   nodes.SIGNATURE_LABEL: nodes.signature(settings, volunteer, 1)}
    resources = {"CPU": cpus, "memory": 2e9} if alive else {}
    if head and alive:
        resources["node:__internal_head__"] = 1.0
    return {"NodeID": node_id, "Alive": alive, "NodeManagerAddress": "192.0.2.9",
            "NodeManagerHostname": f"{volunteer or 'head'}-box.lan", "Resources": resources,
            "Labels": labels}


@pytest.fixture
def placement(store, settings):
    for name in ("alice", "bob"):
        accounts.create_user(store, name, {Role.VOLUNTEER})
        nodes.join_command(store, settings, name)  # gives the volunteer a signature
    return Placement(store, settings, NodeHealthBook(store, settings))


def cluster(placement, settings, *ray_nodes) -> None:
    """What a dispatcher's refresh does with ``ray.nodes()``."""
    placement.observe(list(ray_nodes))
    if placement.sync_due():
        placement.sync(list(ray_nodes))
    placement.check_health()


def ready(placement, *node_ids) -> None:
    """The node check passed on each of ``node_ids``."""
    for node_id in node_ids:
        placement.health.checked(node_id, BatchReport(node_id))
    placement.check_health()


def a_run(project_id: int = 1, replication: int = 1) -> Run:
    run = Run(project_id=project_id, owner_id=1, filename="s.py", columns=["x"],
              sizer=BatchSizer(fixed=10, initial=10), limits=Limits(), rows_total=100, source_ref=None)
    if replication > 1:
        run.replicas = ReplicaTracker(replication=replication, max_replicas=replication + 2,
                                      comparison=Comparison.EXACT, tolerance=1e-9,
                                      spot_check_rate=0.0)
    return run


def test_parties_answer_for_nodes_and_a_replica_is_kept_off_every_node_of_its_parties(
        placement, settings):
    cluster(placement, settings, ray_node(HEAD, head=True), ray_node(A1, "alice", settings),
            ray_node(A2, "alice", settings), ray_node(B1, "bob", settings), ray_node(STRANGER))
    assert placement.excluded == {HEAD, A1, A2, B1, STRANGER}  # nobody checked yet
    ready(placement, HEAD, A1, A2, B1, STRANGER)
    assert placement.party_of == {HEAD: TRUSTED_PARTY, A1: "alice", A2: "alice", B1: "bob"}
    assert placement.nodes_of["alice"] == {A1, A2}
    assert placement.excluded == {STRANGER}  # unclaimed: no work, and no party
    assert placement.parties_online() == {TRUSTED_PARTY, "alice", "bob"}
    assert placement.usable_cpus() == 8.0

    run = a_run()
    replica = Batch(1, 0, 10, rows=(3, 4), exclude_parties=frozenset({"alice"}))
    assert placement.excluded_for(run, replica) == {STRANGER, A1, A2}
    assert placement.selector(placement.place(run, replica)) == {
        nodes.NODE_ID_LABEL: f"!in({','.join(sorted({STRANGER, A1, A2}))})"}
    # A node that could not import the script is kept off every batch of the project.
    run.cannot_import[B1] = "ImportError: no numpy"
    assert placement.excluded_for(run, Batch(1, 0, 10)) == {STRANGER, B1}
    assert placement.importers(run) == {HEAD, A1, A2}


def test_a_batch_goes_to_another_node_than_the_one_it_failed_on_while_one_is_left(
        placement, settings):
    cluster(placement, settings, ray_node(HEAD, head=True), ray_node(A1, "alice", settings))
    ready(placement, HEAD, A1)
    run = a_run()
    assert placement.excluded_for(run, Batch(1, 0, 10, failed_on=frozenset({A1}))) == {A1}
    # When every other node is excluded, the node it failed on may take it again.
    run.cannot_import[HEAD] = "SyntaxError"
    assert placement.excluded_for(run, Batch(1, 0, 10, failed_on=frozenset({A1}))) == {HEAD}


def test_no_batch_is_placed_where_no_live_node_may_take_it(placement, settings):
    run = a_run()
    assert placement.place(run, Batch(1, 0, 10)) == frozenset()  # no node known yet: Ray queues it
    cluster(placement, settings, ray_node(HEAD, head=True), ray_node(STRANGER))
    ready(placement, HEAD, STRANGER)
    run.cannot_import[HEAD] = "SyntaxError"
    assert placement.place(run, Batch(1, 0, 10)) is None  # the stranger is unclaimed


def test_a_batch_stays_off_the_nodes_its_selector_excluded_after_its_own_node_dies(
        placement, settings):
    """A batch sent while the head was still being checked went out with a selector that
    excludes the head, and Ray retries it with that selector: once its own node dies, no
    live node can take it, even though the head is ready by then."""
    cluster(placement, settings, ray_node(HEAD, head=True), ray_node(A1, "alice", settings))
    ready(placement, A1)  # the head is still being checked
    run = a_run()
    off = placement.place(run, Batch(1, 0, 10))
    assert off == {HEAD}
    run.inflight["sent while the head was checked"] = Batch(1, 0, 10, dispatched_off=off)
    run.inflight["sent with no selector"] = Batch(1, 10, 20)
    ready(placement, HEAD)
    cluster(placement, settings, ray_node(HEAD, head=True), ray_node(A1, "alice", settings, alive=False))
    assert placement.alive == {HEAD} and placement.excluded == set()
    assert placement.stranded(run) == ["sent while the head was checked"]


def test_a_batch_fails_on_max_batch_attempts_nodes_before_its_rows_fail(placement, settings, store):
    cluster(placement, settings, ray_node(HEAD, head=True), ray_node(A1, "alice", settings),
            ray_node(B1, "bob", settings))
    ready(placement, HEAD, A1, B1)
    assert settings.max_batch_attempts == 3
    batch = Batch(1, 0, 3)
    for node_id in (A1, B1):
        batch = placement.failed(batch, node_id, CRASH)
        assert placement.may_retry(batch)
    assert (batch.attempt, batch.failed_on) == (3, {A1, B1})
    assert placement.usable() == {HEAD, A1, B1}  # one crash each is bad luck, not quarantine
    with store.session() as session:
        assert session.get(Node, A1).failures == 1
    batch = placement.failed(batch, HEAD, CRASH)
    assert not placement.may_retry(batch)
    assert [r.error for r in batch.failed_rows()] == [
        f"NodeFailure: the batch holding this row failed on 3 nodes (3 attempts); "
        f"last: {CRASH.message}"] * 3


def test_with_no_other_node_a_batch_fails_again_where_it_failed_up_to_the_limit(placement, settings):
    cluster(placement, settings, ray_node(HEAD, head=True))
    ready(placement, HEAD)
    batch = placement.failed(Batch(1, 0, 1), None, CRASH)  # Ray did not name the node
    assert (batch.unplaced_failures, batch.nodes_failed()) == (1, 1)
    batch = placement.failed(batch, HEAD, CRASH)
    assert placement.may_retry(batch)  # 2 nodes as far as known, attempt 3
    batch = placement.failed(batch, HEAD, CRASH)  # the second crash in a row: quarantined
    assert HEAD in placement.excluded and not placement.may_retry(batch)


def test_what_a_project_waits_for_names_nodes_and_volunteers(placement, settings, store):
    cluster(placement, settings, ray_node(A1, "alice", settings), ray_node(STRANGER))
    placement.health.batch_failed(A1, BatchFailure(FailureKind.CODE_UNLOADABLE, "no bcrypt"))
    placement.check_health()
    run = a_run()
    assert placement.waiting_for(run) == (
        "waiting for a node that can run it: alice · alice-box is quarantined: no bcrypt")
    ready(placement, A1)
    assert placement.waiting_for(run) is None
    assert placement.waiting_for(a_run(replication=3)) == "waiting for 2 more volunteers"
    cluster(placement, settings, ray_node(A1, "alice", settings), ray_node(B1, "bob", settings),
            ray_node(HEAD, head=True))
    ready(placement, B1)
    assert placement.waiting_for(a_run(replication=3)) == "waiting for 1 more volunteer"
    ready(placement, HEAD)  # the operator's own nodes settle rows alone
    assert placement.waiting_for(a_run(replication=3)) is None

    pid = submit_numbers(store, settings, "square.py", 4)
    run = a_run(project_id=pid, replication=3)
    placement.health.batch_failed(HEAD, BatchFailure(FailureKind.CODE_UNLOADABLE, "no bcrypt"))
    placement.check_health()
    placement.update_notice(run)
    with store.session() as session:
        assert session.scalar(select(Project.notice).where(Project.id == pid)) == \
            "waiting for 1 more volunteer" == run.notice
