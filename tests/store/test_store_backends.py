"""The store on both backends: every test runs on a real SQLite file and on a real
PostgreSQL server (tests/support/postgres.py starts one from Debian's package for the session).

What is checked is what the engine writes and reads through SQL of its own: submission
in chunks, the results hot path (ON CONFLICT, counters, completion), re-runs, the
systematic stop, replicas and their decision, the dispatcher lease, exports, results
pages, credit and accounts. The last tests run a real project through the dispatcher on
PostgreSQL, and the CLI with ``CONSTELLATION_DB_URL``.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import subprocess
import threading
import time

import pytest
from sqlalchemy import func, select, text

from support import ROOT, engine_env, fixture_bytes, on_backend, python
from engine import accounts, credit, logins, nodes, projects, results
from engine.accounts import Role
from engine.errors import Forbidden, InvalidRequest
from engine.export import export_results
from engine.models import SCHEMA_VERSION, DatasetChunk, Node, Project, Replica, Task, TaskHistory
from engine.settings import Settings
from engine.ledger import decide_rows, record_replicas, record_results
from engine.node.result import RowResult
from engine.status import ProjectStatus, rerun_failed, transition_project
from engine.store import Store
from support.registry import labels_of, ray_node

NODE_A = "a" * 56  # shaped like Ray node ids (hex), so the single-node fast path is taken
NODE_B = "b" * 56


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(request, data_dir) -> Settings:
    return on_backend(request, data_dir)


@pytest.fixture
def store(settings):
    store = Store(settings)
    yield store
    store.engine.dispose()


@pytest.fixture
def fresh(request, settings):
    """Makes settings for another empty database on the same backend."""
    count = itertools.count()

    def make() -> Settings:
        other = settings.replace(data_dir=f"{settings.data_dir}/fresh{next(count)}")
        if settings.db_url:
            server = request.getfixturevalue("postgres_server")
            other = other.replace(db_url=server.create_database())
        return other

    return make


def dialect(store) -> str:
    return store.engine.dialect.name


def submit(store, settings, rows=10, script="square.py", **kw) -> int:
    data = b"x\n" + b"".join(b"%d\n" % i for i in range(rows))
    return projects.submit_project(
        store, settings, accounts.local_admin(store), title="t", script_name=script,
        script_bytes=fixture_bytes(script), dataset_name="d.csv", dataset_bytes=data, **kw)


def running(store, settings, rows=10, **kw) -> int:
    pid = submit(store, settings, rows, **kw)
    with store.session() as session:
        assert transition_project(session, pid, ProjectStatus.RUNNING)
    return pid


def ok(i, cpu=0.01) -> RowResult:
    return RowResult(i, True, json.dumps(i * i), None, None, cpu)


def bad(i, kind="ValueError") -> RowResult:
    return RowResult(i, False, None, f"{kind}: row {i}", f"Traceback (row {i})", 0.01)


def project(store, pid) -> Project:
    with store.session() as session:
        return session.get(Project, pid)


def test_the_backend_is_the_one_asked_for(store, settings):
    assert dialect(store) == ("postgresql" if settings.db_url else "sqlite")
    assert store.schema_version() >= 1


def test_submission_stores_rows_in_chunks_and_nothing_when_invalid(store, settings):
    pid = submit(store, settings, rows=2500)
    with store.session() as session:
        chunks = session.execute(select(DatasetChunk.chunk_index, DatasetChunk.start_row,
                                        DatasetChunk.row_count)
                                 .where(DatasetChunk.project_id == pid)
                                 .order_by(DatasetChunk.chunk_index)).all()
    assert [tuple(c) for c in chunks] == [(0, 0, 1000), (1, 1000, 1000), (2, 2000, 500)]
    view = projects.project_status(store, accounts.local_admin(store), pid)
    assert (view.status, view.rows_total, view.rows_pending) == ("submitted", 2500, 2500)
    with pytest.raises(InvalidRequest):
        submit(store, settings, batch_size=0)
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(Project)) == 1
    # Unicode and None cells survive the round trip through the chunk's JSON text.
    other = projects.submit_project(
        store, settings, accounts.local_admin(store), title="é", script_name="types.py",
        script_bytes=fixture_bytes("types.py"), dataset_name="d.csv",
        dataset_bytes="i,s\n1,ünï\n,\n".encode())
    with store.session() as session:
        payload = session.execute(select(DatasetChunk.payload)
                                  .where(DatasetChunk.project_id == other)).scalar_one()
    assert json.loads(payload) == [[1, "ünï"], [None, None]]


def test_results_are_stored_once_counted_and_complete_the_project(store, settings):
    pid = running(store, settings, rows=10)
    with store.session() as session:
        assert record_results(session, pid, [ok(0), ok(1), bad(2), ok(3)], NODE_A) == (3, 1)
    with store.session() as session:
        # A retried batch: rows 0-3 keep their first result, only 4-5 are new.
        assert record_results(session, pid, [bad(0), ok(1), ok(2), ok(3), ok(4), bad(5)],
                              NODE_B) == (1, 1)
    p = project(store, pid)
    assert (p.rows_succeeded, p.rows_failed, p.status) == (4, 2, "running")
    with store.session() as session:
        # Results from several nodes at once, and without a node (a batch that failed).
        assert record_results(session, pid, [ok(6), ok(7)], None) == (2, 0)
        assert record_results(session, pid, [ok(8), bad(9)], "not-hex") == (1, 1)
    p = project(store, pid)
    assert (p.rows_succeeded, p.rows_failed, p.status) == (7, 3, "complete")
    assert p.finished_at is not None
    with store.session() as session:
        tasks = {t.row_index: t for t in session.execute(
            select(Task).where(Task.project_id == pid)).scalars()}
        # A complete project takes no more results.
        assert record_results(session, pid, [ok(0)], NODE_A) == (0, 0)
    assert tasks[0].status == "succeeded" and tasks[0].node_id == NODE_A
    assert tasks[2].error == "ValueError: row 2" and tasks[2].traceback == "Traceback (row 2)"
    assert tasks[5].node_id == NODE_B and tasks[6].node_id is None
    assert tasks[1].output == "1" and tasks[1].cpu_seconds == pytest.approx(0.01)
    assert isinstance(tasks[1].finished_at, float) and tasks[1].verification == "unverified"


def test_a_large_batch_counts_exactly(store, settings):
    pid = running(store, settings, rows=20_000)
    first = [ok(i) if i % 10 else bad(i) for i in range(0, 12_000)]
    again = [ok(i) for i in range(10_000, 20_000)]  # overlaps the first batch by 2,000 rows
    with store.session() as session:
        assert record_results(session, pid, first, NODE_A) == (10_800, 1_200)
    with store.session() as session:
        assert record_results(session, pid, again, NODE_B) == (8_000, 0)
    p = project(store, pid)
    assert (p.rows_succeeded, p.rows_failed, p.status) == (18_800, 1_200, "complete")


def test_nul_characters_in_errors_and_outputs_are_stored(store, settings):
    pid = running(store, settings, rows=3)
    junk = [RowResult(0, False, None, "ValueError: a\x00b", "line\x00", 0.0),
            RowResult(1, True, '"x\x00y"', None, None, 0.0)]
    with store.session() as session:
        assert record_results(session, pid, junk, NODE_A) == (1, 1)
        assert record_results(session, pid, [RowResult(2, False, None, "E: \x00", None, 0.0)],
                              "other") == (0, 1)
    with store.session() as session:
        tasks = {t.row_index: t for t in session.execute(
            select(Task).where(Task.project_id == pid)).scalars()}
    # SQLite keeps the character; PostgreSQL cannot, and stores its JSON escape instead.
    nul = "\x00" if dialect(store) == "sqlite" else "\\u0000"
    assert tasks[0].error == f"ValueError: a{nul}b" and tasks[0].traceback == f"line{nul}"
    assert tasks[1].output == f'"x{nul}y"'
    assert tasks[2].error == f"E: {nul}"


def test_systematic_failure_stops_the_project(store, settings):
    pid = running(store, settings, rows=100)
    with store.session() as session:
        record_results(session, pid, [bad(i, "KeyError") for i in range(10)], NODE_A,
                       systematic_rows=20)
    assert project(store, pid).status == "running"
    with store.session() as session:
        record_results(session, pid, [bad(i, "KeyError") for i in range(10, 20)], NODE_A,
                       systematic_rows=20)
    p = project(store, pid)
    assert p.status == "failed" and p.error == "stopped: the first 20 rows all raised KeyError"
    assert p.error_traceback.startswith("Traceback (row ")


def test_rerun_failed_moves_failures_to_history(store, settings):
    pid = running(store, settings, rows=6)
    with store.session() as session:
        record_results(session, pid, [ok(0), bad(1), ok(2), bad(3), ok(4), ok(5)], NODE_A)
    assert project(store, pid).status == "complete"
    with store.session() as session:
        assert rerun_failed(session, pid) == 2
    p = project(store, pid)
    assert (p.status, p.attempt, p.rows_succeeded, p.rows_failed, p.finished_at) == \
        ("submitted", 2, 4, 0, None)
    with store.session() as session:
        history = session.execute(select(TaskHistory.row_index, TaskHistory.attempt,
                                         TaskHistory.error)
                                  .order_by(TaskHistory.row_index)).all()
        assert [tuple(h) for h in history] == [(1, 1, "ValueError: row 1"),
                                               (3, 1, "ValueError: row 3")]
        assert session.scalar(select(func.count()).select_from(Task)
                              .where(Task.project_id == pid)) == 4
        assert rerun_failed(session, pid) == -1  # submitted again: nothing to re-run
        transition_project(session, pid, ProjectStatus.RUNNING)
        record_results(session, pid, [ok(1), ok(3)], NODE_B)
    assert project(store, pid).status == "complete"


def test_replicas_are_kept_then_decided(store, settings):
    pid = running(store, settings, rows=3, replication=2)
    with store.session() as session:
        assert record_replicas(session, pid, "alice", NODE_A, [ok(0), ok(1), ok(2)]) == 3
        assert record_replicas(session, pid, "alice", NODE_A, [ok(0)]) == 0  # never twice
        assert record_replicas(session, pid, "bob", NODE_B,
                               [ok(0), RowResult(1, True, "7", None, None, 0.5), bad(2)]) == 3
    assert project(store, pid).executions == 6
    with store.session() as session:
        decide_rows(session, pid, [
            (ok(0), NODE_A, "verified", ("alice", "bob"), ("alice", "bob")),
            (RowResult(1, False, None, "Inconclusive: no agreement", None, 0.0), None,
             "inconclusive", (), ("alice", "bob")),
        ])
    p = project(store, pid)
    assert (p.rows_succeeded, p.rows_failed, p.rows_verified, p.rows_inconclusive, p.status) == \
        (1, 1, 1, 1, "running")
    with store.session() as session:
        decide_rows(session, pid, [(ok(2), NODE_A, "verified-by-trust", ("alice",), ("alice", "bob"))])
        agreed = {(r.row_index, r.party): r.agreed for r in session.execute(
            select(Replica).where(Replica.project_id == pid)).scalars()}
        verification = dict(session.execute(select(Task.row_index, Task.verification)
                                             .where(Task.project_id == pid)).all())
    assert agreed == {(0, "alice"): True, (0, "bob"): True, (1, "alice"): False,
                      (1, "bob"): False, (2, "alice"): True, (2, "bob"): False}
    assert verification == {0: "verified", 1: "inconclusive", 2: "verified-by-trust"}
    p = project(store, pid)
    assert (p.rows_verified, p.status) == (2, "complete")


def test_replicas_settle_into_decisions_and_trust_and_recover_after_a_restart(store, settings):
    """What the dispatcher does with a volunteer's replicas (replication.settle), and what a
    restarted dispatcher reloads (replication.recover)."""
    import random

    from engine import replication, verification
    from engine.verification import Comparison

    def tracker():
        return replication.ReplicaTracker(replication=2, max_replicas=3,
                                          comparison=Comparison.EXACT, tolerance=1e-9,
                                          spot_check_rate=0.1, rng=random.Random(0))

    pid = running(store, settings, rows=3, replication=2)
    online = {"alice", "bob", "carol"}
    first = tracker()
    with store.session() as session:
        decided = replication.settle(session, first, pid, "sha", "alice", NODE_A,
                                     [ok(0), ok(1), ok(2)], online)
        assert decided == []  # one replica decides nothing while others are online
        decided = replication.settle(session, first, pid, "sha", "bob", NODE_B,
                                     [ok(0), RowResult(1, True, "7", None, None, 0.5)], online)
        assert [(r.row_index, how, agreeing) for r, _node, how, agreeing, _ in decided] == \
            [(0, "verified", ("alice", "bob"))]
        # Row 1 disagreed: it waits for a third volunteer; row 2 still waits for a second.
        assert verification.trusted(session, "alice", "sha") is False  # one agreement only
    p = project(store, pid)
    assert (p.rows_verified, p.executions) == (1, 5)
    # A new dispatcher knows nothing: it reloads rows 1 and 2 with the volunteers they had.
    second = tracker()
    with store.session() as session:
        assert replication.recover(session, second, pid) == {1, 2}
    assert second.parties(1) == {"alice", "bob"} and second.parties(2) == {"alice"}
    assert dict(second.take_followups(online)) == {frozenset({"alice", "bob"}): [1],
                                                   frozenset({"alice"}): [2]}


def test_the_lease_has_one_holder(store, settings):
    assert store.lease_holder() is None
    assert store.cluster_health()["status"] == "no dispatcher"
    assert store.acquire_lease("one", 5.0)
    assert store.acquire_lease("one", 5.0)  # renewal
    assert not store.acquire_lease("two", 5.0)
    assert store.lease_holder() == "one"
    with store.session() as session:
        session.execute(text("UPDATE dispatcher_lease SET expires_at = 0"))  # one stopped renewing
    assert store.acquire_lease("two", 5.0)
    assert not store.acquire_lease("one", 5.0)
    store.release_lease("two")
    assert store.lease_holder() is None


def test_racing_dispatchers_never_share_the_lease(fresh):
    """Fresh databases, eight holders at once, several rounds: exactly one wins each time."""
    for _ in range(3):
        settings = fresh()
        stores = [Store(settings) for _ in range(8)]
        barrier = threading.Barrier(len(stores))
        won = []

        def race(index, handle):
            barrier.wait()
            if handle.acquire_lease(f"holder-{index}", 30.0):
                won.append(index)

        threads = [threading.Thread(target=race, args=(i, s)) for i, s in enumerate(stores)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert len(won) == 1, won
        assert stores[0].lease_holder() == f"holder-{won[0]}"
        for handle in stores:
            handle.engine.dispose()


def test_processes_starting_together_create_the_schema_once(fresh):
    """The portal and the dispatcher start at the same time: both must come up."""
    settings = fresh()
    barrier = threading.Barrier(6)
    made, errors = [], []

    def start():
        barrier.wait()
        try:
            made.append(Store(settings))
        except Exception as exc:  # reported below: the test is that none happens
            import traceback
            errors.append(traceback.format_exc())

    threads = [threading.Thread(target=start) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == [] and len(made) == 6
    with made[0].session() as session:
        assert session.execute(text("SELECT COUNT(*) FROM meta")).scalar_one() == 1
    for handle in made:
        handle.engine.dispose()


def test_backup_is_sqlite_only_and_says_so(store, settings, tmp_path):
    if dialect(store) == "sqlite":
        assert store.backup(tmp_path / "copy.db").exists()
    else:
        with pytest.raises(InvalidRequest, match="pg_dump"):
            store.backup(tmp_path / "copy.db")


def exported(store, pid, fmt) -> str:
    out = io.StringIO()
    export_results(store, accounts.local_admin(store), pid, fmt, out)
    return out.getvalue()


def test_exports_stream_every_row_in_order(store, settings):
    pid = running(store, settings, rows=2100, script="dict_output.py")
    with store.session() as session:
        record_results(session, pid, [
            RowResult(i, True, json.dumps({"y": i, "x": "clash"}), None, None, 0.0)
            if i % 5 else bad(i) for i in range(0, 2000)], NODE_A)
    rows = json.loads(exported(store, pid, "json"))
    assert [r["row"] for r in rows] == list(range(2100))
    assert rows[1] == {"row": 1, "status": "succeeded", "output": {"y": 1, "x": "clash"},
                       "error": None, "verification": "unverified"}
    assert rows[5]["error"] == "ValueError: row 5" and rows[2050]["status"] == "pending"
    table = list(csv.reader(io.StringIO(exported(store, pid, "csv"))))
    assert table[0] == ["x", "y", "output.x", "error", "verification"]
    assert table[2] == ["1", "1", "clash", "", "unverified"]
    assert table[6] == ["5", "", "", "ValueError: row 5", "unverified"]
    assert table[-1] == ["2099", "", "", "", ""] and len(table) == 2101


def test_results_pages_failed_rows_and_error_groups(store, settings):
    owner = accounts.local_admin(store)
    pid = running(store, settings, rows=2500)
    with store.session() as session:
        record_results(session, pid, [
            (bad(i, "ValueError" if i % 2 else "KeyError") if i % 7 == 0 else ok(i))
            for i in range(2000)], NODE_A)
    page = results.results_page(store, owner, pid, start=995, limit=10)
    assert [r.row for r in page.rows] == list(range(995, 1005)) and page.total == 2500
    assert page.rows[1].values == {"x": 996} and page.rows[1].output == 996 * 996
    assert page.rows[6].error == "ValueError: row 1001"
    assert {r.status for r in results.results_page(store, owner, pid, start=2400).rows} == {"pending"}
    seen, after = [], -1
    while True:
        failed = results.failed_page(store, owner, pid, after=after, limit=50)
        seen += [r.row for r in failed.rows]
        if failed.next_after is None:
            break
        after = failed.next_after
    assert seen == [i for i in range(2000) if i % 7 == 0]
    groups = results.error_groups(store, owner, pid)
    assert [(g.kind, g.count, g.example_row) for g in groups] == \
        [("KeyError", 143, 0), ("ValueError", 143, 7)]
    assert groups[0].example_traceback == "Traceback (row 0)"


def test_failed_row_queries_use_the_failed_rows_index(store, settings):
    if dialect(store) != "sqlite":
        pytest.skip("PostgreSQL's planner chooses from statistics; SQLite is told")
    from sqlalchemy import event

    owner = accounts.local_admin(store)
    pid = running(store, settings, rows=3000)
    with store.session() as session:
        record_results(session, pid, [bad(i) if i % 100 == 0 else ok(i) for i in range(3000)],
                       NODE_A)
    seen: list[str] = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        if "status = 'failed'" in statement:
            seen.append(statement)

    event.listen(store.engine, "before_cursor_execute", capture)
    try:
        results.failed_page(store, owner, pid, after=-1, limit=10)
        results.error_groups(store, owner, pid)
    finally:
        event.remove(store.engine, "before_cursor_execute", capture)
    assert len(seen) == 2
    with store.engine.connect() as connection:
        for statement in seen:
            plan = connection.exec_driver_sql(
                "EXPLAIN QUERY PLAN " + statement.replace("?", "1")).all()
            assert any("ix_tasks_failed" in step[-1] for step in plan), (statement, plan)


def test_a_version_1_database_is_migrated(store, settings):
    with store.session() as session:
        session.execute(text("DROP INDEX ix_tasks_failed"))
        session.execute(text("CREATE INDEX ix_tasks_project_status "
                             "ON tasks (project_id, status, row_index)"))
        session.execute(text("UPDATE meta SET value = '1' WHERE key = 'schema_version'"))
    assert store.schema_version() == 1
    migrated = Store(settings)
    assert migrated.schema_version() == SCHEMA_VERSION
    with migrated.engine.connect() as connection:
        if dialect(store) == "sqlite":
            names = connection.exec_driver_sql(
                "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'tasks'")
        else:
            names = connection.exec_driver_sql(
                "SELECT indexname FROM pg_indexes WHERE tablename = 'tasks'")
        names = {name for (name,) in names}
    assert "ix_tasks_failed" in names and "ix_tasks_project_status" not in names
    migrated.engine.dispose()


_HEALTH_COLUMNS = ("health", "health_reason", "failures", "quarantined_until", "checked_at",
                   "trusted")


def test_a_version_2_database_gets_node_health(store, settings):
    now = time.time()
    with store.session() as session:
        session.add(Node(node_id="n1", first_seen=now, last_seen=now))
    with store.session() as session:
        for column in _HEALTH_COLUMNS:
            session.execute(text(f"ALTER TABLE nodes DROP COLUMN {column}"))
        session.execute(text("UPDATE meta SET value = '2' WHERE key = 'schema_version'"))
    migrated = Store(settings)
    assert migrated.schema_version() == SCHEMA_VERSION
    with migrated.session() as session:
        node = session.get(Node, "n1")
        assert (node.health, node.failures, node.trusted) == ("checking", 0, False)
    migrated.engine.dispose()


def test_credit_and_the_leaderboard(store, settings):
    for name in ("alice", "bob"):
        accounts.create_user(store, name, {Role.VOLUNTEER})
    alice = labels_of(nodes.join_command(store, settings, "alice"))
    bob = labels_of(nodes.join_command(store, settings, "bob"))
    nodes.sync_registry(store, settings, [
        ray_node("head", {"constellation-role": "head"}, head=True),
        ray_node(NODE_A, alice), ray_node(NODE_B, bob)])
    assert {v.node_id: v.attribution for v in nodes.list_nodes(store)} == \
        {"head": "head", NODE_A: "alice", NODE_B: "bob"}
    # Unreplicated but verified (as a trusted volunteer's rows are).
    pid = running(store, settings, rows=6)
    with store.session() as session:
        record_results(session, pid, [ok(0, 0.1), ok(1, 0.2), ok(2, 0.3)], NODE_A,
                       verification="verified")
        record_results(session, pid, [ok(3, 5.0), bad(4)], NODE_B, verification="verified")
        # The last row finished in the last fraction of an hour: it counts in that hour.
        record_results(session, pid, [ok(5, 9.0)], "head", verification="verified")
        session.execute(text("UPDATE tasks SET finished_at = :t WHERE row_index = 0"),
                        {"t": 3600 * 490_000 - 0.3})
    # A replicated project: each agreeing replica earns.
    rid = running(store, settings, rows=1, replication=2)
    with store.session() as session:
        record_replicas(session, rid, "alice", NODE_A, [ok(0, 1.0)])
        record_replicas(session, rid, "bob", NODE_B, [ok(0, 3.0)])
        decide_rows(session, rid, [(ok(0, 1.0), NODE_A, "verified", ("alice", "bob"),
                                    ("alice", "bob"))])
    credit.refresh(store, force=True)
    with store.session() as session:
        assert credit.project_median(session, pid) == (pytest.approx(0.3), 5)  # 0.1 .2 .3 5 9
        assert credit.project_median(session, rid) == (2.0, 2)
        hours = dict(session.execute(select(credit.CreditRollup.node_id, func.min(
            credit.CreditRollup.hour)).group_by(credit.CreditRollup.node_id)).all())
    assert hours[NODE_A] == 489_999  # floored, never rounded up
    board = {r.volunteer: r for r in credit.leaderboard(store, "all")}
    assert set(board) == {"alice", "bob"}
    assert (board["alice"].tasks, board["alice"].credit) == (4, pytest.approx(3 * 0.3 + 2.0))
    assert (board["bob"].tasks, board["bob"].credit) == (2, pytest.approx(0.3 + 2.0))
    assert board["alice"].rank == 1 and board["bob"].rank == 2
    recent = {r.volunteer: r.tasks for r in credit.leaderboard(store, "24h")}
    assert recent == {"alice": 3, "bob": 2}  # alice's back-dated row is outside the window
    activity = credit.node_activity(store, [NODE_A, NODE_B])
    assert activity[NODE_A][0] == 4 and activity[NODE_B][0] == 3


def test_accounts_sign_in_lock_and_disable(store, settings):
    admin = accounts.add_user(store, "Root-1", {Role.ADMIN}, password="long enough pw")
    accounts.register_user(store, "ada", "ada@x.org", "correct horse", {Role.RESEARCHER})
    with pytest.raises(InvalidRequest, match="taken"):
        accounts.register_user(store, "ADA", "a@x.org", "correct horse", {Role.RESEARCHER})
    assert logins.authenticate(store, "ada", "correct horse").name == "ada"
    for _ in range(5):
        with pytest.raises(Forbidden):
            logins.authenticate(store, "ada", "wrong password")
    assert logins.login_lock_remaining(store, "ada") > 0
    with pytest.raises(Forbidden, match="too many"):
        logins.authenticate(store, "ada", "correct horse")
    assert logins.login_credentials(store)["usernames"]["ada"]["failed_login_attempts"] == 5
    logins.clear_login_failures(store, "ada")
    accounts.disable_user(store, admin, "ada")
    with pytest.raises(Forbidden, match="disabled"):
        logins.authenticate(store, "ada", "correct horse")
    assert set(logins.login_credentials(store)["usernames"]) == {"root-1"}
    assert [(u.name, u.disabled) for u in accounts.list_users(store, admin)] == \
        [("root-1", False), ("ada", True)]


def test_the_cli_works_through_constellation_db_url(store, settings):
    env = engine_env(settings)
    if settings.db_url:
        env["CONSTELLATION_DB_URL"] = settings.db_url
    script, data = ROOT / "tests" / "fixtures" / "square.py", ROOT / "tests" / "fixtures" / "numbers.csv"
    done = subprocess.run([python(), "-m", "engine", "submit", str(script), str(data)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    pid = int(done.stdout.strip())
    done = subprocess.run([python(), "-m", "engine", "status", str(pid), "--json"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "submitted"
    # The test's own store sees the same database the CLI wrote.
    assert project(store, pid).title == "square.py"


@pytest.mark.slow
def test_a_project_runs_end_to_end_on_postgresql(postgres_server, data_dir, ray_head):
    from engine.scheduler import Dispatcher

    settings = Settings(data_dir=str(data_dir), row_timeout=10.0, replication=1,
                        ray_port=ray_head.ray_port, db_url=postgres_server.create_database())
    store = Store(settings)
    pid = submit(store, settings, rows=3000, script="raises.py", batch_size=250)
    deadline = time.monotonic() + 180

    def ended():
        assert time.monotonic() < deadline, "the project did not end in time"
        return ProjectStatus(project(store, pid).status).is_terminal()

    Dispatcher(store, settings).run(until=ended)
    view = projects.project_status(store, accounts.local_admin(store), pid)
    assert (view.status, view.rows_succeeded, view.rows_failed) == ("complete", 2000, 1000)
    rows = json.loads(exported(store, pid, "json"))
    assert [r["row"] for r in rows] == list(range(3000))
    assert rows[3]["error"] == "ValueError: row 3 is divisible by three"
    assert rows[4]["output"] == 4
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(Task)
                              .where(Task.node_id.is_(None))) == 0
    assert store.lease_holder() is None  # the dispatcher let go of its lease
    store.engine.dispose()
