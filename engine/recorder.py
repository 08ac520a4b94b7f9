"""The result writer: the one way the dispatcher's results reach the store.

Every result the dispatcher keeps goes through one ``ResultWriter``: a batch's rows
(``record``), a volunteer's replicas and the rows they decide (``record_replicas``), and
the rows that failed on too many nodes. Each write is one transaction that first admits
the results under the storage quotas (``engine.ledger.admit_results``; a project over
its quota fails there and nothing of that batch is stored).

Failures of the store (disk full, a locked or read-only database) do not lose results: a
write the store refused is kept, in order, and made again on each ``retry`` until it
goes through. Completion is decided in the same transaction as the write, so a project
cannot complete while one of its writes waits; ``pending`` tells the dispatcher so too.
For replicas, the tracker is put back as it was before a refused write
(``ReplicaTracker.unchanged_on_error``), so that writing them again settles them again.

Like Datasette's single write connection, the writer is used on one thread only (the
dispatcher's): writes happen in the order results came back, and a refused write and
the ones after it are made again in that order.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable, Sequence

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from engine import replication
from engine.node.result import RowResult
from engine.replication import ReplicaTracker
from engine.settings import Settings
from engine.ledger import admit_results, record_results
from engine.quota import StorageQuota
from engine.store import Store

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Rows:
    """A batch's results (or its rows failed on too many nodes), from one node or none."""

    project_id: int
    results: Sequence[RowResult]
    node_id: str | None

    def write(self, session: Session, writer: ResultWriter) -> bool:
        # A project that goes over its storage quota fails here, as on the
        # systematic-failure stop, and the dispatcher's refresh stops its batches.
        record_results(session, self.project_id, self.results, self.node_id,
                       systematic_rows=writer.settings.systematic_failure_rows,
                       quota=writer.quota)
        return True


@dataclass(frozen=True)
class _Replicas:
    """A volunteer's replicas of some rows of a replicated project."""

    project_id: int
    results: Sequence[RowResult]
    node_id: str
    party: str
    tracker: ReplicaTracker
    script_sha256: str
    parties_online: Callable[[], set[str]]

    def write(self, session: Session, writer: ResultWriter) -> bool:
        if not admit_results(session, self.project_id, self.results, writer.quota,
                             party=self.party):
            return False  # the project failed on its storage quota
        decided = replication.settle(session, self.tracker, self.project_id, self.script_sha256,
                                     self.party, self.node_id, self.results,
                                     self.parties_online())
        logger.debug("project %s: %d replicas from %s; %d rows decided, %d waiting",
                     self.project_id, len(self.results), self.party, len(decided),
                     self.tracker.waiting_rows())
        return True


class ResultWriter:
    """Stores results, keeps the ones the store refused, and writes them again."""

    def __init__(self, store: Store, settings: Settings):
        self.store = store
        self.settings = settings
        self.quota = StorageQuota.from_settings(settings)
        self.error = ""  # why the store refuses writes, while it does
        self._unstored: list[_Rows | _Replicas] = []
        self._thread: int | None = None

    def record(self, project_id: int, results: Sequence[RowResult], node_id: str | None) -> None:
        """Store a batch's results (``node_id``: where they ran; None for rows that failed
        on every node tried). If the store refuses them, they are kept for ``retry``."""
        self._write(_Rows(project_id, results, node_id))

    def record_replicas(self, project_id: int, results: Sequence[RowResult], *, node_id: str,
                        party: str, tracker: ReplicaTracker, script_sha256: str,
                        parties_online: Callable[[], set[str]]) -> bool:
        """Store ``party``'s replicas and decide what they decide (``replication.settle``);
        ``parties_online`` is asked at the time of the write. If the store refuses them,
        they are kept for ``retry``. False only if the storage quota refused them: the
        project failed there, and they are not stored."""
        return self._write(_Replicas(project_id, [RowResult._make(r) for r in results], node_id,
                                     party, tracker, script_sha256, parties_online))

    def pending(self, project_id: int | None = None) -> bool:
        """Whether a write (of ``project_id``, or of any project) waits to be made again."""
        return any(project_id is None or w.project_id == project_id for w in self._unstored)

    def retry(self) -> list[int]:
        """Make the refused writes again, in order. Returns the projects they were for once
        every one went through (the dispatcher sees whether they are done), else []."""
        waiting, self._unstored = self._unstored, []
        for write in waiting:
            self._write(write)
        if waiting and not self._unstored:
            self.error = ""
            return list(dict.fromkeys(w.project_id for w in waiting))
        return []

    def _write(self, write: _Rows | _Replicas) -> bool:
        """Make one write; False only if the quota refused it (True if kept for retry)."""
        self._on_one_thread()
        try:
            if isinstance(write, _Replicas):
                with write.tracker.unchanged_on_error(r.row_index for r in write.results):
                    with self.store.session() as session:
                        admitted = write.write(session, self)
            else:
                with self.store.session() as session:
                    admitted = write.write(session, self)
        except SQLAlchemyError as exc:
            # Keep the results and write them again later; the project cannot complete
            # meanwhile, because completion is decided in the same transaction.
            self.error = f"cannot write results to the database: {exc.orig or exc}"
            logger.error("project %s: %s; will retry", write.project_id, self.error)
            self._unstored.append(write)
            return True
        if self.error and not self._unstored:
            self.error = ""
            logger.info("project %s: the database accepts writes again", write.project_id)
        return admitted

    def _on_one_thread(self) -> None:
        thread = threading.get_ident()
        if self._thread is None:
            self._thread = thread
        elif thread != self._thread:
            raise RuntimeError("the result writer is used on one thread only")
