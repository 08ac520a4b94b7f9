"""Storage quotas: how many bytes of results one project, and all projects of one owner
together, may store, and how the bytes of results are counted.

A project's ``stored_bytes`` counts the UTF-8 bytes of every output, error and traceback
it stored (replicas and earlier attempts included). ``engine.ledger`` checks a batch of
results against the quota before storing it (``admit_results``), and adds what went in;
this module holds the counting and the words of the error, and nothing that changes a
status.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import itemgetter
from typing import Sequence

from sqlalchemy import text
from sqlalchemy.orm import Session

from engine.node.result import RowResult

_MB = 1 << 20


@dataclass(frozen=True)
class StorageQuota:
    """The most bytes of result text one project, and all projects of one owner together,
    may store (the ``project_storage_mb`` and ``user_storage_mb`` settings); 0: no limit."""

    project_bytes: int = 0
    user_bytes: int = 0

    @classmethod
    def from_settings(cls, settings) -> "StorageQuota":
        return cls(settings.project_storage_mb * _MB, settings.user_storage_mb * _MB)


def result_bytes(results: Sequence[RowResult]) -> int:
    """UTF-8 bytes of the outputs, errors and tracebacks of ``results``: what storing them
    adds to a project's ``stored_bytes``. Counted at C speed (len, isascii) on the hot path;
    only non-ASCII text is encoded to count it."""
    size = 0
    for field in (2, 3, 4):
        texts = list(filter(None, map(itemgetter(field), results)))
        size += sum(map(len, texts))
        if not all(map(str.isascii, texts)):
            size += sum(len(t.encode("utf-8", "surrogatepass")) - len(t)
                        for t in texts if not t.isascii())
    return size


def over_quota(session: Session, project_id: int, project, size: int,
               quota: StorageQuota) -> str | None:
    """The error of a project (its ``owner_id`` and ``stored_bytes``) whose next ``size``
    bytes would go over ``quota``, or None when they fit."""
    kept = ("the results stored so far are kept, and rows without one will not run. "
            "Return smaller outputs, or ask an admin to raise")
    if quota.project_bytes and project.stored_bytes + size > quota.project_bytes:
        return (f"stopped: project {project_id} has stored {project.stored_bytes / _MB:.1f} MB "
                f"of results, and its next batch would take it to "
                f"{(project.stored_bytes + size) / _MB:.1f} MB, over its storage quota "
                f"(project_storage_mb = {quota.project_bytes // _MB}); {kept} project_storage_mb")
    if quota.user_bytes:
        owned, owner = session.execute(
            text("SELECT COALESCE(SUM(stored_bytes), 0), (SELECT name FROM users WHERE id = :o) "
                 "FROM projects WHERE owner_id = :o"), {"o": project.owner_id}).one()
        owned = int(owned)  # PostgreSQL's SUM of a BIGINT is a NUMERIC
        if owned + size > quota.user_bytes:
            return (f"stopped: the projects of {owner} have stored {owned / _MB:.1f} MB of "
                    f"results together, and project {project_id}'s next batch would take them "
                    f"to {(owned + size) / _MB:.1f} MB, over the owner's storage quota "
                    f"(user_storage_mb = {quota.user_bytes // _MB}); {kept} user_storage_mb")
    return None


def _stored(session: Session, table: str, project_id: int, results: Sequence[RowResult],
            party: str | None, now: float | None = None) -> set[int]:
    """Which rows of ``results`` have a row in ``table`` (``party``'s, for replicas; written
    at ``now``, if given)."""
    where = ("" if party is None else " AND party = :party") \
        + ("" if now is None else " AND finished_at = :now")
    return set(session.execute(
        text(f"SELECT row_index FROM {table} WHERE project_id = :p{where} "
             "AND row_index BETWEEN :lo AND :hi"),
        {"p": project_id, "party": party, "now": now, "lo": min(r[0] for r in results),
         "hi": max(r[0] for r in results)}).scalars())


def new_rows(session: Session, project_id: int, results: Sequence[RowResult],
             party: str | None) -> list[RowResult]:
    """The results whose rows have no stored result yet (no replica of ``party``'s)."""
    if not results:
        return []
    stored = _stored(session, "tasks" if party is None else "replicas", project_id, results, party)
    return [r for r in results if r[0] not in stored]


def added_bytes(session: Session, table: str, project_id: int, results: Sequence[RowResult],
                inserted: int, size: int, now: float, party: str | None = None) -> int:
    """The bytes of the results that went in: all of them (``size``), none, or those a
    retried batch did not have stored yet (the rows written at ``now``)."""
    if inserted >= len(results):
        return size
    if not inserted:
        return 0
    written = _stored(session, table, project_id, results, party, now)
    return result_bytes([r for r in results if r[0] in written])
