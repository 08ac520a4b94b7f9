"""engine.run: one project's rows as the dispatcher holds them, without Ray or a store."""

from engine.batching import BatchSizer
from engine.node.sandbox import Limits
from engine.replication import ReplicaTracker
from engine.run import Batch, Run, missing_ranges, ranges_of
from engine.verification import Comparison


def a_run(rows: int = 100, batch: int | None = 10, replicated: bool = False) -> Run:
    run = Run(project_id=1, owner_id=1, filename="s.py", columns=["x"],
              sizer=BatchSizer(fixed=batch, initial=10), limits=Limits(), rows_total=rows,
              source_ref=None)
    run.todo.append((0, rows))
    if replicated:
        run.replicas = ReplicaTracker(replication=2, max_replicas=4, comparison=Comparison.EXACT,
                                      tolerance=1e-9, spot_check_rate=0.0)
    return run


def test_next_range_cuts_batches_off_the_front_and_keeps_the_rest():
    run = a_run(rows=25, batch=10)
    assert [run.next_range(cores=1) for _ in range(3)] == [(0, 10), (10, 20), (20, 25)]
    assert run.remaining() == 0 and not run.todo


def test_adaptive_batches_split_the_last_round_so_no_core_idles():
    run = a_run(rows=30, batch=None)  # initial 10 rows, nothing measured yet
    assert run.next_range(cores=4) == (0, 8)  # 30 rows left < 10 x 4 cores: ceil(30 / 4)
    assert run.remaining() == 22


def test_a_batch_put_back_goes_out_next():
    run = a_run(rows=30, batch=10)
    first, second = run.next_range(1), run.next_range(1)
    run.put_back(Batch(1, *first))
    assert list(run.todo) == [(0, 10), (20, 30)] and second == (10, 20)


def test_rows_a_batch_did_not_return_go_back_as_ranges():
    run = a_run(rows=10, batch=10)
    start, end = run.next_range(1)
    run.put_back_unreturned(Batch(1, start, end), returned=[0, 1, 2, 5, 6, 9])
    assert list(run.todo) == [(3, 5), (7, 9)]
    run.put_back_unreturned(Batch(1, 0, 3), returned=[0, 1, 2])
    assert list(run.todo) == [(3, 5), (7, 9)]  # all came back: nothing to redo


def test_a_replicated_batch_goes_back_to_the_tracker_still_off_its_parties():
    run = a_run(rows=10, replicated=True)
    batch = Batch(1, 0, 10, rows=(2, 3, 4), exclude_parties=frozenset({"alice"}))
    run.put_back_unreturned(batch, returned=[3])
    assert run.replicas.waiting == {frozenset({"alice"}): {2, 4}}
    run.put_back(batch)
    assert run.replicas.waiting == {frozenset({"alice"}): {2, 3, 4}}
    assert list(run.todo) == [(0, 10)]  # the to-do list is untouched


def test_ranges():
    assert ranges_of([1, 2, 3, 7, 9, 10]) == [(1, 4), (7, 8), (9, 11)]
    assert ranges_of([]) == []
    assert missing_ranges([0, 1, 5], 8) == [(2, 5), (6, 8)]
    assert missing_ranges([3, 4], 6, first=2) == [(2, 3), (5, 6)]
