"""The dispatcher's bookkeeping for replicated projects: which volunteer returned what.

``ReplicaTracker`` holds, in memory, the replicas of rows not yet decided; ``settle``
stores a volunteer's replicas and what they decide; ``recover`` reloads the undecided
ones after a restart. When the store refuses a settlement, ``unchanged_on_error`` puts the
tracker back as it was, so that the same replicas can be settled again (``engine.recorder``).

Rows are first sent anywhere (except unclaimed nodes). When a volunteer's results come
back, each row is decided (``engine.verification.decide``) or needs another replica,
which is sent with a label selector that keeps it off every node of the volunteers
already used for that row. Replicas run one after another rather than at once: Ray
cannot be told "some other volunteer" in advance without pinning a task to a node.
"""

from __future__ import annotations

import random
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from engine import verification
from engine.ledger import decide_rows, record_replicas
from engine.models import Replica
from engine.node.result import RowResult
from engine.parties import TRUSTED_PARTY
from engine.status import TaskStatus, Verdict
from engine.verification import Comparison, Verification, agree, decide

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
            operator = next((r for r in replicas if r[0] == TRUSTED_PARTY), None)
            if operator is not None:
                # The operator's own nodes are trusted: their result is kept; a volunteer's
                # beside it counts only if it agrees.
                _, node_id, result = operator
                agreeing = tuple(p for p, _, r in replicas if r is result or agree(
                    r, result, self.comparison, self.tolerance))
                how = Verification.VERIFIED if len(agreeing) > 1 else Verification.TRUSTED
                decided.append((result, node_id, how.value, agreeing, every))
                self._forget(row)
                continue
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
            if decision.verdict is Verdict.VERIFIED:
                _, node_id, result = replicas[decision.agreeing[0]]
                agreeing = tuple(replicas[i][0] for i in decision.agreeing)
                decided.append((result, node_id, Verification.VERIFIED.value, agreeing, every))
                self._forget(row)
            elif decision.verdict is Verdict.INCONCLUSIVE:
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

    @contextmanager
    def unchanged_on_error(self, rows: Iterable[int]) -> Iterator[None]:
        """Undo what happens to ``rows`` in the block if it raises.

        ``settle`` adds the replicas here before the store has them; when the store then
        refuses them (a full disk, a locked database), the tracker must not remember them
        either, or settling them again would find them already counted.
        """
        rows = set(rows)
        received = {row: list(self.received[row]) for row in rows if row in self.received}
        spot_checked = rows & self.spot_checked
        waiting = {used: waiting & rows for used, waiting in self.waiting.items()}
        rng = self.rng.getstate()
        try:
            yield
        except BaseException:
            for row in rows:
                self.received.pop(row, None)
            self.received.update(received)
            self.spot_checked = (self.spot_checked - rows) | spot_checked
            for used in list(self.waiting):
                if used not in waiting:
                    del self.waiting[used]
                else:
                    self.waiting[used] = (self.waiting[used] - rows) | waiting[used]
            self.rng.setstate(rng)
            raise

    def _forget(self, row: int) -> None:
        self.received.pop(row, None)
        self.spot_checked.discard(row)


def settle(session: Session, tracker: ReplicaTracker, project_id: int, script_sha256: str,
           party: str, node_id: str, results: Sequence[RowResult],
           parties_online: set[str]) -> list[Decided]:
    """Store one volunteer's replicas, decide the rows that can be decided, update trust."""
    trust_cache: dict[str, bool] = {}

    def is_trusted(volunteer: str) -> bool:
        if volunteer not in trust_cache:
            trust_cache[volunteer] = volunteer != TRUSTED_PARTY and verification.trusted(
                session, volunteer, script_sha256)
        return trust_cache[volunteer]

    record_replicas(session, project_id, party, node_id, results)
    touched = tracker.add(party, node_id, results)
    decided = tracker.evaluate(touched, parties_online, is_trusted)
    decide_rows(session, project_id, decided)
    for _result, _node, how, agreeing, every in decided:
        if how == Verification.BY_TRUST.value:
            continue  # nobody was compared: trust moves on comparisons only
        for volunteer in every:
            if volunteer != TRUSTED_PARTY:
                verification.update_trust(session, volunteer, script_sha256,
                                          volunteer in agreeing)
    return decided


def recover(session: Session, tracker: ReplicaTracker, project_id: int) -> set[int]:
    """After a restart: reload the replicas stored without a decision; returns their rows.

    Those rows are not dispatched from scratch again: each waits for its next replica.
    """
    rows = set()
    for r in session.execute(select(Replica).where(
            Replica.project_id == project_id, Replica.agreed.is_(None))).scalars():
        tracker.add(r.party, r.node_id, [RowResult(r.row_index, r.status == TaskStatus.SUCCEEDED,
                                                   r.output, r.error, r.traceback,
                                                   r.cpu_seconds)])
        rows.add(r.row_index)
    for row in rows:
        tracker.requeue(tracker.parties(row), [row])
    return rows
