"""The dispatcher's bookkeeping for replicated projects: which volunteer returned what.

Rows are first sent anywhere (except unclaimed nodes). When a volunteer's results come
back, each row is decided (``engine.verification.decide``) or needs another replica,
which is sent with a label selector that keeps it off every node of the volunteers
already used for that row. Replicas run one after another rather than at once: Ray
cannot be told "some other volunteer" in advance without pinning a task to a node.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Callable, Iterable, Sequence

from engine.status import RowResult
from engine.verification import Comparison, Verification, decide

# (kept result, its node, verification, parties on the winning side, every party)
Decided = tuple[RowResult, "str | None", str, tuple[str, ...], tuple[str, ...]]


class ReplicaTracker:
    def __init__(self, *, replication: int, max_replicas: int, comparison: Comparison,
                 tolerance: float, spot_check_rate: float, rng: random.Random | None = None):
        self.replication = replication
        self.max_replicas = max_replicas
        self.comparison = comparison
        self.tolerance = tolerance
        self.spot_check_rate = spot_check_rate
        self.rng = rng or random.Random()
        self.received: dict[int, list[tuple[str, str, RowResult]]] = {}
        self.spot_checked: set[int] = set()
        self.waiting: dict[frozenset[str], set[int]] = defaultdict(set)

    def add(self, party: str, node_id: str, results: Iterable[RowResult]) -> list[int]:
        """Record a volunteer's results; returns the rows that got a new replica."""
        touched = []
        for result in results:
            replicas = self.received.setdefault(result.row_index, [])
            if any(p == party for p, _, _ in replicas):
                continue  # one volunteer never counts twice for a row
            replicas.append((party, node_id, result))
            touched.append(result.row_index)
        return touched

    def parties(self, row: int) -> frozenset[str]:
        return frozenset(p for p, _, _ in self.received.get(row, ()))

    def evaluate(self, rows: Sequence[int], parties_online: set[str],
                 is_trusted: Callable[[str], bool]) -> list[Decided]:
        """Decide what can be decided; rows that need another volunteer wait in ``waiting``."""
        decided: list[Decided] = []
        for row in rows:
            replicas = self.received.get(row)
            if not replicas:
                continue
            used = self.parties(row)
            every = tuple(p for p, _, _ in replicas)
            if len(replicas) == 1 and self.replication > 1 and row not in self.spot_checked:
                party, node_id, result = replicas[0]
                if is_trusted(party):
                    if self.rng.random() >= self.spot_check_rate:
                        decided.append((result, node_id, Verification.BY_TRUST.value, (party,), every))
                        self._forget(row)
                        continue
                    self.spot_checked.add(row)
            decision = decide([r for _, _, r in replicas], replication=self.replication,
                              max_replicas=self.max_replicas, comparison=self.comparison,
                              tolerance=self.tolerance,
                              unused_party_online=bool(parties_online - used))
            if decision.verdict == "verified":
                _, node_id, result = replicas[decision.agreeing[0]]
                agreeing = tuple(replicas[i][0] for i in decision.agreeing)
                decided.append((result, node_id, Verification.VERIFIED.value, agreeing, every))
                self._forget(row)
            elif decision.verdict == "inconclusive":
                failure = RowResult(
                    row, False, None,
                    f"Inconclusive: {len(replicas)} volunteers returned results that do not "
                    f"agree; every candidate is kept", None, 0.0)
                decided.append((failure, None, Verification.INCONCLUSIVE.value, (), every))
                self._forget(row)
            else:
                self.waiting[used].add(row)
        return decided

    def take_followups(self, parties_online: set[str]) -> list[tuple[frozenset[str], list[int]]]:
        """Groups of waiting rows that some online volunteer not yet used for them could run."""
        ready = []
        for used, rows in list(self.waiting.items()):
            if parties_online - used:
                ready.append((used, sorted(rows)))
                del self.waiting[used]
        return ready

    def requeue(self, used: frozenset[str], rows: Iterable[int]) -> None:
        self.waiting[used].update(rows)

    def waiting_rows(self) -> int:
        return sum(len(rows) for rows in self.waiting.values())

    def _forget(self, row: int) -> None:
        self.received.pop(row, None)
        self.spot_checked.discard(row)
