"""Adaptive batching and tail duplication on a real Ray head."""

import logging

import pytest
from sqlalchemy import func, select

from support import run_to_end, submit_numbers as submit
from engine.batching import BatchSizer
from engine.models import Task

pytestmark = pytest.mark.slow


@pytest.fixture
def sizers(monkeypatch) -> list[BatchSizer]:
    """Every BatchSizer made while the test runs, each with ``events``: what the dispatcher
    reported to it (``("observed", rows, seconds)``: a batch's rows and their measured time
    on the node) and what it chose (``("sized", remaining, size)``: the next batch's rows)."""
    made: list[BatchSizer] = []
    init, observe, next_size = BatchSizer.__init__, BatchSizer.observe, BatchSizer.next_size

    def spy_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.events = []
        made.append(self)

    def spy_observe(self, rows, seconds):
        self.events.append(("observed", rows, seconds))
        observe(self, rows, seconds)

    def spy_next_size(self, remaining, cores):
        size = next_size(self, remaining, cores)
        self.events.append(("sized", remaining, size))
        return size

    monkeypatch.setattr(BatchSizer, "__init__", spy_init)
    monkeypatch.setattr(BatchSizer, "observe", spy_observe)
    monkeypatch.setattr(BatchSizer, "next_size", spy_next_size)
    return made


def test_adaptive_batches_grow_for_trivial_rows(store, cluster_settings, sizers):
    """The batches grow from the rows' measured time, not from how many happened to run."""
    initial, target = cluster_settings.batch_size, cluster_settings.batch_seconds
    pid = submit(store, cluster_settings, "square.py", 60_000)
    assert run_to_end(store, cluster_settings, pid).rows_succeeded == 60_000
    (adaptive,) = [s for s in sizers if s.fixed is None]
    events = adaptive.events
    # Nothing is measured before the first batch: it has the initial size.
    assert events[0] == ("sized", 60_000, initial), events[:3]
    observed = [(rows, seconds) for kind, rows, seconds in events if kind == "observed"]
    assert sum(rows for rows, _ in observed) >= 60_000  # every batch's time was measured
    # Trivial rows: by their measured time, `initial` of them take far less than the
    # target time of a batch, so the sizer must aim at bigger batches.
    per_row = sorted(seconds / rows for rows, seconds in observed)
    assert per_row[len(per_row) // 2] * initial < target, observed
    first_measured = next(i for i, e in enumerate(events) if e[0] == "observed")
    later = [size for kind, _, size in events[first_measured:] if kind == "sized"]
    assert later and max(later) > initial, (later, observed)
    # ... and such a bigger batch was dispatched, ran and came back measured.
    assert max(rows for rows, _ in observed) > initial, observed

    fixed = submit(store, cluster_settings, "square.py", 60_000, batch_size=1000)
    run_to_end(store, cluster_settings, fixed)
    (pinned,) = [s for s in sizers if s.fixed == 1000]
    # A range may be cut again when it could not be dispatched yet: count sizes, not calls.
    assert {size for kind, _, size in pinned.events if kind == "sized"} == {1000}
    assert {rows for kind, rows, _ in pinned.events if kind == "observed"} == {1000}


def test_straggler_is_duplicated_and_counted_once(store, cluster_settings, caplog):
    caplog.set_level(logging.INFO, logger="engine.scheduler")
    pid = submit(store, cluster_settings, "one_straggler.py", 40, batch_size=4)
    view = run_to_end(store, cluster_settings, pid)
    assert (view.status, view.rows_succeeded, view.rows_failed) == ("complete", 40, 0)
    assert any("duplicating straggler batch 36-40" in r.getMessage() for r in caplog.records)
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(Task).where(Task.project_id == pid)) == 40
