"""Quorum decisions and comparisons: pure logic, no Ray."""

import json

from engine.node.result import RowResult
from engine.verification import Comparison, agree, decide


def ok(value):
    return RowResult(0, True, json.dumps(value), None, None, 0.0)


def err(text):
    return RowResult(0, False, None, text, None, 0.0)


EXACT, NUMERIC = Comparison.EXACT, Comparison.NUMERIC


def d(replicas, replication=2, max_replicas=4, comparison=EXACT, unused=True):
    return decide(replicas, replication=replication, max_replicas=max_replicas,
                  comparison=comparison, tolerance=1e-9, unused_party_online=unused)


def test_exact_ignores_key_order_but_not_values():
    assert agree(ok({"a": 1, "b": [1, 2]}), RowResult(0, True, '{"b":[1,2],"a":1}', None, None, 0), EXACT, 0)
    assert not agree(ok(0.1 + 0.2), ok(0.3), EXACT, 1e-9)


def test_numeric_accepts_last_bit_differences_recursively():
    a = sum([0.1] * 10)
    b = 1.0
    assert a != b
    assert agree(ok({"s": [a, "x"]}), ok({"s": [b, "x"]}), NUMERIC, 1e-9)
    assert not agree(ok({"s": [a, "x"]}), ok({"s": [b, "y"]}), NUMERIC, 1e-9)   # strings exact
    assert not agree(ok({"s": 1.0}), ok({"t": 1.0}), NUMERIC, 1e-9)             # keys exact
    assert not agree(ok(1.0), ok(1.001), NUMERIC, 1e-9)
    assert not agree(ok(True), ok(1), NUMERIC, 1e-9)


def test_failed_rows_agree_on_exception_type():
    assert agree(err("ValueError: x is 1"), err("ValueError: x is 2"), EXACT, 0)
    assert not agree(err("ValueError: x"), err("KeyError: x"), EXACT, 0)
    assert not agree(err("ValueError: x"), ok(1), EXACT, 0)


def test_quorum_decisions():
    assert d([ok(1)]).verdict == "more"
    assert d([ok(1), ok(1)]) .verdict == "verified"
    assert d([ok(1), ok(2)]).verdict == "more"
    assert d([ok(1), ok(2), ok(1)]).agreeing == (0, 2)
    assert d([ok(1), ok(2), ok(3), ok(4)]).verdict == "inconclusive"      # max_replicas reached
    assert d([ok(1), ok(2), ok(3)], max_replicas=5).verdict == "more"
    assert d([ok(1), ok(2)], unused=False).verdict == "inconclusive"       # nobody left to ask
    assert d([ok(1)], unused=False).verdict == "more"                       # first quorum waits
    assert d([ok(1), ok(2), ok(1), ok(2)], max_replicas=6).verdict == "more"  # a tie is no majority
    assert d([ok(1)], replication=1).verdict == "verified"


# -- trusted parties: the head and the operator's trusted nodes ------------------------

def _tracker():
    import random

    from engine.replication import ReplicaTracker

    return ReplicaTracker(replication=2, max_replicas=4, comparison=EXACT, tolerance=1e-9,
                          spot_check_rate=0.0, rng=random.Random(1))


def _row(index, value):
    return RowResult(index, True, json.dumps(value), None, None, 0.0)


def test_a_row_the_trusted_party_ran_is_accepted_alone():
    from engine.parties import TRUSTED_PARTY

    tracker = _tracker()
    tracker.add(TRUSTED_PARTY, "head-node", [_row(0, 1)])
    decided = tracker.evaluate([0], {TRUSTED_PARTY}, lambda party: False)
    assert [(r.row_index, node, how, agreeing) for r, node, how, agreeing, _ in decided] == \
        [(0, "head-node", "trusted", (TRUSTED_PARTY,))]
    assert tracker.waiting_rows() == 0


def test_a_volunteers_row_alone_is_never_accepted_on_its_word():
    tracker = _tracker()
    tracker.add("alice", "a-node", [_row(0, 1)])
    # Even with the trusted party online, alice's result waits for another party.
    from engine.parties import TRUSTED_PARTY

    assert tracker.evaluate([0], {"alice", TRUSTED_PARTY}, lambda party: False) == []
    assert tracker.waiting_rows() == 1


def test_a_volunteer_agreeing_with_the_trusted_party_is_verified_and_credited():
    from engine.parties import TRUSTED_PARTY

    tracker = _tracker()
    tracker.add("alice", "a-node", [_row(0, 7)])
    tracker.evaluate([0], {"alice", TRUSTED_PARTY}, lambda party: False)
    tracker.add(TRUSTED_PARTY, "head-node", [_row(0, 7)])
    (result, node, how, agreeing, every), = tracker.evaluate([0], set(), lambda party: False)
    assert (how, set(agreeing), set(every)) == ("verified", {"alice", TRUSTED_PARTY},
                                                {"alice", TRUSTED_PARTY})


def test_a_volunteer_disagreeing_with_the_trusted_party_loses_and_the_trusted_result_stays():
    from engine.parties import TRUSTED_PARTY

    tracker = _tracker()
    tracker.add("carol", "c-node", [_row(0, 999)])
    tracker.evaluate([0], {"carol", TRUSTED_PARTY}, lambda party: False)
    tracker.add(TRUSTED_PARTY, "head-node", [_row(0, 7)])
    (result, node, how, agreeing, every), = tracker.evaluate([0], set(), lambda party: False)
    assert (json.loads(result.output), node, how, agreeing) == (7, "head-node", "trusted",
                                                                 (TRUSTED_PARTY,))
    assert "carol" in every and "carol" not in agreeing
