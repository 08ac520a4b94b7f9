"""Rogue-driver answers without Ray: who is ours, what is removed, who is disabled."""

import time

from engine import accounts, drivers
from engine.accounts import Role
from engine.models import Node, SecurityAlert, User

HEAD, ALICE = "h" * 56, "a" * 56


def registry(store):
    now = time.time()
    accounts.create_user(store, "alice", {Role.VOLUNTEER})
    with store.session() as session:
        session.add(Node(node_id=HEAD, role="head", first_seen=now, last_seen=now, health="ready"))
        session.add(Node(node_id=ALICE, role="volunteer", volunteer="alice", claimed=True,
                         first_seen=now, last_seen=now, health="ready"))


def driver(job_id, node_id, age=60.0, ended=False):
    return drivers.Driver(job_id=job_id, node_id=node_id, ip="192.0.2.5", pid=4242,
                          started_at=time.time() - age, ended=ended, entrypoint="python loot.py")


def test_our_own_drivers_and_young_ones_are_left_alone(store):
    registry(store)
    drivers.register(store, "01000000", "vm:1:abc")
    drained = []
    assert drivers.watch(store, [driver("01000000", HEAD), driver("02000000", ALICE, age=1)],
                         drained.append) == []
    assert drained == []


def test_a_rogue_driver_on_a_volunteers_node_removes_it_and_disables_the_volunteer(store):
    registry(store)
    drained = []
    [answer] = drivers.watch(store, [driver("03000000", ALICE)], drained.append)
    assert (answer.removed_node, drained) == (ALICE, [ALICE])
    assert answer.alert.volunteer == "alice" and "disabled pending review" in answer.alert.detail
    with store.session() as session:
        assert session.get(Node, ALICE).health == "removed"
        assert session.query(User).filter_by(name="alice").one().disabled
    # Answered once: the next sync finds it again and does nothing more.
    assert drivers.watch(store, [driver("03000000", ALICE)], drained.append) == []


def test_a_driver_through_the_heads_own_raylet_is_reported_but_the_head_stays(store):
    registry(store)
    drained = []
    [answer] = drivers.watch(store, [driver("04000000", HEAD, ended=True)], drained.append)
    assert answer.removed_node is None and drained == []
    assert "the head's own machine" in answer.alert.detail
    with store.session() as session:
        assert session.get(Node, HEAD).health == "ready"
        assert session.query(SecurityAlert).count() == 1
