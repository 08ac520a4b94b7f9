"""Real volunteers as they come: some machines work, some cannot.

Three volunteers join from the clean volunteer environment (only the pinned ray, a home of
their own, nothing of the repository). dora's machine is broken: its Python cannot load
Constellation's code (``tests/fixtures/broken``: importing ``engine`` fails with
``No module named 'bcrypt'``, as it did on the first volunteers' machines). Ray itself
works there, so her node joins like the others.

A project with the default replication (2) must complete with every row correct and
verified, alice and bob earn credit and dora none, dora's node is quarantined with a
reason she can act on, and no row is stored as failed because of her.
"""

from __future__ import annotations

import io
import json
import time

import pytest
from sqlalchemy import select

from support import FIXTURES
from engine import accounts, credit, nodes
from engine.export import export_results
from engine.models import Node, Replica
from volunteer_cluster import run_to_end, run_until, submit, volunteer_cluster

pytestmark = pytest.mark.slow

ROWS = 240


def every_row_doubled(state, pid: int) -> list[dict]:
    """The project's exported rows, each checked to be busy_2ms.py's answer, succeeded."""
    buffer = io.StringIO()
    export_results(state.store, accounts.local_admin(state.store), pid, "json", buffer)
    rows = json.loads(buffer.getvalue())
    assert [(r["row"], r["status"], r["output"]) for r in rows] == \
        [(i, "succeeded", 2 * i) for i in range(ROWS)]
    return rows


def nodes_that_ran(state, pid: int) -> set[str]:
    with state.store.session() as session:
        return set(session.execute(select(Replica.node_id).where(
            Replica.project_id == pid)).scalars())


def test_a_broken_volunteer_is_quarantined_and_the_project_completes_without_it(capsys):
    # The head offers no CPU: every row must be computed, and verified, by volunteers.
    # alice's node keeps the ports her join command pins (the others, on the same machine,
    # need ports of their own).
    with volunteer_cluster(("alice", "bob", "dora"), head_cpus=0, pinned="alice",
                           pythonpath={"dora": FIXTURES / "broken"}) as state:
        ids = state.node_ids
        import ray

        [alice] = [n for n in ray.nodes() if n["NodeID"] == ids["alice"]]
        low, high = (int(p) for p in state.settings.node_ports.split("-"))
        assert low <= alice["NodeManagerPort"] <= high and low <= alice["ObjectManagerPort"] <= high

        # Each node is checked as soon as it joins, before it gets any work.
        started = time.monotonic()
        answered: dict[str, float] = {}

        def all_checked() -> bool:
            with state.store.session() as session:
                health = dict(session.execute(select(Node.node_id, Node.health)).all())
            for name in ("alice", "bob", "dora"):
                if health.get(ids[name]) != "checking" and name not in answered:
                    answered[name] = time.monotonic() - started
            return len(answered) == 3

        run_until(state, all_checked, timeout=120)
        views = {v.node_id: v for v in nodes.list_nodes(state.store)}
        assert views[ids["alice"]].health == views[ids["bob"]].health == "ready"
        broken = views[ids["dora"]]
        assert broken.health == "quarantined"
        assert broken.health_reason == ("this machine cannot load Constellation's code: "
                                        "ModuleNotFoundError: No module named 'bcrypt'")
        with capsys.disabled():
            print("\nnode check answered after (s, from the dispatcher's start): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in sorted(answered.items())))

        # About 2 ms of CPU a row, so that credit is measurable (default replication: 2).
        pid = submit(state, "busy_2ms.py", ROWS, batch_size=20)
        run_to_end(state, pid, timeout=300)

        rows = every_row_doubled(state, pid)
        assert {r["verification"] for r in rows} <= {"verified", "verified-by-trust", "trusted"}
        ran_on = nodes_that_ran(state, pid)
        assert ids["dora"] not in ran_on  # quarantined before it got any work
        assert ran_on == {ids["alice"], ids["bob"]}

        credit.refresh(state.store)
        board = {r.volunteer: r for r in credit.leaderboard(state.store)}
        assert board["alice"].credit > 0 and board["bob"].credit > 0
        assert "dora" not in board

        # The volunteer sees it: her node, quarantined, and why.
        dora = accounts.get_user(state.store, "dora")
        mine = nodes.list_nodes(state.store, dora)
        assert [(v.node_id, v.health) for v in mine] == [(ids["dora"], "quarantined")]
        assert "No module named 'bcrypt'" in mine[0].health_reason


def test_a_black_hole_node_is_quarantined_after_failing_fast_and_loses_no_rows():
    """eve's machine passes its check, then fails every batch at once: her failures count
    against her node, not the rows; she is quarantined, and the project completes on the
    others with nothing stored as failed."""
    with volunteer_cluster(("alice", "bob", "eve"), head_cpus=0,
                           pythonpath={"eve": FIXTURES / "blackhole"}) as state:
        ids = state.node_ids
        pid = submit(state, "busy_2ms.py", ROWS, batch_size=10)
        run_to_end(state, pid, timeout=300)
        every_row_doubled(state, pid)
        eve = next(v for v in nodes.list_nodes(state.store) if v.node_id == ids["eve"])
        assert eve.health == "quarantined"
        assert "No space left on device" in eve.health_reason
        ran_on = nodes_that_ran(state, pid)
        assert ids["eve"] not in ran_on
