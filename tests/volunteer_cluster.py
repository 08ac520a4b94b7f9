"""A real multi-node cluster of volunteers on this machine, for the slow tests.

The engine starts the head; each volunteer's machine joins by running the exact text of
its join command (``engine.nodes.join_command``) in its own session, from an empty
working directory, with an environment that does not hold the repository: the workers
there get the ``engine`` package only because the dispatcher ships it with the job. A
node may be given a ``PYTHONPATH`` of its own (a dishonest volunteer's modified Python
environment, see ``tests/fixtures/cheater``). Every process is stopped by process group.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from conftest import ROOT, fixture_bytes, free_port, short_tempdir, write_token
from engine import accounts, nodes, projects
from engine.accounts import Role
from engine.models import Project
from engine.settings import Settings
from engine.status import ProjectStatus
from engine.store import Store

JOIN_SECONDS = 120
SYNC_SECONDS = 2.0


@dataclass
class VolunteerNode:
    name: str
    directory: Path
    process: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        """Kill the node's whole process group (ray start, raylet, workers)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)


@dataclass
class VolunteerCluster:
    settings: Settings
    store: Store
    nodes: dict[str, VolunteerNode] = field(default_factory=dict)
    node_ids: dict[str, str] = field(default_factory=dict)   # node name -> Ray node id
    refused: set[str] = field(default_factory=set)           # nodes that must not join
    last_sync: float = 0.0

    def sync(self, force: bool = False) -> None:
        import ray

        if force or time.monotonic() - self.last_sync > SYNC_SECONDS:
            nodes.sync_registry(self.store, self.settings, ray.nodes())
            self.last_sync = time.monotonic()

    def name_of(self, node_id: str | None) -> str | None:
        return next((name for name, nid in self.node_ids.items() if nid == node_id), node_id)


def volunteer_env(pythonpath: Path | None = None) -> dict[str, str]:
    """A volunteer's shell: the pinned `ray` on PATH, no repository, no Ray settings.

    HOME stays the real one: the sandbox's self-test rejects a HOME under /tmp.
    ``pythonpath`` is the volunteer's own addition to it, if any.
    """
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "CONSTELLATION_", "PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = f"{ROOT / '.venv' / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    return env


def start_node(name: str, command: str, pythonpath: Path | None = None) -> VolunteerNode:
    directory = short_tempdir(f"cv-{name}-")
    log = directory / "node.log"
    # Several nodes share this machine: each needs its own temp dir and dashboard agent port.
    full = (f"{command} --num-cpus=1 --temp-dir={directory / 'ray'} "
            f"--dashboard-agent-listen-port={free_port()} --block")
    with open(log, "wb") as out:
        process = subprocess.Popen(["bash", "-c", full], cwd=directory,
                                   env=volunteer_env(pythonpath), stdin=subprocess.DEVNULL,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return VolunteerNode(name, directory, process, log)


def node_temp_dir(ray_node: dict) -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(ray_node.get("ObjectStoreSocketName", ""))))


@contextlib.contextmanager
def volunteer_cluster(volunteers: tuple[str, ...], *, head_cpus: int | None,
                      pythonpath: dict[str, Path] | None = None,
                      others: Callable[[dict[str, str]], dict[str, tuple[str, bool]]] | None = None,
                      **settings: object) -> Iterator[VolunteerCluster]:
    """A head started by the engine and one 1-CPU node per volunteer, joined by command.

    ``others``, given the volunteers' join commands by name, names more nodes to start:
    name -> (command, whether it joins), e.g. a forged signature (joins, unclaimed) or a
    wrong token (refused).
    """
    import ray

    from engine.cluster import LocalHead

    ray.shutdown()  # this process may be connected to the session's shared head
    data_dir = short_tempdir("cv-head-")
    write_token(data_dir)  # Ray in this process read the session's token at import
    config = Settings(data_dir=str(data_dir), ray_port=free_port(), ray_num_cpus=head_cpus,
                      row_timeout=30.0).replace(**settings)
    store = Store(config)
    for name in volunteers:
        accounts.create_user(store, name, {Role.VOLUNTEER})
    head = LocalHead(config)
    state = VolunteerCluster(config, store)
    # Ray puts the driver's working directory on every worker's sys.path. Here the nodes
    # share the driver's disk, so from the repository the workers would import the engine
    # from there; elsewhere they can only get it from the job's py_modules.
    previous_cwd = os.getcwd()
    os.chdir(data_dir)
    try:
        commands = {name: nodes.join_command(store, config, name) for name in volunteers}
        for name, command in commands.items():
            state.nodes[name] = start_node(name, command, (pythonpath or {}).get(name))
        for name, (command, joins) in (others(commands) if others else {}).items():
            state.nodes[name] = start_node(name, command)
            if not joins:
                state.refused.add(name)
        _connect_and_wait(state, expected=len(state.nodes) - len(state.refused) + 1)
        yield state
    finally:
        for node in state.nodes.values():
            node.stop()
        ray.shutdown()
        os.chdir(previous_cwd)
        head.stop(grace=2)
        for node in state.nodes.values():
            shutil.rmtree(node.directory, ignore_errors=True)
        shutil.rmtree(data_dir, ignore_errors=True)


def add_volunteer(state: VolunteerCluster, name: str,
                  pythonpath: Path | None = None) -> VolunteerNode:
    """A new volunteer account whose machine joins the running cluster by its command."""
    accounts.create_user(state.store, name, {Role.VOLUNTEER})
    state.nodes[name] = start_node(name, nodes.join_command(state.store, state.settings, name),
                                   pythonpath)
    _wait_for_nodes(state, expected=len(state.nodes) + 1)
    return state.nodes[name]


def _connect_and_wait(state: VolunteerCluster, expected: int) -> None:
    from engine import cluster as engine_cluster

    engine_cluster.connect(state.settings)
    _wait_for_nodes(state, expected)


def _wait_for_nodes(state: VolunteerCluster, expected: int) -> None:
    import ray

    deadline = time.monotonic() + JOIN_SECONDS
    while True:
        alive = [n for n in ray.nodes() if n["Alive"]]
        if len(alive) >= expected:
            break
        for name, node in state.nodes.items():
            assert name in state.refused or node.process.poll() is None, \
                f"{name}'s node exited:\n{node.output()[-3000:]}"
        assert time.monotonic() < deadline, f"only {len(alive)} of {expected} nodes joined"
        time.sleep(0.5)
    # Tell the nodes apart by their temp dirs (every node here has the same address).
    for n in alive:
        temp = node_temp_dir(n)
        for name, node in state.nodes.items():
            if temp and temp.startswith(str(node.directory)):
                state.node_ids[name] = n["NodeID"]
    state.node_ids["head"] = next(n["NodeID"] for n in alive
                                  if n["Labels"].get(nodes.ROLE_LABEL) == "head")
    assert set(state.node_ids) == {"head", *state.nodes} - state.refused, state.node_ids
    state.sync(force=True)


def submit(state: VolunteerCluster, script: str, rows: int, batch_size: int, **options) -> int:
    """A project over rows ``x = 0 .. rows-1``, submitted by the local admin."""
    data = b"x\n" + b"".join(b"%d\n" % i for i in range(rows))
    return projects.submit_project(
        state.store, state.settings, accounts.local_admin(state.store), title=script,
        script_name=script, script_bytes=fixture_bytes(script), dataset_name="d.csv",
        dataset_bytes=data, batch_size=batch_size, **options)


def run_until(state: VolunteerCluster, done: Callable[[], bool], timeout: float) -> None:
    """Run a dispatcher until ``done()``, syncing the registry as the dispatcher does."""
    from engine.scheduler import Dispatcher

    deadline = time.monotonic() + timeout

    def until() -> bool:
        assert time.monotonic() < deadline, f"not done after {timeout:.0f} s"
        state.sync()
        return done()

    Dispatcher(state.store, state.settings).run(until=until)
    state.sync(force=True)


def ended(state: VolunteerCluster, *project_ids: int) -> bool:
    with state.store.session() as session:
        return all(ProjectStatus(session.get(Project, pid).status).is_terminal()
                   for pid in project_ids)


def run_to_end(state: VolunteerCluster, *project_ids: int, timeout: float = 240) -> None:
    run_until(state, lambda: ended(state, *project_ids), timeout)
