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
