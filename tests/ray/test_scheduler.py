"""Projects run end to end on a real local Ray head, through the dispatcher."""

import dataclasses
import io
import json
import os
import platform
import threading
import time

import pytest
from sqlalchemy import select

from support import fixture_bytes, run_to_end, submit_numbers as submit
from engine import accounts, nodes, projects
from engine.export import export_results
from engine.models import Task
from engine.scheduler import Dispatcher
from engine.ledger import record_results
from engine.node.result import RowResult
from engine.status import ProjectStatus, transition_project

pytestmark = pytest.mark.slow


def results(store, pid):
    out = io.StringIO()
    export_results(store, accounts.local_admin(store), pid, "json", out)
    return json.loads(out.getvalue())


def test_every_row_runs_once_and_failures_stay_rows(store, cluster_settings):
    pid = submit(store, cluster_settings, "raises.py", 50, batch_size=7)
    view = run_to_end(store, cluster_settings, pid)
    assert (view.status, view.rows_succeeded, view.rows_failed, view.rows_pending) == ("complete", 33, 17, 0)
    rows = results(store, pid)
    assert [r["row"] for r in rows] == list(range(50))
    for r in rows:
        if r["row"] % 3 == 0:
            assert r == {"row": r["row"], "status": "failed", "output": None,
                         "error": f"ValueError: row {r['row']} is divisible by three",
                         "verification": "unverified"}
        else:
            assert r == {"row": r["row"], "status": "succeeded", "output": r["row"], "error": None,
                         "verification": "unverified"}
    with store.session() as s:
        task = s.get(Task, (pid, 3))
        assert 'File "raises.py", line 3, in main' in task.traceback
        assert task.node_id  # the Ray node that ran it
        node = s.get(nodes.Node, task.node_id)
        # The node measured its own sandbox and versions; the registry shows them.
        assert (node.sandbox, node.python_version) == ("available", platform.python_version())


def test_rows_reach_main_as_typed_dicts(store, cluster_settings):
    pid = projects.submit_project(
        store, cluster_settings, accounts.local_admin(store), title="types", script_name="types.py",
        script_bytes=fixture_bytes("types.py"), dataset_name="d.csv",
        dataset_bytes=b"i,f,b,s\n1,2.5,true,x\n,1.0,false,\n")
    assert run_to_end(store, cluster_settings, pid).status == "complete"
    assert [r["output"] for r in results(store, pid)] == [
        {"i": "int", "f": "float", "b": "bool", "s": "str"},
        {"i": "NoneType", "f": "float", "b": "bool", "s": "NoneType"}]


def test_script_that_fails_on_import_fails_the_project_once(store, cluster_settings):
    pid = submit(store, cluster_settings, "import_error.py", 30, batch_size=5)
    view = run_to_end(store, cluster_settings, pid)
    assert view.status == "failed"
    assert view.error == ("the script raised while being imported: ModuleNotFoundError: "
                          "No module named 'a_module_that_does_not_exist'")
    assert "import_error.py" in view.error_traceback
    with store.session() as s:
        assert s.execute(select(Task).where(Task.project_id == pid)).first() is None


def test_cancel_stops_in_flight_batches_and_keeps_results(store, cluster_settings):
    pid = submit(store, cluster_settings, "slow.py", 60, batch_size=2)
    cancelled_at = []

    def cancel_when_started():
        while projects.project_status(store, accounts.local_admin(store), pid).rows_succeeded < 2:
            time.sleep(0.05)
        projects.cancel_project(store, accounts.local_admin(store), pid)
        cancelled_at.append(time.monotonic())

    thread = threading.Thread(target=cancel_when_started)
    thread.start()
    view = run_to_end(store, cluster_settings, pid)
    thread.join()
    assert view.status == "cancelled"
    stopped_at = time.monotonic()
    assert 2 <= view.rows_succeeded < 60
    assert stopped_at - cancelled_at[0] < 5
    kept = [r for r in results(store, pid) if r["status"] == "succeeded"]
    assert len(kept) == view.rows_succeeded


def test_recovery_dispatches_only_rows_without_results(store, cluster_settings):
    pid = submit(store, cluster_settings, "square.py", 40, batch_size=8)
    # As if a dispatcher stored some batches and was then killed.
    with store.session() as s:
        transition_project(s, pid, ProjectStatus.RUNNING)
        record_results(s, pid, [RowResult(i, True, '"kept"', None, None, 0) for i in range(0, 40, 3)], "old")
    view = run_to_end(store, cluster_settings, pid)
    assert (view.status, view.rows_succeeded) == ("complete", 40)
    outputs = [r["output"] for r in results(store, pid)]
    assert outputs == ["kept" if i % 3 == 0 else i * i for i in range(40)]


def test_only_one_dispatcher_holds_the_lease(store, cluster_settings):
    first, second = Dispatcher(store, cluster_settings), Dispatcher(store, cluster_settings)
    assert store.acquire_lease(first.holder, 30)
    assert not store.acquire_lease(second.holder, 30)
    assert store.lease_holder() == first.holder
    store.release_lease(first.holder)
    assert store.acquire_lease(second.holder, 30)
    store.release_lease(second.holder)


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line), for every process on the machine."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat, open(f"/proc/{entry}/cmdline", "rb") as cmd:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
                    found[int(entry)] = (parent, cmd.read().replace(b"\0", b" ").decode(errors="replace"))
            except (OSError, ValueError):
                pass
    return found


def test_a_cancelled_batch_stops_its_child_and_keeps_its_ray_worker(cluster_settings):
    """Cancelling a straggler's copy or a cancelled project's batch interrupts the batch: its
    sandboxed child (and what that started) goes, and the Ray worker stays for the next."""
    import pickle

    import ray
    from ray.exceptions import TaskCancelledError

    from engine import cluster
    from engine.node.executor import Limits
    from engine.courier import stop_batch
    from engine.node.entry import run_batch

    cluster.connect(cluster_settings)
    marker = "sleep 4242.5"
    source = f"import subprocess\ndef main(row):\n    subprocess.run({marker.split()!r})\n"
    remote = ray.remote(num_cpus=1, max_retries=0)(run_batch)
    ref = remote.remote(source, "sleeper.py", ["x"], pickle.dumps((0, 1, None, [(0, [[0]])])),
                        dataclasses.asdict(Limits(row_timeout=60.0)))
    deadline = time.monotonic() + 60
    while not (sleeping := [pid for pid, (_, cmd) in _processes().items() if cmd.strip() == marker]):
        assert time.monotonic() < deadline, "the batch never started"
        time.sleep(0.1)
    table = _processes()
    worker = sleeping[0]
    while not table[worker][1].startswith("ray::"):
        worker = table[worker][0]
    stop_batch(ref)
    with pytest.raises(TaskCancelledError):
        ray.get(ref, timeout=30)
    deadline = time.monotonic() + 10
    while any(cmd.strip() == marker for _, cmd in _processes().values()):
        assert time.monotonic() < deadline, "the cancelled batch's child is still running"
        time.sleep(0.1)
    assert worker in _processes(), "the Ray worker was killed with its batch"
