"""engine.run: one project's rows as the dispatcher holds them, without Ray (and, but for
``load_run``, without a store)."""

import time

from support import fixture_bytes, submit_numbers
from engine.batching import BatchSizer
from engine.models import NodeScriptFailure, Project
from engine.node.result import RowResult
from engine.node.sandbox import Limits
from engine.replication import ReplicaTracker
from engine.run import Batch, Run, Runs, load_run, missing_ranges, ranges_of
from engine.ledger import record_replicas, record_results
from engine.status import ProjectStatus, transition_project
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


# -- load_run: a run built from the store, on start and on recovery (real SQLite, no Ray) --


def stored(store, pid: int, rows) -> None:
    with store.session() as session:
        record_results(session, pid, [RowResult(i, True, str(i * i), None, None, 0.1) for i in rows],
                       "n" * 56)


def load(store, settings, pid: int) -> Run | None:
    with store.session() as session:
        return load_run(session, settings, pid, put=lambda source: ("put", source))


def test_a_run_resumes_with_only_the_rows_without_a_stored_result(store, settings):
    pid = submit_numbers(store, settings, "square.py", 10)
    with store.session() as session:
        assert transition_project(session, pid, ProjectStatus.RUNNING)
        sha = session.get(Project, pid).script_sha256
        session.add(NodeScriptFailure(node_id="m" * 56, script_sha256=sha, project_id=pid,
                                      error="ImportError: no numpy", failed_at=time.time()))
    stored(store, pid, [0, 1, 2, 3, 7])
    run = load(store, settings, pid)
    assert list(run.todo) == [(4, 7), (8, 10)] and run.remaining() == 5
    assert run.cannot_import == {"m" * 56: "ImportError: no numpy"}  # still kept off that node
    assert run.source_ref == ("put", fixture_bytes("square.py").decode())
    assert (run.rows_total, run.replicas) == (10, None)


def test_a_submitted_project_starts_and_an_ended_one_does_not(store, settings):
    pid = submit_numbers(store, settings, "square.py", 10)
    run = load(store, settings, pid)
    assert list(run.todo) == [(0, 10)]
    with store.session() as session:
        assert session.get(Project, pid).status == ProjectStatus.RUNNING
        assert transition_project(session, pid, ProjectStatus.CANCELLED)
    assert load(store, settings, pid) is None


def test_replicas_stored_without_a_decision_wait_for_their_next_replica(store, settings):
    pid = submit_numbers(store, settings, "square.py", 6, replication=2)
    with store.session() as session:
        assert transition_project(session, pid, ProjectStatus.RUNNING)
        record_replicas(session, pid, "alice", "a" * 56,
                        [RowResult(i, True, str(i * i), None, None, 0.1) for i in (2, 5)])
    run = load(store, settings, pid)
    assert list(run.todo) == [(0, 2), (3, 5)]  # not dispatched from scratch again
    assert run.replicas.waiting == {frozenset({"alice"}): {2, 5}}
    assert run.replicas.parties(5) == {"alice"}


# -- Runs: which run's batch goes out next ------------------------------------------------


def owned(project_id: int, owner_id: int, rows: int = 100) -> Run:
    run = a_run(rows=rows)
    run.project_id, run.owner_id = project_id, owner_id
    return run


def deal(runs: Runs, free: int) -> list[tuple[int, tuple[int, int]]]:
    dealt = []
    for run, batch in runs.fair_batches(free, cores=1, parties_online=set):
        run.inflight[object()] = batch  # sent, as the dispatcher would
        dealt.append((run.project_id, batch.key))
    return dealt


def test_batches_go_round_robin_across_owners_then_across_their_projects():
    runs = Runs()
    for project_id, owner_id in ((1, 1), (2, 1), (3, 2)):
        runs.add(owned(project_id, owner_id))
    # Owner 1's two projects share owner 1's turns; owner 2's one project gets all of its own.
    assert deal(runs, 4) == [(1, (0, 10)), (3, (0, 10)), (2, (0, 10)), (3, (10, 20))]
    runs.pop(3)
    runs.forget_idle_owners()
    assert deal(runs, 2) == [(1, (10, 20)), (2, (10, 20))]


def test_a_replicated_runs_waiting_rows_go_out_as_follow_ups_to_an_unused_volunteer():
    run = a_run(rows=10, replicated=True)
    run.todo.clear()
    run.replicas.requeue(frozenset({"alice"}), [3, 4])
    assert not run.has_work({"alice"})  # nobody else online
    assert run.has_work({"alice", "bob"})
    assert run.next_batch(cores=1) == Batch(1, 3, 5, rows=(3, 4), exclude_parties=frozenset({"alice"}))


def test_the_batches_still_out_at_a_projects_tail_get_a_second_copy_once():
    runs = Runs()
    run = owned(1, 1, rows=100)
    run.todo.clear()
    for start in (90, 80):
        run.inflight[object()] = Batch(1, start, start + 10)
    runs.add(run)
    assert list(runs.stragglers(5, rows_done=lambda pid: 89)) == []  # under 90% done
    copies = list(runs.stragglers(5, rows_done=lambda pid: 90))
    assert [(r.project_id, c.key, c.copy) for r, c in copies] == [(1, (80, 90), True),
                                                                 (1, (90, 100), True)]
    assert list(runs.stragglers(5, rows_done=lambda pid: 95)) == []  # each once
    held = a_run(rows=10)
    held.hold(copies[0][1])
    assert not held.held  # a copy is only an optimisation: nothing to hold
    held.hold(Batch(1, 3, 5))
    assert held.held and list(held.todo) == [(3, 5), (0, 10)]
