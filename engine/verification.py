"""Verification by replication: when do a row's replicas agree, and what is decided.

A row of a project with ``replication = r`` runs on nodes of r different volunteers
(the head counts as one party of its own; unclaimed nodes never count). It is
``verified`` when at least r replicas agree and they outnumber every other group of
agreeing replicas. Until then the engine asks for one more replica on a volunteer not
yet used for the row, up to ``max_replicas``; after that, or when no unused volunteer is
online, the row is ``inconclusive`` and every candidate stays stored.

Failed rows verify too: replicas that raised the same exception type agree.

Adaptive trust (after BOINC, per volunteer and script): a volunteer whose last
``TRUST_STREAK`` results for the script all agreed with the quorum is trusted, and a row
that a trusted volunteer ran first is replicated only with probability
``spot_check_rate``; otherwise its result is accepted as ``verified-by-trust``. Any
disagreement resets the volunteer's streak to zero.

Trusted parties: the head, and nodes an admin marks as trusted (the operator's own
machines), answer together as one party, the operator. A row the operator's party ran is
accepted at once as ``trusted``, without replication, so that a single machine finishes
projects with the default replication. A volunteer's result still needs another party to
agree with it (the operator's, or another volunteer's) before it counts; when it is
compared with the operator's, the operator's result is kept, and the volunteer's counts
(``verified``, credit, trust) only if it agrees. Trusted results earn nobody credit.
"""

from __future__ import annotations

import enum
import json
import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from engine.accounts import Role, is_admin, require_role
from engine.models import Trust, User
from engine.node.result import RowResult
from engine.status import Verdict, Verification  # noqa: F401 (Verification: long imported from here)

TRUST_STREAK = 10
# How many volunteers may be asked to agree on a row, and how many replicas beyond the
# quorum a project may spend by default before a row ends inconclusive.
MAX_REPLICATION = 10
SPARE_REPLICAS = 2


class Comparison(str, enum.Enum):
    EXACT = "exact"        # equal canonical JSON
    NUMERIC = "numeric"    # numbers within a relative tolerance, recursively; strings and keys exact

    def __str__(self) -> str:
        return self.value


def canonical(output: str | None) -> str:
    """Canonical JSON text: key order and spacing do not make two results differ."""
    if output is None:
        return "null"
    return json.dumps(json.loads(output), sort_keys=True, separators=(",", ":"))


def error_type(error: str | None) -> str:
    return (error or "").split(":", 1)[0]


def _close(a: Any, b: Any, tolerance: float) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if a == b:
            return True
        if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
            return True
        return abs(a - b) <= tolerance * max(abs(a), abs(b))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, tolerance) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tolerance) for k in a)
    return type(a) is type(b) and a == b


def agree(a: RowResult, b: RowResult, comparison: Comparison, tolerance: float) -> bool:
    """Whether two replicas of a row count as the same result."""
    if a.succeeded != b.succeeded:
        return False
    if not a.succeeded:
        return error_type(a.error) == error_type(b.error)
    if comparison is Comparison.EXACT:
        return canonical(a.output) == canonical(b.output)
    return _close(json.loads(a.output or "null"), json.loads(b.output or "null"), tolerance)


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    agreeing: tuple[int, ...] = ()  # indices of the replicas on the winning side


def decide(replicas: Sequence[RowResult], *, replication: int, max_replicas: int,
           comparison: Comparison, tolerance: float, unused_party_online: bool) -> Decision:
    """What to do with a row, given its replicas so far (in the order they arrived)."""
    groups: list[list[int]] = []
    for index, replica in enumerate(replicas):
        for group in groups:
            if agree(replicas[group[0]], replica, comparison, tolerance):
                group.append(index)
                break
        else:
            groups.append([index])
    groups.sort(key=len, reverse=True)
    best = groups[0] if groups else []
    runner_up = len(groups[1]) if len(groups) > 1 else 0
    if len(best) >= replication and len(best) > runner_up:
        return Decision(Verdict.VERIFIED, tuple(best))
    if len(replicas) >= replication and (len(replicas) >= max_replicas or not unused_party_online):
        return Decision(Verdict.INCONCLUSIVE)
    return Decision(Verdict.MORE)


def trusted(session: Session, volunteer: str, script_sha256: str) -> bool:
    streak = session.execute(select(Trust.streak).where(
        Trust.volunteer == volunteer, Trust.script_sha256 == script_sha256)).scalar_one_or_none()
    return (streak or 0) >= TRUST_STREAK


def update_trust(session: Session, volunteer: str, script_sha256: str, agreed: bool) -> None:
    row = session.get(Trust, (volunteer, script_sha256))
    if row is None:
        row = Trust(volunteer=volunteer, script_sha256=script_sha256, streak=0)
        session.add(row)
    row.streak = (row.streak or 0) + 1 if agreed else 0
    row.updated_at = time.time()


def trust_levels(session: Session, volunteer: str | None = None) -> list[dict]:
    """Streaks per volunteer and script (all for an admin, one volunteer's own otherwise)."""
    query = select(Trust).order_by(Trust.volunteer, Trust.script_sha256)
    if volunteer is not None:
        query = query.where(Trust.volunteer == volunteer)
    return [{"volunteer": t.volunteer, "script_sha256": t.script_sha256, "streak": t.streak,
             "trusted": t.streak >= TRUST_STREAK} for t in session.execute(query).scalars()]


def trust_for(store, actor: User | None) -> list[dict]:
    """Trust streaks an actor may see: every volunteer's for an admin, their own for a volunteer."""
    require_role(actor, Role.VOLUNTEER)
    with store.session() as session:
        return trust_levels(session, None if is_admin(actor) else actor.name)
