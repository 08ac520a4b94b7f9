"""How many rows go into the next batch.

One Ray call per row is far too slow, and one huge batch leaves cores idle and shows
no progress. The sizer aims at about ``target_seconds`` of work per batch, measured
from the batches already done (wall time on the node, so rows that wait on I/O count
too), and splits the tail so that every core gets a share of the last rows.
"""

from __future__ import annotations

import math

# No batch is larger than this, however light its rows: one Ray call's arguments and
# results stay a few MB, and a lost batch costs little to redo.
MAX_BATCH_ROWS = 50_000


class BatchSizer:
    def __init__(self, *, fixed: int | None, initial: int, target_seconds: float = 1.0,
                 max_rows: int = MAX_BATCH_ROWS):
        self.fixed = fixed
        self.initial = max(1, initial)
        self.target_seconds = target_seconds
        self.max_rows = max_rows
        self.seconds_per_row: float | None = None

    def observe(self, rows: int, seconds: float) -> None:
        """Record a finished batch: ``rows`` rows took ``seconds`` on their node."""
        if rows <= 0 or seconds <= 0:
            return
        measured = seconds / rows
        previous = self.seconds_per_row
        # Weighted towards the newest batch; one slow batch does not swing it all the way.
        self.seconds_per_row = measured if previous is None else 0.5 * previous + 0.5 * measured

    def next_size(self, remaining: int, cores: int) -> int:
        if remaining <= 0:
            return 0
        if self.fixed:
            return min(self.fixed, remaining)
        if self.seconds_per_row is None:
            size = self.initial
        else:
            size = round(self.target_seconds / max(self.seconds_per_row, 1e-9))
        size = max(1, min(size, self.max_rows))
        cores = max(1, cores)
        if remaining < size * cores:
            # Less than one round of batches is left: split it so that no core idles.
            size = max(1, math.ceil(remaining / cores))
        return min(size, remaining)
