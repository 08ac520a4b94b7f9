"""Batch sizing and batch contents: unit tests without Ray."""

import pytest

from support import submit_numbers
from engine.batching import BatchSizer


def test_fixed_size_is_respected():
    sizer = BatchSizer(fixed=7, initial=1000)
    sizer.observe(7, 100.0)
    assert sizer.next_size(remaining=100, cores=4) == 7
    assert sizer.next_size(remaining=3, cores=4) == 3


def test_aims_at_the_target_seconds_per_batch():
    sizer = BatchSizer(fixed=None, initial=1000, target_seconds=1.0, max_rows=10**6)
    assert sizer.next_size(remaining=10**6, cores=2) == 1000  # nothing measured yet
    sizer.observe(1000, 0.005)  # 5 us per row: trivial rows
    assert sizer.next_size(remaining=10**7, cores=2) == 200_000
    heavy = BatchSizer(fixed=None, initial=1000, target_seconds=1.0)
    heavy.observe(100, 0.5)  # 5 ms per row
    assert heavy.next_size(remaining=10**6, cores=2) == 200


def test_caps_and_tail_split():
    sizer = BatchSizer(fixed=None, initial=1000, target_seconds=1.0, max_rows=50_000)
    sizer.observe(1000, 0.001)
    assert sizer.next_size(remaining=10**7, cores=2) == 50_000
    # Less than one round left: every core gets a share.
    assert sizer.next_size(remaining=60_000, cores=4) == 15_000
    assert sizer.next_size(remaining=3, cores=8) == 1


def test_slow_rows_that_use_no_cpu_still_make_small_batches():
    sizer = BatchSizer(fixed=None, initial=1000, target_seconds=1.0)
    sizer.observe(10, 5.0)  # 0.5 s per row spent sleeping: wall time, not CPU time, decides
    assert sizer.next_size(remaining=1000, cores=2) == 2


@pytest.mark.parametrize("start, end, whole", [
    (0, 1000, [0]), (990, 2010, [1000]), (1500, 1600, []), (2400, 2500, []), (0, 2500, [0, 1000, 2000]),
])
def test_batches_carry_exactly_their_rows_across_chunks(store, settings, start, end, whole):
    """A batch's rows travel as stored chunks (whole) or values cut from partly covered ones."""
    from engine.courier import batch_parts
    from engine.node.batch import batch_rows

    pid = submit_numbers(store, settings, "square.py", 2500)  # chunks at rows 0, 1000, 2000
    with store.session() as session:
        parts = batch_parts(session, pid, start, end)
    assert [first for first, part in parts if isinstance(part, str)] == whole
    assert batch_rows(start, end, None, parts) == [(i, [i]) for i in range(start, end)]
    if (start, end) == (990, 2010):  # a replica follow-up names its rows
        assert batch_rows(start, end, (995, 2005), parts) == [(995, [995]), (2005, [2005])]
