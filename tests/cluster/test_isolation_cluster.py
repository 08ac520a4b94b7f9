"""One user never affects another, on a real cluster of volunteers (issue 13, items 1, 2, 4).

Two volunteers, alice and bob, each join with a real 1-CPU ``ray start`` node from the
clean volunteer venv (tests/cluster/volunteer_cluster.py); the head offers no CPUs, so every row
runs on both volunteers (replication 2) and earns them credit when they agree. Two
researchers, ada and grace, submit projects as the portal would.

- A script that writes its own result line claiming 1e9 s of CPU gives nobody credit for it.
- Two researchers who submit the same memoising script each get only their own values.
- A script that hangs while being imported fails its own project at the import time limit,
  and no node is blamed, quarantined, or has other projects' batches cancelled.
"""

from __future__ import annotations

import io
import json
import logging

import pytest
from sqlalchemy import select

from support import fixture_bytes
from engine import accounts, credit, nodes, projects
from engine.accounts import Role
from engine.export import export_results
from engine.models import Replica
from volunteer_cluster import ended, run_to_end, run_until, volunteer_cluster

pytestmark = pytest.mark.slow

VOLUNTEERS = ("alice", "bob")
IMPORT_TIMEOUT = 5.0


@pytest.fixture(scope="module")
def cluster():
    with volunteer_cluster(VOLUNTEERS, head_cpus=0, import_timeout=IMPORT_TIMEOUT) as state:
        for name in ("ada", "grace"):
            accounts.create_user(state.store, name, {Role.RESEARCHER})
        yield state


def submit(cluster, owner: str, script: str, lines: list[str], **options) -> int:
    return projects.submit_project(
        cluster.store, cluster.settings, accounts.get_user(cluster.store, owner), title=script,
        script_name=script, script_bytes=fixture_bytes(script), dataset_name="d.csv",
        dataset_bytes=("\n".join(lines) + "\n").encode(), **options)


def exported(cluster, pid) -> dict[int, dict]:
    out = io.StringIO()
    export_results(cluster.store, accounts.local_admin(cluster.store), pid, "json", out)
    return {r["row"]: r for r in json.loads(out.getvalue())}


def status(cluster, pid):
    return projects.project_status(cluster.store, accounts.local_admin(cluster.store), pid)


def test_a_forged_cpu_time_reaches_no_volunteers_credit(cluster):
    # Rows 2-7 forge; one row per batch, so that the forged "done" answers its batch.
    targets = ["", ""] + ["forge"] * 6
    pid = submit(cluster, "ada", "hostile_forges_cpu.py",
                 ["x,target"] + [f"{x},{t}" for x, t in enumerate(targets)], batch_size=1)
    run_to_end(cluster, pid)
    credit.refresh(cluster.store, force=True)
    board = {r.volunteer: r for r in credit.leaderboard(cluster.store, "all")}
    print(f"\nforged project: {', '.join(f'{n} {r.credit:.6f} for {r.tasks} tasks' for n, r in board.items())}")
    assert set(board) == set(VOLUNTEERS)
    for name in VOLUNTEERS:
        # Two verified plain rows each, measured on the node: microseconds, not 1e9 s.
        assert 0 < board[name].credit < 1.0, board[name]
        assert board[name].tasks == 2
    rows = exported(cluster, pid)
    assert [rows[x]["status"] for x in range(8)] == ["succeeded"] * 2 + ["failed"] * 6
    assert all(rows[x]["error"].startswith("SandboxError: the process running this row broke "
                                           "the result protocol") for x in range(2, 8))
    with cluster.store.session() as session:
        replicas = session.execute(select(Replica).where(Replica.project_id == pid)).scalars().all()
        measured = sorted(r.cpu_seconds for r in replicas)
    assert len(measured) == 16 and measured[-1] < cluster.settings.row_timeout, measured


def test_researchers_with_the_same_memoising_script_get_only_their_own_values(cluster):
    def lines(owner):
        return ["x,secret"] + [f"{x},{owner}-{x}" for x in range(6)]

    mine = submit(cluster, "ada", "memoises.py", lines("ada"), batch_size=3)
    run_to_end(cluster, mine)
    # The same file, the same limits, on the same volunteers' warm workers, just after.
    theirs = submit(cluster, "grace", "memoises.py", lines("grace"), batch_size=3)
    run_to_end(cluster, theirs)
    for pid, owner in ((mine, "ada"), (theirs, "grace")):
        rows = exported(cluster, pid)
        assert [(rows[x]["status"], rows[x]["output"]) for x in range(6)] == \
            [("succeeded", f"{owner}-{x}") for x in range(6)], owner
        assert {rows[x]["verification"] for x in range(6)} <= {"verified", "verified-by-trust"}


def test_a_script_that_hangs_while_imported_fails_its_project_and_no_node(cluster, caplog):
    caplog.set_level(logging.INFO)
    hangs = submit(cluster, "ada", "hangs_on_import.py", ["x"] + [str(x) for x in range(4)],
                   batch_size=2)
    others = submit(cluster, "grace", "busy_2ms.py", ["x"] + [str(x) for x in range(40)],
                    batch_size=5)
    run_until(cluster, lambda: ended(cluster, hangs, others), timeout=240)

    failed = status(cluster, hangs)
    assert failed.status == "failed"
    assert failed.error == ("the script raised while being imported: ImportTimeout: the "
                            f"script's top-level code was still running after "
                            f"{IMPORT_TIMEOUT:g} s (the import time limit)")
    done = status(cluster, others)
    assert (done.status, done.rows_succeeded, done.rows_verified) == ("complete", 40, 40)
    rows = exported(cluster, others)
    assert [rows[x]["output"] for x in range(40)] == [2 * x for x in range(40)]

    # No node was blamed: none quarantined, no batch failed "for reasons of the node" (the
    # dispatcher would have cancelled the node's other batches), and the volunteers'
    # nodes are ready.
    views = {v.node_id: v for v in nodes.list_nodes(cluster.store)}
    for name in VOLUNTEERS:
        view = views[cluster.node_ids[name]]
        assert (view.health, view.health_reason) == ("ready", None), view
    blamed = [r.getMessage() for r in caplog.records
              if "quarantined" in r.getMessage() or "failed on node" in r.getMessage()
              or "bubblewrap" in r.getMessage()]
    assert blamed == []
