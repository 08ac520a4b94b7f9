"""Rotating the cluster token under a running `engine serve`: old join commands stop working.

Every volunteer holds the cluster token (it is in their join command). After
`python -m engine rotate-cluster-token`, the running head restarts with the new token,
a node started with an old join command is refused, and one started with the new command
joins. Nodes are real `ray start` processes from the clean volunteer environment.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from support import engine_env, free_port, python, stop_serve
from engine import accounts, cluster, nodes
from engine.accounts import Role
from engine.store import Store
from volunteer_cluster import start_node

pytestmark = pytest.mark.slow

WRONG_TOKEN_SECONDS = 120  # Ray gives up after about 20 s; allow for a loaded machine


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def online_nodes(store: Store) -> dict[str, str]:
    return {v.node_id: v.attribution for v in nodes.list_nodes(store) if v.status == "online"}


def test_rotating_the_cluster_token_restarts_the_head_and_voids_old_join_commands(settings, tmp_path):
    settings = settings.replace(ray_port=free_port(), ray_num_cpus=1)
    store = Store(settings)
    accounts.create_user(store, "vic", {Role.VOLUNTEER})
    env = engine_env(settings)
    serve = subprocess.Popen([python(), "-m", "engine", "serve", "--no-portal"], env=env,
                             start_new_session=True, stdout=subprocess.DEVNULL,
                             stderr=open(tmp_path / "serve.log", "wb"))
    started = []
    try:
        wait_for(lambda: store.cluster_health()["status"] == "online", 120, "the dispatcher")
        wait_for(lambda: "head" in online_nodes(store).values(), 60, "the head in the registry")
        [old_head] = [n for n, who in online_nodes(store).items() if who == "head"]
        old_command = nodes.join_command(store, settings, "vic")
        old_token = cluster.cluster_token(settings)

        done = subprocess.run([python(), "-m", "engine", "rotate-cluster-token"], env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert "must join again" in done.stdout and "Join page" in done.stdout
        assert cluster.cluster_token(settings) != old_token
        new_command = nodes.join_command(store, settings, "vic")
        assert new_command != old_command

        # The head restarts with the new token, and its dispatcher with it.
        wait_for(lambda: [n for n, who in online_nodes(store).items()
                          if who == "head" and n != old_head], 120, "a new head")

        refused = start_node("vic-old", old_command)
        started.append(refused)
        wait_for(lambda: refused.process.poll() is not None, WRONG_TOKEN_SECONDS,
                 "the old join command to fail")
        assert refused.process.returncode != 0, refused.output()[-2000:]

        joined = start_node("vic-new", new_command)
        started.append(joined)
        wait_for(lambda: "vic" in online_nodes(store).values(), 120, "the new join command's node")
    finally:
        for node in started:
            node.stop()
        stop_serve(serve)
        for node in started:
            node.remove()
