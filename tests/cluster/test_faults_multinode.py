"""Faults that need a second node: a raylet killed mid-batch, a node missing a package.

Worker nodes are real ``ray start`` processes joined to the session's head with the
cluster token, each with its own temp dir and ports, run as a volunteer's machine is: the
clean volunteer venv (the pinned Ray only), a minimal environment and a home of its own
outside /tmp (``tests/support/volunteer_env.py``). They are stopped by process group and PID.
"""

import os
import shutil
import signal
import subprocess
import sysconfig
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from support import (project_ended as ended, run_to_end, short_tempdir,
                      submit_numbers as submit)
from engine import accounts, cluster, projects
from engine.models import Node, NodeScriptFailure, Task
from engine.status import NodeHealth
from engine.scheduler import Dispatcher
from volunteer_cluster import assert_clean_node, plain_join_command, start_node
from support.volunteer_env import base_python, volunteer_home, volunteer_python

pytestmark = pytest.mark.slow


class WorkerNode:
    """A plain node (no volunteer's labels): ``ray start`` with the cluster token."""

    def __init__(self, settings, cpus: int, *, venv_bin: Path | None = None,
                 home: Path | None = None):
        token = cluster.cluster_token(settings)
        command = plain_join_command(cluster.head_address(settings), token)
        self.node = start_node("plain", command, cpus=cpus, venv_bin=venv_bin, home=home)
        self.temp_dir = self.node.directory
        try:
            self.node_id = self._wait_until_joined()
            assert_clean_node(self.node)
        except BaseException:
            self.stop()
            raise

    def _wait_until_joined(self) -> str:
        import ray

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            for node in ray.nodes():
                if node["Alive"] and str(self.temp_dir) in node.get("ObjectStoreSocketName", ""):
                    return node["NodeID"]
            assert self.node.process.poll() is None, \
                f"the worker node exited while joining:\n{self.node.output()[-3000:]}"
            time.sleep(0.3)
        raise AssertionError(f"the worker node did not join:\n{self.node.output()[-3000:]}")

    def raylet_pid(self) -> int:
        found = subprocess.run(["pgrep", "-f", f"raylet.*{self.temp_dir}"], capture_output=True,
                               text=True).stdout.split()
        return int(found[0])

    def stop(self) -> None:
        self.node.stop()
        self.node.remove()


def node_of_rows(store, pid):
    with store.session() as s:
        return dict(s.execute(select(Task.row_index, Task.node_id).where(Task.project_id == pid)).all())


@pytest.fixture
def open_settings(cluster_settings):
    """The session's head, with a driver connected from outside the repository.

    Ray puts the driver's working directory on every worker's sys.path, on every node. The
    nodes here share the driver's disk, so from the repository their workers would import
    the engine from there instead of the package the job ships.
    """
    import ray

    # These nodes are plain `ray start` nodes without a volunteer's signature.
    settings = cluster_settings.replace(allow_unclaimed_nodes=True)
    ray.shutdown()  # this process may be connected from the repository already
    previous_cwd, driver_dir = os.getcwd(), short_tempdir("crn-driver-")
    os.chdir(driver_dir)
    try:
        cluster.connect(settings)
        yield settings
    finally:
        ray.shutdown()
        os.chdir(previous_cwd)
        shutil.rmtree(driver_dir, ignore_errors=True)


def test_node_killed_mid_batch_loses_nothing(store, open_settings):
    node = WorkerNode(open_settings, cpus=2)
    try:
        pid = submit(store, open_settings, "ms.py", 4000, batch_size=40)
        thread = threading.Thread(target=lambda: Dispatcher(store, open_settings).run(
            until=lambda: ended(store, pid)))
        thread.start()
        deadline = time.monotonic() + 60
        while node.node_id not in node_of_rows(store, pid).values():
            assert time.monotonic() < deadline, "the worker node never got work"
            time.sleep(0.05)
        os.kill(node.raylet_pid(), signal.SIGKILL)  # the node dies with batches in flight
        thread.join(timeout=180)
        assert not thread.is_alive()
    finally:
        node.stop()
    view = projects.project_status(store, accounts.local_admin(store), pid)
    assert (view.status, view.rows_succeeded, view.rows_failed) == ("complete", 4000, 0)
    rows = node_of_rows(store, pid)
    assert sorted(rows) == list(range(4000))  # every row once (the key forbids twice)
    assert any(n != node.node_id for n in rows.values())  # the rest finished elsewhere


def _site_packages(venv: Path) -> Path:
    return Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))


def _venv_with_extra_module(module_name: str, module_source: str) -> tuple[Path, Path]:
    """A volunteer's home and venv: the clean volunteer venv plus one module only it has.

    The module must be in the venv itself, not on PYTHONPATH: research code imports it in
    the sandboxed child, which runs ``python -I`` (no PYTHONPATH) with ``$HOME`` masked, and
    sees only the system and the node's Python installation. So the node's venv is a new
    one in the volunteer's home (made with the volunteers' interpreter), whose site-packages
    holds the module and a .pth line to the clean venv's packages (Ray and its
    dependencies); the shared clean venv itself stays untouched. Returns (home, bin).
    """
    home = volunteer_home("extra")
    venv = home / "venv"
    subprocess.run([base_python(), "-m", "venv", "--without-pip", str(venv)], check=True,
                   cwd=home, env={"PATH": "/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8"})
    site = _site_packages(venv)
    (site / "volunteer_ray.pth").write_text(f"{_site_packages(volunteer_python().parent.parent)}\n")
    (site / f"{module_name}.py").write_text(module_source)
    # The `ray` command pip would have written into this venv.
    ray_command = venv / "bin" / "ray"
    ray_command.write_text(f"#!{venv}/bin/python\nimport sys\n"
                           "from ray.scripts.scripts import main\nsys.exit(main())\n")
    ray_command.chmod(0o755)
    return home, venv / "bin"


def _submit_once_both_ready(store, settings, submit_project, timeout: float = 180) -> int:
    """Run a dispatcher; once it has found two nodes ready, submit; return when it ended."""
    submitted: list[int] = []
    thread = threading.Thread(target=lambda: Dispatcher(store, settings).run(
        until=lambda: bool(submitted) and ended(store, submitted[0])), daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while True:
        with store.session() as s:
            ready = s.execute(select(Node.node_id).where(
                Node.online, Node.health == NodeHealth.READY)).all()
        if len(ready) >= 2:
            break
        assert time.monotonic() < deadline, "the dispatcher did not find both nodes ready"
        time.sleep(0.3)
    submitted.append(submit_project())
    thread.join(timeout)
    assert not thread.is_alive(), "the project did not end in time"
    return submitted[0]


def test_script_importing_a_missing_package_runs_where_it_can(store, open_settings):
    home, venv_bin = _venv_with_extra_module("only_on_some_nodes", "VALUE = 41\n")
    node = WorkerNode(open_settings, cpus=1, venv_bin=venv_bin, home=home)
    source = (b"import time\nimport only_on_some_nodes\n\ndef main(row):\n    time.sleep(0.02)\n"
              b"    return row['x'] + only_on_some_nodes.VALUE\n")
    try:
        # Submitted once the dispatcher has checked both nodes: the head, which lacks the
        # package, must get batches too (on a loaded machine its check can take longer than
        # the whole project takes on the other node).
        pid = _submit_once_both_ready(store, open_settings, lambda: submit(
            store, open_settings, "needs_package.py", 200, source=source, batch_size=10))
        view = projects.project_status(store, accounts.local_admin(store), pid)
        assert (view.status, view.rows_succeeded) == ("complete", 200), view.error
        assert set(node_of_rows(store, pid).values()) == {node.node_id}
        with store.session() as s:
            failures = s.execute(select(NodeScriptFailure)).scalars().all()
        assert failures and all(f.node_id != node.node_id for f in failures)
        assert "No module named 'only_on_some_nodes'" in failures[0].error
        # No node at all can import this one: only then does the project fail.
        nowhere = b"import not_on_any_node\n\ndef main(row):\n    return row\n"
        pid = submit(store, open_settings, "nowhere.py", 50, source=nowhere, batch_size=10)
        view = run_to_end(store, open_settings, pid)
        assert view.status == "failed" and "not_on_any_node" in view.error
    finally:
        node.stop()
