"""Verification by replication on a real multi-node cluster with a dishonest volunteer.

Three volunteers join by their join commands, each a real 1-CPU ``ray start`` node:
alice and bob are honest; carol's node is started with ``PYTHONPATH`` pointing at
``tests/fixtures/cheater``, whose ``sitecustomize.py`` makes every Ray worker on her
node forge the results it reports (nothing in the engine knows about it). The head
offers no CPUs (``ray_num_cpus=0``): the head would count as a fourth party that is never
trusted, which would blur both the quorum arithmetic (three parties, so the notice for
``replication = 4`` is exact) and the adaptive-trust measurement. The head's own work is
covered by tests/cluster/test_volunteers.py.

Tests run in file order on one cluster; each uses its own script, because trust is kept
per volunteer and script. The last test adds a fourth volunteer, dave, and stops his node.
"""

from __future__ import annotations

import io
import json
import math
import time
from typing import Callable

import pytest
from sqlalchemy import select

from support import FIXTURES
from engine import accounts, credit, projects
from engine.export import export_results
from engine.models import Project, Replica, Task
from engine.verification import TRUST_STREAK, trust_levels
from volunteer_cluster import (add_volunteer, ended, run_to_end, run_until, submit,
                               volunteer_cluster)

pytestmark = pytest.mark.slow

HONEST = ("alice", "bob")
CHEATER = "carol"
VOLUNTEERS = (*HONEST, CHEATER)


@pytest.fixture(scope="module")
def cluster():
    with volunteer_cluster(VOLUNTEERS, head_cpus=0,
                           pythonpath={CHEATER: FIXTURES / "cheater"}) as state:
        yield state


# -- reading the store ----------------------------------------------------------------------


def replicas_of(cluster, pid) -> dict[int, dict[str, Replica]]:
    """row -> party -> its replica (every candidate result the engine kept)."""
    out: dict[int, dict[str, Replica]] = {}
    with cluster.store.session() as session:
        for replica in session.execute(select(Replica).where(Replica.project_id == pid)).scalars():
            session.expunge(replica)
            out.setdefault(replica.row_index, {})[replica.party] = replica
    return out


def tasks_of(cluster, pid) -> dict[int, Task]:
    with cluster.store.session() as session:
        tasks = session.execute(select(Task).where(Task.project_id == pid)).scalars().all()
        for task in tasks:
            session.expunge(task)
    return {t.row_index: t for t in tasks}


def exported(cluster, pid) -> list[dict]:
    buffer = io.StringIO()
    export_results(cluster.store, accounts.local_admin(cluster.store), pid, "json", buffer)
    return json.loads(buffer.getvalue())


def status(cluster, pid):
    return projects.project_status(cluster.store, accounts.local_admin(cluster.store), pid)


def streaks(cluster, volunteer) -> dict[str, int]:
    """script sha256 -> the volunteer's trust streak for it."""
    with cluster.store.session() as session:
        return {t["script_sha256"]: t["streak"] for t in trust_levels(session, volunteer)}


def script_sha(cluster, pid) -> str:
    with cluster.store.session() as session:
        return session.get(Project, pid).script_sha256


def value(text):
    return json.loads(text) if text is not None else None


def first_party(replicas: dict[str, Replica]) -> str:
    return min(replicas.values(), key=lambda r: r.finished_at).party


def check_export_and_counts(cluster, pid, rows: int):
    """The JSON export names each row's verification; the status counts match the store."""
    tasks = tasks_of(cluster, pid)
    assert sorted(tasks) == list(range(rows))
    items = exported(cluster, pid)
    assert [item["row"] for item in items] == list(range(rows))
    for item in items:
        assert set(item) == {"row", "status", "output", "error", "verification"}
        assert item["verification"] == tasks[item["row"]].verification
    view = status(cluster, pid)
    kinds = [t.verification for t in tasks.values()]
    assert view.status == "complete"
    assert view.rows_verified == kinds.count("verified") + kinds.count("verified-by-trust")
    assert view.rows_inconclusive == kinds.count("inconclusive")
    executions = sum(len(r) for r in replicas_of(cluster, pid).values())
    assert view.executions_per_task == pytest.approx(executions / rows)
    assert view.notice is None
    return view


# -- the tests ------------------------------------------------------------------------------


def test_cheaters_node_really_forges(cluster):
    """The hook fires on carol's node only: her workers' run_rows is the forging wrapper."""
    import ray

    from engine import nodes

    @ray.remote(num_cpus=1)
    def executor_on_this_node():
        from engine.node import executor

        return getattr(executor.run_rows, "forged", False), executor.__file__

    for name in VOLUNTEERS:
        forged, path = ray.get(executor_on_this_node.options(
            label_selector={nodes.NODE_ID_LABEL: cluster.node_ids[name]}).remote(), timeout=120)
        assert forged is (name == CHEATER), name
        assert "runtime_resources" in path  # the engine the job shipped, on every node


def test_cheater_is_outvoted_earns_nothing_and_has_no_trust(cluster):
    rows = 40
    pid = submit(cluster, "square.py", rows=rows, batch_size=2)
    run_to_end(cluster, pid)
    replicas, tasks = replicas_of(cluster, pid), tasks_of(cluster, pid)
    touched = sorted(row for row, by in replicas.items() if CHEATER in by)
    assert touched, "the cheater's node never ran a row"
    for row, by in replicas.items():
        for party, replica in by.items():
            # Honest nodes return the square; the cheater's forged it (the hook fired).
            expected = row * row + (1 if party == CHEATER else 0)
            assert (replica.status, value(replica.output)) == ("succeeded", expected), (row, party)
    for row in range(rows):
        task = tasks[row]
        if row in touched:
            # Its result was compared: never accepted on trust, never the cheater's value.
            assert task.verification in ("verified", "inconclusive"), row
            assert replicas[row][CHEATER].agreed is False, row
        if task.verification == "inconclusive":
            assert row in touched
            assert task.status == "failed" and task.error.startswith("Inconclusive")
        else:
            assert task.verification in ("verified", "verified-by-trust")
            assert (task.status, value(task.output)) == ("succeeded", row * row), row
            agreed = {p for p, r in replicas[row].items() if r.agreed}
            assert CHEATER not in agreed
            assert len(agreed) >= (2 if task.verification == "verified" else 1), row
    # Two honest volunteers are online, so a majority exists for every row.
    assert all(t.verification != "inconclusive" for t in tasks.values())

    credit.refresh(cluster.store, force=True)
    board = {r.volunteer: r for r in credit.leaderboard(cluster.store, "all")}
    assert CHEATER not in board, "the cheater earned credit"
    assert set(board) == set(HONEST)
    with cluster.store.session() as session:
        median, accepted = credit.project_median(session, pid)
    for name in HONEST:
        agreed_rows = [row for row, by in replicas.items() if by.get(name) and by[name].agreed]
        assert board[name].tasks == len(agreed_rows)
        # The leaderboard rounds credit to the microsecond (credit.CREDIT_DECIMALS).
        assert board[name].credit == pytest.approx(len(agreed_rows) * median, rel=1e-6,
                                                   abs=0.5 * 10 ** -credit.CREDIT_DECIMALS)

    sha = script_sha(cluster, pid)
    assert streaks(cluster, CHEATER) == {sha: 0}
    assert all(streaks(cluster, name).get(sha, 0) > 0 for name in HONEST)

    view = check_export_and_counts(cluster, pid, rows)
    assert view.rows_verified == rows and view.rows_inconclusive == 0
    assert view.executions_per_task > 1
    trusted = sum(t.verification == "verified-by-trust" for t in tasks.values())
    print(f"\ncheater: carol touched {len(touched)} of {rows} rows, all outvoted; "
          f"{trusted} rows verified by trust; {view.executions_per_task:.2f} executions per task")


def test_random_results_end_inconclusive_with_every_candidate_kept(cluster):
    rows = 12
    pid = submit(cluster, "random_output.py", rows=rows, batch_size=2)
    run_to_end(cluster, pid)
    replicas, tasks = replicas_of(cluster, pid), tasks_of(cluster, pid)
    for row in range(rows):
        task = tasks[row]
        assert task.verification == "inconclusive", row
        assert (task.status, task.output) == ("failed", None)
        assert task.error.startswith("Inconclusive: 3 volunteers"), task.error
        # No majority after every volunteer online ran it (max_replicas 4 is not reached:
        # there is no fourth volunteer, and it does not wait for one). All three are kept.
        by = replicas[row]
        assert set(by) == set(VOLUNTEERS), row
        outputs = [value(r.output) for r in by.values()]
        assert all(isinstance(o, float) for o in outputs) and len(set(outputs)) == 3
        assert all(r.agreed is False for r in by.values())
    view = check_export_and_counts(cluster, pid, rows)
    assert (view.rows_failed, view.rows_verified, view.rows_inconclusive) == (rows, 0, rows)
    assert view.executions_per_task == pytest.approx(3.0)
    assert all(item["verification"] == "inconclusive" for item in exported(cluster, pid))
    sha = script_sha(cluster, pid)
    assert all(streaks(cluster, name)[sha] == 0 for name in VOLUNTEERS)


def test_numeric_accepts_last_bit_differences_where_exact_does_not(cluster):
    rows = 12
    exact = submit(cluster, "shuffled_sum.py", rows=rows, batch_size=2, comparison="exact")
    run_to_end(cluster, exact)
    numeric = submit(cluster, "shuffled_sum.py", rows=rows, batch_size=2, comparison="numeric")
    run_to_end(cluster, numeric)
    terms = [1.0 / (k + 1) for k in range(1000)]
    true_sum = {row: math.fsum(terms + [float(row)]) for row in range(rows)}

    def honest_outputs(by):
        return [value(r.output) for p, r in by.items() if p != CHEATER]

    # The honest volunteers' sums differ in the last bits (the whole point of the script).
    replicas = {"exact": replicas_of(cluster, exact), "numeric": replicas_of(cluster, numeric)}
    for kind, project_replicas in replicas.items():
        for row, by in project_replicas.items():
            for output in honest_outputs(by):
                assert output == pytest.approx(true_sum[row], rel=1e-12), (kind, row)
    last_bits = [(kind, row) for kind, project in replicas.items() for row, by in project.items()
                 if len(set(honest_outputs(by))) > 1]
    assert len(last_bits) >= rows, "the shuffled sums hardly ever differed in the last bits"

    # exact: differing bits are a disagreement. More replicas are asked for, and with no
    # unused volunteer left the row is inconclusive; only bit-identical sums verify.
    tasks = tasks_of(cluster, exact)
    for row, task in tasks.items():
        by = replicas["exact"][row]
        agreed = [r.output for r in by.values() if r.agreed]
        if task.verification == "verified":
            assert len(agreed) >= 2 and len(set(agreed)) == 1, row
        elif task.verification == "inconclusive":
            assert set(by) == set(VOLUNTEERS) and not agreed, row
            assert len(set(honest_outputs(by))) > 1, row
        else:
            assert task.verification == "verified-by-trust", row
    exact_view = check_export_and_counts(cluster, exact, rows)
    assert exact_view.rows_inconclusive >= 1

    # numeric: the same kind of sums agree within the relative tolerance (1e-9).
    tasks = tasks_of(cluster, numeric)
    accepted_despite_bits = 0
    for row, task in tasks.items():
        assert task.verification in ("verified", "verified-by-trust"), row
        assert value(task.output) == pytest.approx(true_sum[row], rel=1e-12)
        agreed = [value(r.output) for r in replicas["numeric"][row].values() if r.agreed]
        accepted_despite_bits += len(set(agreed)) > 1
        if CHEATER in replicas["numeric"][row]:
            assert replicas["numeric"][row][CHEATER].agreed is False  # +1 is beyond 1e-9
    assert accepted_despite_bits >= 1
    numeric_view = check_export_and_counts(cluster, numeric, rows)
    assert numeric_view.rows_verified == rows and numeric_view.rows_inconclusive == 0
    print(f"\nexact: {exact_view.rows_verified} verified, {exact_view.rows_inconclusive} "
          f"inconclusive, {exact_view.executions_per_task:.2f} executions per task; numeric: "
          f"{numeric_view.rows_verified} verified ({accepted_despite_bits} on sums that differ "
          f"in the last bits), {numeric_view.executions_per_task:.2f} executions per task")


def test_adaptive_trust_drops_replication_toward_spot_check_rate(cluster):
    rows = 300
    started = time.monotonic()
    pid = submit(cluster, "busy_cube.py", rows=rows, batch_size=2)
    run_to_end(cluster, pid, timeout=300)
    seconds = time.monotonic() - started
    replicas, tasks = replicas_of(cluster, pid), tasks_of(cluster, pid)
    for row, task in tasks.items():
        assert task.verification in ("verified", "verified-by-trust"), row
        assert value(task.output) == row ** 3, row

    report = {}
    for name in VOLUNTEERS:
        first = sorted((min(r.finished_at for r in by.values()), row)
                       for row, by in replicas.items() if first_party(by) == name)
        by_trust = [(when, row) for when, row in first
                    if tasks[row].verification == "verified-by-trust"]
        assert all(len(replicas[row]) == 1 for _, row in by_trust)
        entry = {"first_runs": len(first), "by_trust": len(by_trust)}
        if by_trust:
            # When the first result accepted on trust arrived. Rows decided while handling
            # it have later finish times, so what is counted below was decided earlier.
            trusted_at = min(by_trust)[0]
            # The streak rule: trust came only after TRUST_STREAK agreeing replicas of
            # this volunteer had been decided.
            agreed_before = sum(1 for row, by in replicas.items()
                                if name in by and by[name].agreed and len(by) > 1
                                and tasks[row].finished_at < trusted_at)
            assert agreed_before >= TRUST_STREAK, (name, agreed_before)
            before = [row for t, row in first if t < trusted_at]
            after = [row for t, row in first if t >= trusted_at]
            replicated_after = sum(1 for row in after if len(replicas[row]) > 1)
            entry.update(agreed_before_trust=agreed_before, before_trust=len(before),
                         replicated_before=sum(1 for row in before if len(replicas[row]) > 1),
                         after_trust=len(after), replicated_after=replicated_after,
                         rate_after=round(replicated_after / len(after), 3))
        report[name] = entry

    # Which volunteer runs a row first is up to Ray and varies a lot between runs (an
    # honest node busy checking the cheater's rows leaves the new ones to the cheater),
    # so the bounds are on the honest volunteers together.
    trusted = [report[name] for name in HONEST if report[name]["by_trust"]]
    assert trusted, f"no row was verified by trust: {report}"
    after = sum(entry["after_trust"] for entry in trusted)
    replicated = sum(entry["replicated_after"] for entry in trusted)
    report["honest, once trusted"] = {"first_runs": after, "replicated": replicated,
                                      "rate": round(replicated / after, 3)}
    # Once trusted, a row is replicated only as a spot check: binomial(after, rate).
    # Five standard deviations above the mean (plus 2) is not reached by chance.
    rate = cluster.settings.spot_check_rate
    assert replicated <= after * rate + 5 * math.sqrt(after * rate * (1 - rate)) + 2, report
    assert report[CHEATER]["by_trust"] == 0
    assert all(len(replicas[row]) >= 3 for row, by in replicas.items()
               if first_party(by) == CHEATER)  # always replicated, always outvoted
    sha = script_sha(cluster, pid)
    assert streaks(cluster, CHEATER).get(sha, 0) == 0
    assert all(streaks(cluster, name)[sha] >= TRUST_STREAK for name in HONEST)
    view = check_export_and_counts(cluster, pid, rows)
    print(f"\nadaptive trust over {rows} rows ({seconds:.0f} s, "
          f"{view.executions_per_task:.2f} executions per task, "
          f"{sum(t.verification == 'verified-by-trust' for t in tasks.values())} rows verified "
          f"by trust): {json.dumps(report)}")


def test_too_few_volunteers_waits_says_so_and_resumes_when_one_joins(cluster):
    # Scripts nobody is trusted for yet, so no row can be accepted on trust.
    # raises.py: row 0 raises ValueError, rows 1 and 2 return x.
    four = submit(cluster, "raises.py", rows=3, batch_size=2, replication=4)
    five = submit(cluster, "busy_square.py", rows=2, batch_size=2, replication=5)
    expected_rows = {four: 3, five: 2}

    def every_volunteer_ran_every_row(volunteers: int) -> Callable[[], bool]:
        def done() -> bool:
            replicas = {pid: replicas_of(cluster, pid) for pid in expected_rows}
            return (all(len(replicas[pid]) == n for pid, n in expected_rows.items())
                    and all(len(by) == volunteers for project in replicas.values()
                            for by in project.values()))
        return done

    def check_waiting(pid: int, rows: int, notice: str) -> None:
        view = status(cluster, pid)
        assert view.notice == notice
        # No fallback to fewer results: nothing is decided while volunteers are missing.
        assert (view.status, view.rows_pending, view.rows_verified) == ("running", rows, 0)
        assert tasks_of(cluster, pid) == {}
        assert all(item["status"] == "pending" and item["verification"] is None
                   for item in exported(cluster, pid))

    try:
        run_until(cluster, every_volunteer_ran_every_row(3), timeout=120)
        check_waiting(four, 3, "waiting for 1 more volunteer")
        check_waiting(five, 2, "waiting for 2 more volunteers")

        # A fourth volunteer joins: the rows waiting for one get their fourth replica.
        dave = add_volunteer(cluster, "dave")
        try:
            run_until(cluster, lambda: ended(cluster, four)
                      and every_volunteer_ran_every_row(4)(), timeout=120)
        finally:
            dave.stop()
        tasks, replicas = tasks_of(cluster, four), replicas_of(cluster, four)
        assert all(set(by) == {*VOLUNTEERS, "dave"} for by in replicas.values())
        # Row 0 failed alike everywhere (the cheater forges only successes): a failed row
        # verifies on the same exception type.
        assert (tasks[0].status, tasks[0].verification) == ("failed", "verified")
        assert tasks[0].error.startswith("ValueError")
        assert all(r.agreed for r in replicas[0].values())
        # Rows 1 and 2: three honest replicas against the cheater's are no quorum of four,
        # and with no fifth volunteer the row ends inconclusive instead of waiting.
        for row in (1, 2):
            assert tasks[row].verification == "inconclusive", row
            assert [value(replicas[row][p].output) for p in (*HONEST, "dave")] == [row] * 3
            assert value(replicas[row][CHEATER].output) == row + 1
        view = check_export_and_counts(cluster, four, 3)
        assert (view.rows_verified, view.rows_inconclusive) == (1, 2)
        # Agreeing on a failed row earns nothing, so the cheater is still not on the board.
        credit.refresh(cluster.store, force=True)
        assert CHEATER not in {r.volunteer for r in credit.leaderboard(cluster.store, "all")}
        # The other project needs five: it still waits, now for one more.
        check_waiting(five, 2, "waiting for 1 more volunteer")
    finally:
        for pid in expected_rows:
            if not ended(cluster, pid):
                projects.cancel_project(cluster.store, accounts.local_admin(cluster.store), pid)
