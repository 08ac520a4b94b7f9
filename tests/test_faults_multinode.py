"""Faults that need a second node: a raylet killed mid-batch, a node missing a package.

Worker nodes are real ``ray start`` processes joined to the session's head, each with its
own temp dir and ports, stopped by process group.
"""

import os
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from conftest import (SESSION_TOKEN, free_port, project_ended as ended, run_to_end,
                      short_tempdir, submit_numbers as submit)
from engine import accounts, cluster, projects
from engine.models import NodeScriptFailure, Task
from engine.scheduler import Dispatcher

pytestmark = pytest.mark.slow


class WorkerNode:
    def __init__(self, settings, cpus: int, python: str = sys.executable):
        self.temp_dir = short_tempdir("crn-")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PYTHONPATH"))}
        env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": SESSION_TOKEN})
        argv = [python, "-m", "ray.scripts.scripts", "start",
                f"--address={cluster.head_address(settings)}", "--block",
                f"--num-cpus={cpus}", f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
                f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}"]
        self.process = subprocess.Popen(argv, env=env, cwd=self.temp_dir, start_new_session=True,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.node_id = self._wait_until_joined()

    def _wait_until_joined(self) -> str:
        import ray

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for node in ray.nodes():
                if node["Alive"] and str(self.temp_dir) in node.get("ObjectStoreSocketName", ""):
                    return node["NodeID"]
            assert self.process.poll() is None, "the worker node exited while joining"
            time.sleep(0.3)
        raise AssertionError("the worker node did not join")

    def raylet_pid(self) -> int:
        found = subprocess.run(["pgrep", "-f", f"raylet.*{self.temp_dir}"], capture_output=True,
                               text=True).stdout.split()
        return int(found[0])

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        leftovers = subprocess.run(["pgrep", "-f", str(self.temp_dir)], capture_output=True, text=True)
        for pid in leftovers.stdout.split():
            os.kill(int(pid), signal.SIGKILL)


def node_of_rows(store, pid):
    with store.session() as s:
        return dict(s.execute(select(Task.row_index, Task.node_id).where(Task.project_id == pid)).all())


@pytest.fixture
def open_settings(cluster_settings):
    # These nodes are plain `ray start` nodes without a volunteer's signature.
    settings = cluster_settings.replace(allow_unclaimed_nodes=True)
    cluster.connect(settings)
    return settings


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


def _venv_with_extra_module(module_source: str) -> Path:
    """A second Python environment: this venv's packages plus one module only it has."""
    # Outside /tmp, which the sandbox replaces with an empty one.
    root = Path(tempfile.mkdtemp(prefix="crv-", dir="/var/tmp"))
    root.chmod(0o755)  # research code runs as an unprivileged user: packages must be readable
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(root)], check=True)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(root), "platbase": str(root)}))
    site.mkdir(parents=True, exist_ok=True)
    (site / "shared_packages.pth").write_text(sysconfig.get_path("purelib") + "\n")
    (site / "only_on_some_nodes.py").write_text(module_source)
    return root / "bin" / "python"


def test_script_importing_a_missing_package_runs_where_it_can(store, open_settings):
    python = _venv_with_extra_module("VALUE = 41\n")
    node = WorkerNode(open_settings, cpus=1, python=str(python))
    source = (b"import time\nimport only_on_some_nodes\n\ndef main(row):\n    time.sleep(0.02)\n"
              b"    return row['x'] + only_on_some_nodes.VALUE\n")
    try:
        pid = submit(store, open_settings, "needs_package.py", 200, source=source, batch_size=10)
        view = run_to_end(store, open_settings, pid)
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
