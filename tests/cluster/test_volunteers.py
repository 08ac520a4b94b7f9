"""Volunteers on a real multi-node Ray cluster, all on this machine.

The engine starts the head. alice's and bob's machines join by running the exact text of
their join commands, each in its own session, from an empty working directory, with an
environment that does not hold the repository (as on a volunteer's machine): the workers
there get the ``engine`` package only because the dispatcher ships it with the job. A
third node uses alice's name with a wrong signature, and a fourth the wrong token.

One cluster serves the whole module; the test that stops bob's node runs last.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import threading
import time

import pytest
from sqlalchemy import select

from support import ROOT
from engine import accounts, credit, nodes, placement
from engine.export import export_results
from engine.models import Project, Replica, Task
from volunteer_cluster import (VolunteerCluster, assert_clean_node, node_temp_dir, run_to_end,
                              submit, volunteer_cluster, volunteer_env)
from support.volunteer_env import volunteer_python

pytestmark = pytest.mark.slow

WRONG_TOKEN_SECONDS = 90   # Ray gives up after about 20 s; allow for a loaded machine


def replace_label(command: str, key: str, value: str) -> str:
    return re.sub(rf"{key}=[^,\s']+", f"{key}={value}", command)


@pytest.fixture(scope="module")
def cluster():
    # The head offers one CPU so that most work goes to the volunteers. Unclaimed nodes run
    # no work (the default); tests/store/test_credit.py shows that their work would earn nothing.
    def others(commands: dict[str, str]) -> dict[str, tuple[str, bool]]:
        alice = commands["alice"]
        return {"forger": (replace_label(alice, nodes.SIGNATURE_LABEL, "1-" + "0" * 40), True),
                "badtoken": (re.sub(r"RAY_AUTH_TOKEN=\w+", "RAY_AUTH_TOKEN=" + "1" * 64, alice),
                             False)}

    with volunteer_cluster(("alice", "bob"), head_cpus=1, others=others) as state:
        yield state


def executions_by_node(state: VolunteerCluster, project_id: int,
                       agreed_only: bool = False) -> dict[str, list[int]]:
    """Node name -> rows it returned a replica for (projects replicate by default)."""
    names = {v: k for k, v in state.node_ids.items()}
    query = select(Replica.row_index, Replica.node_id).where(Replica.project_id == project_id)
    if agreed_only:
        query = query.where(Replica.agreed.is_(True), Replica.status == "succeeded")
    out: dict[str, list[int]] = {}
    with state.store.session() as session:
        for row, node_id in session.execute(query):
            out.setdefault(names.get(node_id, node_id), []).append(row)
    return out


def outputs(state: VolunteerCluster, project_id: int) -> list:
    buffer = io.StringIO()
    export_results(state.store, accounts.local_admin(state.store), project_id, "json", buffer)
    return [(r["row"], r["status"], r["output"]) for r in json.loads(buffer.getvalue())]


def test_nodes_join_with_their_claims(cluster):
    import ray

    views = {v.node_id: v for v in nodes.list_nodes(cluster.store)}
    ids = cluster.node_ids
    assert (views[ids["alice"]].attribution, views[ids["alice"]].claimed) == ("alice", True)
    assert (views[ids["bob"]].attribution, views[ids["bob"]].claimed) == ("bob", True)
    forged = views[ids["forger"]]
    assert (forged.attribution, forged.volunteer, forged.label_volunteer) == ("unclaimed", None, "alice")
    assert views[ids["head"]].attribution == "head"
    assert all(views[ids[n]].status == "online" and views[ids[n]].cpus == 1.0
               for n in ("alice", "bob", "forger"))
    # The volunteers' shells cannot import the engine: only the job's py_modules bring it.
    # Their Python is the clean venv a volunteer installs (ray only), started in their home.
    alice = cluster.nodes["alice"]
    probe = subprocess.run([str(volunteer_python()), "-c", "import engine"], cwd=alice.home,
                           env=volunteer_env(alice.home), capture_output=True, text=True)
    assert "No module named 'engine'" in probe.stderr

    @ray.remote(num_cpus=1)
    def where_is_engine():
        import engine

        return ray.get_runtime_context().get_node_id(), engine.__file__

    for name in ("alice", "bob"):
        node_id, path = ray.get(where_is_engine.options(
            label_selector={nodes.NODE_ID_LABEL: ids[name]}).remote(), timeout=120)
        assert node_id == ids[name]
        assert "runtime_resources" in path and not path.startswith(str(ROOT)), path
    assert_clean_node(alice)  # every process of the node, from ray start to its workers


def test_label_selector_keeps_work_off_unclaimed_nodes(cluster):
    import ray

    excluded = placement.excluded_node_ids(cluster.store, cluster.settings)
    assert excluded == {cluster.node_ids["forger"]}
    assert placement.excluded_node_ids(cluster.store, cluster.settings.replace(allow_unclaimed_nodes=True)) == set()

    @ray.remote(num_cpus=1)
    def node_of(_):
        time.sleep(0.2)
        return ray.get_runtime_context().get_node_id()

    ran_on = set(ray.get([node_of.options(label_selector=placement.label_selector(excluded)).remote(i)
                          for i in range(12)], timeout=180))
    assert ran_on and not ran_on & excluded
    assert len(ran_on) >= 2  # excluding is not pinning: several nodes share the work


def test_project_runs_on_both_volunteers_and_credit_follows_their_tasks(cluster):
    pid = submit(cluster, "busy_square.py", rows=48, batch_size=2)
    run_to_end(cluster, pid)
    assert outputs(cluster, pid) == [(i, "succeeded", i * i) for i in range(48)]
    ran = executions_by_node(cluster, pid)
    agreed = executions_by_node(cluster, pid, agreed_only=True)
    assert agreed.get("alice") and agreed.get("bob"), ran
    assert "forger" not in ran  # the dispatcher keeps work off the unclaimed node
    # Every row was verified by at least one agreeing replica (two, unless by trust).
    assert {row for rows in agreed.values() for row in rows} == set(range(48))
    credit.refresh(cluster.store, force=True)
    with cluster.store.session() as session:
        median, accepted = credit.project_median(session, pid)
    assert accepted == sum(len(rows) for rows in agreed.values()) and median > 0
    board = {r.volunteer: r for r in credit.leaderboard(cluster.store, "all")}
    assert set(board) == {"alice", "bob"}  # the forger and the head earn nothing
    for name in ("alice", "bob"):
        assert board[name].tasks == len(agreed[name])
        # The leaderboard rounds credit to the microsecond (credit.CREDIT_DECIMALS).
        assert board[name].credit == pytest.approx(len(agreed[name]) * median, rel=1e-6,
                                                   abs=0.5 * 10 ** -credit.CREDIT_DECIMALS)
        assert board[name].nodes == 1
    views = {v.node_id: v for v in nodes.list_nodes(cluster.store)}
    for name, rows in ran.items():
        assert views[cluster.node_ids[name]].tasks_completed == len(rows)
    assert views[cluster.node_ids["forger"]].attribution == "unclaimed"


def test_wrong_token_fails_to_join(cluster):
    import ray

    node = cluster.nodes["badtoken"]
    try:
        code = node.process.wait(timeout=WRONG_TOKEN_SECONDS)
    except subprocess.TimeoutExpired:
        pytest.fail(f"a node with the wrong token was still running after {WRONG_TOKEN_SECONDS} s")
    assert code != 0
    assert "AuthenticationError" in node.output(), node.output()[-2000:]
    assert not any(node_temp_dir(n).startswith(str(node.directory)) for n in ray.nodes())


def test_stopped_node_goes_offline_and_its_rows_finish_elsewhere(cluster):
    bob = cluster.nodes["bob"]
    bob_id = cluster.node_ids["bob"]
    pid = submit(cluster, "busy_square.py", rows=40, batch_size=2)
    stopped: list[int] = []   # rows done when bob's node was stopped

    def stop_bob_once_he_has_worked():
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            with cluster.store.session() as session:
                done = session.execute(select(Replica.row_index).where(
                    Replica.project_id == pid, Replica.node_id == bob_id)).first()
            if done:
                bob.stop()
                with cluster.store.session() as session:
                    stopped.append(session.get(Project, pid).rows_succeeded)
                return
            time.sleep(0.1)

    killer = threading.Thread(target=stop_bob_once_he_has_worked)
    killer.start()
    run_to_end(cluster, pid, timeout=300)
    killer.join()
    assert stopped, "bob's node never completed a row"
    assert stopped[0] < 40, "bob's node was stopped only after the project was done"
    assert outputs(cluster, pid) == [(i, "succeeded", i * i) for i in range(40)]
    with cluster.store.session() as session:
        project = session.get(Project, pid)
        assert (project.status, project.rows_succeeded, project.rows_failed) == ("complete", 40, 0)
        stored = session.execute(select(Task.row_index).where(Task.project_id == pid)).scalars().all()
    assert sorted(stored) == list(range(40))  # none lost, none twice
    ran = executions_by_node(cluster, pid)
    assert set(ran) - {"bob"}, "no other node finished the rows"
    # Rows bob's node had in flight were finished by the others: every row agreed on.
    agreed = executions_by_node(cluster, pid, agreed_only=True)
    assert {row for rows in agreed.values() for row in rows} == set(range(40))
    # Ray declares the node dead after its health checks fail; then the registry follows.
    deadline = time.monotonic() + 90
    while True:
        cluster.sync(force=True)
        view = {v.node_id: v for v in nodes.list_nodes(cluster.store)}[bob_id]
        if view.status == "offline":
            break
        assert time.monotonic() < deadline, "bob's node is still listed online"
        time.sleep(1)
    assert view.volunteer == "bob" and view.tasks_completed >= len(ran.get("bob", []))
    credit.refresh(cluster.store, force=True)
    board = {r.volunteer: r for r in credit.leaderboard(cluster.store, "all")}
    with cluster.store.session() as session:
        bob_total = session.execute(select(Replica.row_index).where(
            Replica.node_id == bob_id, Replica.agreed.is_(True))).all()
    assert board["bob"].tasks == len(bob_total)  # over both projects
