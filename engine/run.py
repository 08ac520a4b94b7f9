"""A run: one project's work as the dispatcher holds it, with no Ray and no store in it.

The dispatcher keeps one ``Run`` per project it is running. The run owns the project's
rows in three places:

- ``todo``: contiguous ``[start, end)`` ranges not dispatched yet, cut into batches by
  ``next_range`` at the size the run's ``BatchSizer`` measured;
- ``inflight``: the batches out on the cluster, by the Ray reference that will answer;
- for a replicated project, its ``ReplicaTracker``'s queue of follow-up rows, kept off the
  volunteers who already ran them.

Rows that must run again (their batch was held, lost, or its node could not import the
script) go back through ``put_back``, the one way back into the run.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable

from engine.batching import BatchSizer
from engine.node.sandbox import Limits
from engine.replication import ReplicaTracker


@dataclass(frozen=True)
class Batch:
    """Rows sent to the cluster in one Ray call."""

    project_id: int
    start: int
    end: int
    attempt: int = 1
    copy: bool = False  # a speculative duplicate of a straggler at the tail
    # Replicated projects: an explicit set of rows, kept off the volunteers already used.
    rows: tuple[int, ...] | None = None
    exclude_parties: frozenset = frozenset()
    # Nodes this batch failed on for reasons of the node, and failures no node answered for.
    failed_on: frozenset = frozenset()
    unplaced_failures: int = 0
    last_failure: str = ""
    # The nodes its label selector keeps it off, as they were when it was dispatched: Ray
    # retries a task with the same selector, so those nodes cannot take it later either.
    dispatched_off: frozenset = frozenset()

    @property
    def key(self) -> tuple[int, int]:
        return (self.start, self.end)

    def row_indices(self) -> Iterable[int]:
        return self.rows if self.rows is not None else range(self.start, self.end)


@dataclass
class Run:
    """A project this dispatcher is running."""

    project_id: int
    owner_id: int
    filename: str
    columns: list[str]
    sizer: BatchSizer
    limits: Limits
    rows_total: int
    source_ref: Any
    todo: deque = field(default_factory=deque)        # (start, end) ranges not yet dispatched
    inflight: dict = field(default_factory=dict)      # ObjectRef -> Batch
    cannot_import: dict = field(default_factory=dict)  # node id -> the script's import error
    duplicated: set = field(default_factory=set)      # batch keys already copied at the tail
    finished: set = field(default_factory=set)        # batch keys whose results are stored
    script_sha256: str = ""
    replicas: ReplicaTracker | None = None            # None when replication is 1
    followups: deque = field(default_factory=deque)   # replica batches ready to dispatch
    notice: str | None = None
    unsandboxed: bool = False                         # some rows ran without a sandbox
    held: bool = False                                # rows kept back: no live node may run them

    def remaining(self) -> int:
        """Rows in ``todo``."""
        return sum(end - start for start, end in self.todo)

    def next_range(self, cores: int) -> tuple[int, int]:
        """The next batch's ``[start, end)`` off the front of ``todo``, sized by the sizer for
        ``cores`` CPUs; the rest of that range stays at the front."""
        start, end = self.todo.popleft()
        cut = start + self.sizer.next_size(self.remaining() + (end - start), cores)
        if cut < end:
            self.todo.appendleft((cut, end))
        return start, min(cut, end)

    def put_back(self, batch: Batch, rows: Iterable[int] | None = None) -> None:
        """``rows`` of ``batch`` (all of them by default) are to run again: a replicated
        project's to the tracker's queue, still kept off the parties the batch excluded; any
        other's to the front of ``todo``, so that they go out next."""
        if self.replicas is not None and (batch.rows is not None or rows is not None):
            self.replicas.requeue(batch.exclude_parties,
                                  list(batch.row_indices() if rows is None else rows))
        elif rows is None:
            self.todo.appendleft((batch.start, batch.end))
        else:
            for start, end in reversed(ranges_of(sorted(set(rows)))):
                self.todo.appendleft((start, end))

    def put_back_unreturned(self, batch: Batch, returned: Iterable[int]) -> None:
        """A batch came back without some of its rows (its child died mid-batch): those go
        back, and the rows that came back are done."""
        done = set(returned)
        lost = [i for i in batch.row_indices() if i not in done]
        if lost:
            self.put_back(batch, lost)


def ranges_of(indices: list[int]) -> list[tuple[int, int]]:
    """Sorted row indices as contiguous ``[start, end)`` ranges."""
    ranges: list[tuple[int, int]] = []
    for index in indices:
        if ranges and ranges[-1][1] == index:
            ranges[-1] = (ranges[-1][0], index + 1)
        else:
            ranges.append((index, index + 1))
    return ranges


def missing_ranges(done_indices, total: int, first: int = 0) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges in [first, total) that are not in the sorted ``done_indices``."""
    ranges = []
    expected = first
    for index in done_indices:
        if index > expected:
            ranges.append((expected, index))
        expected = max(expected, index + 1)
    if expected < total:
        ranges.append((expected, total))
    return ranges
