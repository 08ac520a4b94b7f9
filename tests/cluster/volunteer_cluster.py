"""A real multi-node cluster of volunteers on this machine, for the slow tests.

The engine starts the head; each volunteer's machine joins by running the exact text of
its join command (``engine.nodes.join_command``) in its own session, as a volunteer's
machine would: the ``ray`` of a clean venv that holds only the pinned Ray
(``volunteer_env.volunteer_python``), a home directory of its own outside /tmp as the
working directory, and a minimal environment with no path into the repository. The
workers there get the ``engine`` package only because the dispatcher ships it with the
job. A node may have extra modules of its own (a dishonest volunteer's modified Python
environment, see ``tests/fixtures/cheater``): they are copied into its home and put on its
``PYTHONPATH``. Every process is stopped by process group.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from support import ROOT, fixture_bytes, free_port, free_ports, short_tempdir, write_token
from engine import accounts, confinement, nodes, projects
from engine.accounts import Role
from engine.models import Project
from engine.settings import Settings
from engine.status import ProjectStatus
from engine.store import Store
from support.volunteer_env import (copy_into_home, give_to, node_environ, node_uid, volunteer_env,
                           volunteer_home)

__all__ = ["VolunteerCluster", "VolunteerNode", "add_volunteer", "assert_clean_node", "ended",
           "is_confined", "node_temp_dir", "plain_join_command", "run_to_end", "run_until", "start_node",
           "submit", "unconfined", "volunteer_cluster", "volunteer_env"]

JOIN_SECONDS = 120
WORKER_PORTS = 24  # per node: its workers, and Ray's spare ones
SYNC_SECONDS = 2.0


@dataclass
class VolunteerNode:
    name: str
    directory: Path   # short, under /tmp: Ray's --temp-dir (its socket paths must be short)
    home: Path        # the volunteer's $HOME and the node's working directory
    process: subprocess.Popen
    log: Path
    env: dict[str, str]   # the environment it was started with
    uid: int | None       # the volunteer's user (None: the tests' own)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def pids(self) -> list[int]:
        """The node's processes still running: ray start, raylet, agents and workers (the
        raylet puts its workers in process groups of their own: follow parents instead)."""
        if self.process.poll() is not None:
            return []  # its pid may belong to another process by now
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    children.setdefault(_parent(int(entry.name)), []).append(int(entry.name))
        found, todo = [], [self.process.pid]
        while todo:
            pid = todo.pop()
            with contextlib.suppress(OSError, ValueError, IndexError):
                if (pid != self.process.pid and _comm(pid) == "bwrap"
                        and _comm(_parent(pid)) not in _CONFINEMENT):
                    continue  # a row sandbox: research code's own scrubbed environment
            found.append(pid)
            todo.extend(children.get(pid, []))
        return found

    def stop(self) -> None:
        """Kill the node's processes: its whole process group (ray start, raylet, agents),
        and by PID the workers, which the raylet starts in process groups of their own, and
        any process left behind by a killed parent whose command line names the temp dir."""
        pids = self.pids() + [int(pid) for pid in subprocess.run(
            ["pgrep", "-f", str(self.directory)], capture_output=True, text=True).stdout.split()]
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
        shutil.rmtree(self.home, ignore_errors=True)


# The processes between the shell that runs a join command and ``ray start``: the node's
# own confinement (bwrap, its PID namespace's init, the watching shell).
_CONFINEMENT = {"bash", "bwrap", "sh"}


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def _parent(pid: int) -> int:
    # The parent's pid is the 4th field, after the ")" that ends the name.
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


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


def plain_join_command(address: str, token: str) -> str:
    """What anyone holding the cluster token can run: a node with no volunteer's labels."""
    return (f"RAY_AUTH_MODE=token RAY_AUTH_TOKEN={shlex.quote(token)} "
            f"RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL=minor ray start "
            f"--address={shlex.quote(address)} --disable-usage-stats")


def is_confined(command: str) -> bool:
    """Whether ``command`` is a join command that confines its node (bwrap around ray start)."""
    return shlex.split(command)[len(_assignments(command))] == "bwrap"


def unconfined(command: str) -> str:
    """``command`` with its confinement stripped: what a volunteer who does not care, or
    means harm, runs instead (the same token, labels and options, plain ``ray start``)."""
    words = shlex.split(command)
    env = _assignments(command)
    options = words[words.index(confinement.NODE_WATCH) + 2:]  # after sh -c SCRIPT $0
    return shlex.join([*env, "ray", "start", *options])


def _assignments(command: str) -> list[str]:
    words = shlex.split(command)
    return list(itertools.takewhile(lambda w: "=" in w and not w.startswith("-"), words))


def _with_bind(command: str, path: Path) -> str:
    """A confined join command that also shows the node ``path`` (read-only)."""
    before, after = command.split(" --chdir /tmp -- sh -c ", 1)
    return f"{before} --ro-bind {shlex.quote(str(path))} {shlex.quote(str(path))} --chdir /tmp -- sh -c {after}"


def start_node(name: str, command: str, pythonpath: Path | None = None, *, cpus: int = 1,
               venv_bin: Path | None = None, home: Path | None = None,
               own_ports: bool = True) -> VolunteerNode:
    """Run ``command`` (a join command: ``ENV=... ray start ...``) as a volunteer's machine.

    ``pythonpath`` is the node's own extra modules (a file or a directory, copied into its
    home). ``venv_bin`` replaces the clean venv on PATH, ``home`` the fresh home directory
    (for a node whose venv was made in it). Without ``own_ports`` the node keeps the ports
    the join command pins (only one such node fits on this machine).

    The node runs as the volunteer's own user (``node_uid``), as a volunteer runs it. A
    confined command keeps running while its node does; a plain ``ray start`` is given
    ``--block``. The node's extra modules are bound into a confined node (its home is not
    there), as a volunteer would add ``--ro-bind`` for something of theirs.
    """
    directory = short_tempdir(f"cv-{name}-")
    home = home if home is not None else volunteer_home(name)
    log = directory / "node.log"
    extra = copy_into_home(home, pythonpath) if pythonpath is not None else None
    uid = node_uid(name)
    give_to(home, uid)
    give_to(directory, uid)  # a plain node's Ray temp dir (a confined node's is private)
    env = volunteer_env(home, extra, venv_bin=venv_bin)
    confined = is_confined(command)
    if extra is not None and confined:
        command = _with_bind(command, extra)
    # Several nodes share this machine: each needs its own temp dir and ports. The ports
    # given here override the join command's fixed range (the last value of an option wins).
    (node_manager, object_manager, agent_grpc, agent_listen, metrics, runtime_env,
     *worker_ports) = free_ports(6 + WORKER_PORTS)
    workers = ",".join(map(str, worker_ports))
    ports = (f"--node-manager-port={node_manager} --object-manager-port={object_manager} "
             f"--dashboard-agent-grpc-port={agent_grpc} "
             f"--dashboard-agent-listen-port={agent_listen} --metrics-export-port={metrics} "
             f"--runtime-env-agent-port={runtime_env} --worker-port-list={workers} "
             if own_ports else "")
    full = f"{command} --num-cpus={cpus} --temp-dir={directory / 'ray'} {ports}"
    full += "" if confined else "--block"
    user = {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}
    with open(log, "wb") as out:
        process = subprocess.Popen(["/bin/bash", "-c", full], cwd=home, env=env,
                                   stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True, **user)
    return VolunteerNode(name, directory, home, process, log, env, uid)


def assert_clean_node(node: VolunteerNode) -> None:
    """Every process of ``node`` runs in the volunteer's environment: nothing in its
    environment, command line or working directory names the repository, HOME is the
    volunteer's, PATH the volunteer's, and PYTHONPATH (Ray's, and the node's own extra
    modules) stays inside the node's home and temp dir.

    Ray's agents retitle themselves (``ray::DashboardAgent``) over the memory that
    /proc/<pid>/environ shows, so only what is left of theirs can be read (a variable, when
    readable, must still be right); ray start, the raylet and the workers (SPT_NOENV) keep
    theirs whole.
    """
    whole = 0
    for pid in node.pids():
        try:
            environ = node_environ(pid)
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except (FileNotFoundError, ProcessLookupError):
            continue  # it ended meanwhile
        where = f"{node.name}'s process {pid} ({cmdline.strip()[:160]})"
        leaked = {k: v for k, v in environ.items() if str(ROOT) in v}
        assert not leaked, f"{where} has the repository in its environment: {leaked}"
        assert str(ROOT) not in cmdline, f"{where} names the repository"
        assert not cwd.startswith(str(ROOT)), f"{where} works in {cwd}"
        assert environ.get("VIRTUAL_ENV", node.env["VIRTUAL_ENV"]) == node.env["VIRTUAL_ENV"], where
        assert not [k for k in environ if k.startswith("CONSTELLATION_")], where
        for entry in filter(None, environ.get("PYTHONPATH", "").split(":")):
            assert entry.startswith((f"{node.home}/", f"{node.directory}/")), \
                f"{where}: PYTHONPATH has {entry}"
        for key, value in (("PATH", node.env["PATH"]), ("HOME", str(node.home))):
            assert environ.get(key, value) == value, f"{where}: {key}={environ[key]}"
        whole += "PATH" in environ and "HOME" in environ
    assert whole, f"no process of {node.name}'s node could be checked"


def node_temp_dir(ray_node: dict) -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(ray_node.get("ObjectStoreSocketName", ""))))


@contextlib.contextmanager
def volunteer_cluster(volunteers: tuple[str, ...], *, head_cpus: int | None,
                      pythonpath: dict[str, Path] | None = None,
                      others: Callable[[dict[str, str]], dict[str, tuple[str, bool]]] | None = None,
                      pinned: str | None = None, careless: tuple[str, ...] = (),
                      **settings: object) -> Iterator[VolunteerCluster]:
    """A head started by the engine and one 1-CPU node per volunteer, joined by command.

    ``others``, given the volunteers' join commands by name, names more nodes to start:
    name -> (command, whether it joins), e.g. a forged signature (joins, unclaimed) or a
    wrong token (refused). ``pinned`` names the one volunteer whose node keeps the join
    command's fixed ports; ``careless`` the volunteers who strip its confinement
    (``unconfined``).
    """
    import ray

    from engine.cluster import LocalHead

    ray.shutdown()  # this process may be connected to the session's shared head
    data_dir = short_tempdir("cv-head-")
    write_token(data_dir)  # Ray in this process read the session's token at import
    config = Settings(data_dir=str(data_dir), ray_port=free_port(), ray_num_cpus=head_cpus,
                      head_ports="",
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
        # One node at a time: three confined nodes starting at once beside a new head on
        # two cores overloaded the GCS in a quiet CI run, and one `ray start` gave up
        # ("The current node timed out during startup").
        from engine import cluster as engine_cluster

        engine_cluster.connect(state.settings)
        for name, command in commands.items():
            command = unconfined(command) if name in careless else command
            state.nodes[name] = start_node(name, command, (pythonpath or {}).get(name),
                                           own_ports=name != pinned)
            _wait_for_nodes(state, expected=len(state.nodes) + 1)
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
            node.remove()
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
    for name, node in state.nodes.items():
        if name not in state.refused and node.process.poll() is None:
            assert_clean_node(node)
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
