"""Storage quotas (issue #13, "one user never affects another"): a project, and all of one
owner's projects, store at most ``project_storage_mb`` and ``user_storage_mb`` of results.

60 rows of 9 MB once grew the database to 777 MB. Now, when a batch of results would take
a project or its owner over a quota, the project fails with an error naming the quota, the
results stored before stay, nothing of that batch is stored, and other people's projects
go on. Each test runs on a real SQLite file and a real PostgreSQL server, through the
engine's own status functions, as the dispatcher stores results.
"""

from __future__ import annotations

import json
import random

import pytest
from sqlalchemy import func, inspect, select, text

from support import fixture_bytes, on_backend
from engine import accounts, projects, replication
from engine.accounts import Role
from engine.models import SCHEMA_VERSION, Project, Replica, Task, TaskHistory
from engine.parties import TRUSTED_PARTY
from engine.scheduler import Dispatcher
from engine.settings import Settings
from engine.ledger import admit_results, record_replicas, record_results
from engine.node.result import RowResult
from engine.quota import StorageQuota
from engine.status import ProjectStatus, rerun_failed, transition_project
from engine.store import Store
from engine.verification import Comparison

NODE = "a" * 56  # shaped like a Ray node id, so the hot path is the one taken
KB = 1000


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(request, data_dir) -> Settings:
    return on_backend(request, data_dir, project_storage_mb=1, user_storage_mb=0)


@pytest.fixture
def store(settings):
    store = Store(settings)
    for name in ("ada", "bob"):
        accounts.add_user(store, name, {Role.RESEARCHER}, password="long enough")
    yield store
    store.engine.dispose()


def running(store, owner: str, rows: int = 10, replication: int = 1) -> int:
    data = b"x\n" + b"".join(b"%d\n" % i for i in range(rows))
    pid = projects.submit_project(
        store, store.settings, accounts.get_user(store, owner), title=f"{owner}'s",
        script_name="square.py", script_bytes=fixture_bytes("square.py"), dataset_name="d.csv",
        dataset_bytes=data, replication=replication)
    with store.session() as session:
        assert transition_project(session, pid, ProjectStatus.RUNNING)
    return pid


def big(row: int, size: int) -> RowResult:
    """A row whose output is ``size`` bytes of JSON text (a string)."""
    return RowResult(row, True, json.dumps("x" * (size - 2)), None, None, 0.01)


def store_results(store, pid: int, results) -> tuple[int, int]:
    with store.session() as session:
        return record_results(session, pid, results, NODE,
                              quota=StorageQuota.from_settings(store.settings))


def project(store, pid: int) -> Project:
    with store.session() as session:
        return session.get(Project, pid)


def stored_rows(store, pid: int) -> list[int]:
    with store.session() as session:
        return list(session.execute(select(Task.row_index).where(Task.project_id == pid)
                                    .order_by(Task.row_index)).scalars())


def test_a_project_past_its_quota_fails_keeps_its_results_and_others_go_on(store):
    ada, bob = running(store, "ada"), running(store, "bob")
    assert store_results(store, ada, [big(0, 300 * KB), big(1, 300 * KB)]) == (2, 0)
    assert project(store, ada).stored_bytes == 600 * KB
    # 1.2 MB would pass project_storage_mb = 1: the project fails, the batch is not stored.
    assert store_results(store, ada, [big(2, 300 * KB), big(3, 300 * KB)]) == (0, 0)
    failed = project(store, ada)
    assert failed.status == ProjectStatus.FAILED
    assert failed.error == (
        f"stopped: project {ada} has stored 0.6 MB of results, and its next batch would take "
        f"it to 1.1 MB, over its storage quota (project_storage_mb = 1); the results stored so "
        f"far are kept, and rows without one will not run. Return smaller outputs, or ask an "
        f"admin to raise project_storage_mb")
    assert stored_rows(store, ada) == [0, 1]
    assert (failed.rows_succeeded, failed.stored_bytes) == (2, 600 * KB)
    # A batch that was still running when the project failed stores nothing either.
    assert store_results(store, ada, [big(4, 10)]) == (0, 0)
    assert stored_rows(store, ada) == [0, 1]
    # Bob's project, in the same store, runs on to the end.
    assert store_results(store, bob, [big(i, 90 * KB) for i in range(10)]) == (10, 0)
    assert project(store, bob).status == ProjectStatus.COMPLETE


def test_the_owners_quota_counts_all_their_projects(store, settings):
    settings = settings.replace(project_storage_mb=0, user_storage_mb=1)
    store.settings = settings
    first, second, other = running(store, "ada"), running(store, "ada"), running(store, "bob")
    assert store_results(store, first, [big(0, 500 * KB), big(1, 200 * KB)]) == (2, 0)
    assert store_results(store, second, [big(0, 200 * KB)]) == (1, 0)
    assert store_results(store, other, [big(0, 900 * KB)]) == (1, 0)  # bob's own quota
    # 0.9 MB of ada's, and 0.2 MB more would pass user_storage_mb = 1.
    assert store_results(store, second, [big(1, 200 * KB)]) == (0, 0)
    error = project(store, second).error
    assert project(store, second).status == ProjectStatus.FAILED
    assert error.startswith(f"stopped: the projects of ada have stored 0.9 MB of results "
                            f"together, and project {second}'s next batch would take them to "
                            f"1.0 MB, over the owner's storage quota (user_storage_mb = 1)")
    assert error.endswith("ask an admin to raise user_storage_mb")
    assert stored_rows(store, second) == [0]
    # Ada's first project is untouched until a batch of its own would go over.
    assert project(store, first).status == ProjectStatus.RUNNING
    assert store_results(store, first, [big(2, 100 * KB)]) == (1, 0)
    assert store_results(store, first, [big(3, 100 * KB)]) == (0, 0)
    assert project(store, first).status == ProjectStatus.FAILED
    assert project(store, other).status == ProjectStatus.RUNNING
    assert store_results(store, other, [big(1, 10)]) == (1, 0)


def test_stored_bytes_count_utf8_errors_tracebacks_and_retried_batches_once(store):
    pid = running(store, "ada", rows=4)
    results = [RowResult(0, True, json.dumps("é" * 10, ensure_ascii=False), None, None, 0.1),
               RowResult(1, False, None, "ValueError: ü", "Traceback: ü", 0.1)]
    store_results(store, pid, results)
    expected = len(json.dumps("é" * 10, ensure_ascii=False).encode()) + \
        len("ValueError: ü".encode()) + len("Traceback: ü".encode())
    assert project(store, pid).stored_bytes == expected
    store_results(store, pid, results + [big(2, 50)])  # rows 0 and 1 were stored already
    assert project(store, pid).stored_bytes == expected + 50
    # At the quota's edge, rows already stored do not count towards the next batch.
    store_results(store, pid, [big(3, 1024 * 1024 - expected - 50)] + results)
    p = project(store, pid)
    assert (p.status, p.stored_bytes) == (ProjectStatus.COMPLETE, 1024 * 1024)


def test_replicas_are_admitted_with_room_for_their_accepted_copy(store):
    """A replicated project through replication.settle, as the dispatcher runs it: the
    head's replica is also stored as the row's (trusted) result, so it counts twice."""
    pid = running(store, "ada", rows=4, replication=2)
    tracker = replication.ReplicaTracker(replication=2, max_replicas=3, comparison=Comparison.EXACT,
                                         tolerance=1e-9, spot_check_rate=0.1, rng=random.Random(0))
    quota = StorageQuota.from_settings(store.settings)

    def arrive(results) -> bool:
        with store.session() as session:
            if not admit_results(session, pid, results, quota, party=TRUSTED_PARTY):
                return False
            replication.settle(session, tracker, pid, "sha", TRUSTED_PARTY, NODE, results, set())
            return True

    assert arrive([big(0, 300 * KB)])
    assert project(store, pid).stored_bytes == 600 * KB  # the replica and the accepted result
    assert not arrive([big(1, 300 * KB)])  # 0.6 MB more would pass 1 MB
    p = project(store, pid)
    assert p.status == ProjectStatus.FAILED and "project_storage_mb = 1" in p.error
    assert (p.stored_bytes, p.rows_succeeded, p.executions) == (600 * KB, 1, 1)
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(Replica)
                              .where(Replica.project_id == pid)) == 1


def test_the_dispatcher_stores_results_under_the_settings_quota(store):
    """The dispatcher's store step (no Ray needed for it) passes the settings' quota."""
    dispatcher = Dispatcher(store, store.settings)
    pid = running(store, "ada")
    dispatcher.writer.record(pid, [big(0, 600 * KB)], NODE)
    dispatcher.writer.record(pid, [big(1, 600 * KB)], NODE)
    assert project(store, pid).status == ProjectStatus.FAILED
    assert stored_rows(store, pid) == [0]
    assert not dispatcher.writer.pending()  # refused, not waiting to be written again


def test_a_version_5_database_counts_what_its_projects_hold(store, settings):
    """Schema version 6 adds projects.stored_bytes: an upgraded database gets each
    project's bytes computed in SQL, equal to the count the engine keeps as results arrive."""
    pid = running(store, "ada", rows=4)
    store.settings = settings.replace(project_storage_mb=0)
    store_results(store, pid, [RowResult(0, True, json.dumps("é" * 7, ensure_ascii=False), None,
                                         None, 0.1),
                               RowResult(1, False, None, "ValueError: no", "Traceback: x", 0.1)])
    with store.session() as session:
        assert transition_project(session, pid, ProjectStatus.FAILED)
        assert rerun_failed(session, pid) == 1  # row 1's outcome moves to task_history
        assert session.scalar(select(func.count()).select_from(TaskHistory)) == 1
        assert record_replicas(session, pid, "vic", NODE,
                               [RowResult(2, True, "[1, 2]", None, None, 0.1)]) == 1
    counted = project(store, pid).stored_bytes
    assert counted == len(json.dumps("é" * 7, ensure_ascii=False).encode()) + 14 + 12 + 6
    with store.session() as session:
        session.execute(text("DROP INDEX ix_projects_owner_id"))
        session.execute(text("ALTER TABLE projects DROP COLUMN stored_bytes"))
        session.execute(text("UPDATE meta SET value = '5' WHERE key = 'schema_version'"))
    migrated = Store(settings)
    assert migrated.schema_version() == SCHEMA_VERSION == 6
    with migrated.session() as session:
        assert session.get(Project, pid).stored_bytes == counted
    assert "ix_projects_owner_id" in {i["name"] for i in inspect(migrated.engine).get_indexes("projects")}
    migrated.engine.dispose()
