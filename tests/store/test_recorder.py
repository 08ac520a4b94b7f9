"""engine.recorder: results the store refuses stay in memory and are written again once it
accepts writes, for replicated projects as for the others, and the project cannot
complete meanwhile.

The store is a real SQLite file on an 8 MB tmpfs that a filler file fills up (as in
tests/ray/test_reliability.py's full-disk test, here without Ray): the writer gets the results
a batch would bring back.
"""

from __future__ import annotations

import json
import threading

import pytest
from sqlalchemy import func, select

from support import fill_disk as fill, small_disk as small_disk_at, submit_numbers
from engine.models import Project, Replica, Task
from engine.recorder import ResultWriter
from engine.replication import ReplicaTracker
from engine.settings import Settings
from engine.node.result import RowResult
from engine.status import ProjectStatus, transition_project
from engine.store import Store
from engine.verification import Comparison

A1, B1 = "a1" * 28, "b1" * 28
BIG = json.dumps("x" * 1_500_000)  # more than the write-ahead log holds before the disk fills


@pytest.fixture
def small_disk():
    with small_disk_at("cr-rec-") as mount_point:
        yield mount_point


@pytest.fixture
def store(small_disk):
    store = Store(Settings(data_dir=str(small_disk), row_timeout=10.0, replication=1))
    yield store
    store.engine.dispose()


def running(store, rows: int, replication: int = 1) -> int:
    pid = submit_numbers(store, store.settings, "square.py", rows, replication=replication)
    with store.session() as session:
        assert transition_project(session, pid, ProjectStatus.RUNNING)
    return pid


def project(store, pid: int) -> Project:
    with store.session() as session:
        return session.get(Project, pid)


def test_results_the_full_disk_refused_are_written_once_it_has_room(store, small_disk):
    writer = ResultWriter(store, store.settings)
    pid = running(store, rows=2)
    writer.record(pid, [RowResult(0, True, "0", None, None, 0.1)], "n" * 56)
    filler = fill(small_disk)
    writer.record(pid, [RowResult(1, True, BIG, None, None, 0.1)], "n" * 56)
    assert writer.pending(pid) and "database or disk is full" in writer.error
    assert project(store, pid).status == ProjectStatus.RUNNING  # never complete with rows missing
    assert writer.retry() == [] and writer.pending(pid)  # still full: kept again
    filler.unlink()
    assert writer.retry() == [pid]
    assert not writer.pending() and writer.error == ""
    p = project(store, pid)
    assert (p.status, p.rows_succeeded) == (ProjectStatus.COMPLETE, 2)


def test_replicas_the_full_disk_refused_are_settled_once_it_has_room(store, small_disk):
    """alice's replica of the one row is stored; bob's agreeing one comes while the disk is
    full. Once it has room, bob's is written and the row is verified: the tracker did not
    keep what the store refused (or it would have taken the row as decided, and it would
    wait for a third replica)."""
    writer = ResultWriter(store, store.settings)
    pid = running(store, rows=1, replication=2)
    tracker = ReplicaTracker(replication=2, max_replicas=4, comparison=Comparison.EXACT,
                             tolerance=1e-9, spot_check_rate=0.0)

    def replica(party: str, node_id: str) -> bool:
        return writer.record_replicas(pid, [RowResult(0, True, BIG, None, None, 0.1)],
                                      node_id=node_id, party=party, tracker=tracker,
                                      script_sha256="sha", parties_online=lambda: {"alice", "bob"})

    assert replica("alice", A1) and not writer.pending()
    # The dispatcher sends the row to a volunteer other than alice.
    assert tracker.take_followups({"alice", "bob"}) == [(frozenset({"alice"}), [0])]
    filler = fill(small_disk)
    assert replica("bob", B1)  # not refused by the quota: kept to be written again
    assert writer.pending(pid) and "database or disk is full" in writer.error
    assert tracker.parties(0) == {"alice"} and tracker.waiting_rows() == 0
    assert project(store, pid).status == ProjectStatus.RUNNING
    filler.unlink()
    assert writer.retry() == [pid]
    assert not writer.pending() and writer.error == ""
    p = project(store, pid)
    assert (p.status, p.rows_succeeded, p.rows_verified) == (ProjectStatus.COMPLETE, 1, 1)
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(Replica)
                              .where(Replica.project_id == pid)) == 2
        assert session.scalar(select(Task.output).where(Task.project_id == pid)) == BIG
    assert tracker.waiting_rows() == 0 and tracker.parties(0) == frozenset()


def test_the_writer_is_used_on_one_thread(tmp_path):
    store = Store(Settings(data_dir=str(tmp_path), row_timeout=10.0, replication=1))
    writer = ResultWriter(store, store.settings)
    pid = running(store, rows=2)
    writer.record(pid, [RowResult(0, True, "0", None, None, 0.1)], None)
    refused = []

    def elsewhere() -> None:
        try:
            writer.record(pid, [RowResult(1, True, "1", None, None, 0.1)], None)
        except RuntimeError as exc:
            refused.append(str(exc))

    thread = threading.Thread(target=elsewhere)
    thread.start()
    thread.join()
    assert refused == ["the result writer is used on one thread only"]
    assert project(store, pid).rows_succeeded == 1
    store.engine.dispose()
