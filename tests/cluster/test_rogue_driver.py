"""A rogue driver on a real cluster: a volunteer uses the token from their own join command.

alice and bob join from the clean volunteer environment. From alice's machine (her
Python, her home, the token and address from her join command) a plain Ray driver starts
and pins tasks to the head and to bob's node. The dispatcher must find that driver, raise
an alert naming alice's node and alice, remove that node from the cluster and refuse it
work, and disable alice pending review.

alice means harm, so she runs her node without the join command's confinement; bob runs
his command as given. What the tasks can reach is the confinement's business: on the head
(engine.confinement.head_prefix) and on bob's node (node_argv), nothing of value. A task
on bob's node also leaves a daemon behind, which must end when bob stops his node the way
`ray stop` does.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from support import FIXTURES
from engine import accounts, cluster, drivers, nodes
from engine.models import Node, SecurityAlert, User
from volunteer_cluster import run_until, volunteer_cluster
from support.volunteer_env import copy_into_home, volunteer_python

DAEMON = b"sleep\x007777\x00"  # the rogue task's daemon (fixtures/rogue_driver.py)

pytestmark = pytest.mark.slow


def join_env(command: str) -> dict[str, str]:
    """The variables a join command sets: what a volunteer copies from the Join page."""
    return dict(word.split("=", 1) for word in shlex.split(command) if "=" in word
                and word.split("=", 1)[0].isupper())


def start_rogue(state, name: str, targets: dict) -> subprocess.Popen:
    node = state.nodes[name]
    script = copy_into_home(node.home, FIXTURES / "rogue_driver.py") / "rogue_driver.py"
    command = nodes.join_command(state.store, state.settings, name)
    env = {**node.env, **{k: v for k, v in join_env(command).items() if k.startswith("RAY_")}}
    user = {} if node.uid is None else {"user": node.uid, "group": node.uid, "extra_groups": []}
    return subprocess.Popen(
        [str(volunteer_python()), str(script), cluster.head_address(state.settings),
         str(node.directory / "ray"), json.dumps(targets)],
        cwd=node.home, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, **user)


def targets_of(state) -> dict:
    data = state.settings.data_path
    return {"nodes": {"head": state.node_ids["head"], "bob": state.node_ids["bob"]},
            "files": [str(data / "constellation.db"), str(data / "secrets" / "volunteer_signing_key"),
                      str(data / "secrets" / "cluster_token")],
            "write": [str(data), str(state.nodes["bob"].home)],
            "homes": [str(state.nodes["bob"].home)],
            "pids": [os.getpid(), state.bobs_own.pid],
            "ports": [["127.0.0.1", state.settings.portal_port]],
            "daemon": ["bob"]}


def bobs_own_program(state) -> subprocess.Popen:
    """Something else bob runs on his machine, as himself, outside the node."""
    bob = state.nodes["bob"]
    user = {} if bob.uid is None else {"user": bob.uid, "group": bob.uid, "extra_groups": []}
    return subprocess.Popen(["sleep", "7778"], cwd=bob.home, env=bob.env, start_new_session=True,
                            **user)


@pytest.fixture(scope="module")
def attacked():
    # alice means harm: she runs her node without the join command's confinement.
    with volunteer_cluster(("alice", "bob"), head_cpus=1, careless=("alice",)) as state:
        (state.nodes["bob"].home / "private-notes.txt").write_text("bob's own files")
        state.bobs_own = bobs_own_program(state)
        try:
            rogue = start_rogue(state, "alice", targets_of(state))
            out, err = rogue.communicate(timeout=240)
            assert rogue.returncode == 0, err[-3000:]
            state.report = json.loads(out.strip().splitlines()[-1])
            yield state
        finally:
            state.bobs_own.kill()
            state.bobs_own.wait()


def test_a_rogue_driver_is_found_its_node_removed_and_its_volunteer_disabled(attacked):
    state = attacked
    import ray

    alice_node = state.node_ids["alice"]

    def answered() -> bool:
        with state.store.session() as session:
            return session.execute(select(SecurityAlert)).first() is not None

    run_until(state, answered, timeout=120)
    with state.store.session() as session:
        [alert] = session.execute(select(SecurityAlert)).scalars().all()
        node = session.get(Node, alice_node)
        alice = session.execute(select(User).where(User.name == "alice")).scalar_one()
        bob = session.execute(select(User).where(User.name == "bob")).scalar_one()
    assert (alert.kind, alert.node_id, alert.volunteer) == (drivers.ROGUE_DRIVER, alice_node, "alice")
    assert "rogue_driver.py" in alert.detail and "disabled pending review" in alert.detail
    assert node.health == "removed" and "not Constellation's" in node.health_reason
    assert alice.disabled and not bob.disabled
    # Ray itself no longer counts alice's node: nothing can be scheduled there.
    deadline = time.monotonic() + 60
    while any(n["NodeID"] == alice_node and n["Alive"] for n in ray.nodes()):
        assert time.monotonic() < deadline, "alice's node is still in the cluster"
        time.sleep(0.5)
    # The admin sees it; nobody else does.
    root = accounts.create_user(state.store, "root", {accounts.Role.ADMIN})
    [view] = drivers.alerts(state.store, root)
    assert view.volunteer == "alice" and view.node_id == alice_node
    with pytest.raises(Exception):
        drivers.alerts(state.store, bob)


def _reached(report: dict, where: str) -> list[str]:
    """What a rogue task on ``where`` got hold of (the portal port aside: it is a web page
    like any other, reachable by design)."""
    return [f"{what} -> {got}" for what, got in report[where].items()
            if got.startswith("ok") and not what.startswith(("connect", "leave"))]


def test_a_rogue_drivers_tasks_on_the_head_reach_nothing_of_value(attacked):
    """The head's Ray runs confined (engine.confinement): no database, no secrets, nothing
    writable that anything outside reads, no other process's memory or environment."""
    print(json.dumps(attacked.report["head"], indent=1))
    assert _reached(attacked.report, "head") == []


def test_a_rogue_drivers_tasks_on_another_volunteers_node_reach_nothing_of_value(attacked):
    """bob's node runs confined (his join command: engine.confinement.node_argv): no home,
    no /var/tmp or /tmp of the machine, no other process of his, nothing writable."""
    print(json.dumps(attacked.report["bob"], indent=1))
    assert attacked.report["bob"]["leave a daemon"].startswith("ok")
    assert _reached(attacked.report, "bob") == []


def test_what_a_rogue_task_leaves_on_a_volunteers_node_ends_with_ray_stop(attacked):
    """Runs last: it stops bob's node, as `ray stop` on bob's machine does."""
    bob = attacked.nodes["bob"]
    assert daemons(bob), "the rogue task's daemon should run while bob's node does"
    assert bob.process.poll() is None
    ray_stop(bob)
    deadline = time.monotonic() + 60
    while daemons(bob) or bob.process.poll() is None:
        assert time.monotonic() < deadline, \
            f"after ray stop: daemons {daemons(bob)}, node running: {bob.process.poll() is None}"
        time.sleep(0.5)
    assert attacked.bobs_own.poll() is None, "bob's own program outside the node must live on"


def daemons(node) -> list[int]:
    """Processes of ``node``'s user running the rogue task's ``sleep`` (wherever they are)."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and (entry / "cmdline").read_bytes() == DAEMON and \
                    (node.uid is None or entry.stat().st_uid == node.uid):
                found.append(int(entry.name))
    return found


def ray_stop(node, grace: float = 16.0) -> None:
    """What `ray stop` does on a volunteer's machine, to that volunteer's processes only:
    SIGTERM to every process Ray counts as its own (Ray's own list, matched on the name or
    the command line as Ray matches it), then SIGKILL to those left after ``grace``."""
    from ray.autoscaler._private.constants import RAY_PROCESSES

    def rays() -> list[int]:
        pids = []
        for pid in node.pids():
            with contextlib.suppress(OSError):
                name = Path(f"/proc/{pid}/comm").read_text().strip()
                line = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
                if any(key in (name if by_name else line) for key, by_name in RAY_PROCESSES):
                    pids.append(pid)
        return pids

    def signal_all(pids: list[int], sig: int) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    first = rays()
    assert first, "no Ray process of the node found"
    signal_all(first, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while (left := [pid for pid in first if Path(f"/proc/{pid}").exists()]) and time.monotonic() < deadline:
        time.sleep(0.5)
    signal_all(left, signal.SIGKILL)
