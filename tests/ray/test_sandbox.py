"""Hostile scripts, each run as a real project on the real Ray head, through the dispatcher.

Each one must end as a failed row with a clear message (or, for the two floods of
output and the background process, be contained), while the project's other rows
succeed and nothing outside the sandbox changes. Canary files outside the sandbox
prove the last point: the scripts try to read and overwrite them.
"""

import io
import json
import os
import socket
import time
import uuid
from pathlib import Path

import pytest

from support import ROOT, fixture_bytes, live_uids
from engine import accounts, projects
from engine.export import export_results
from engine.models import Project
from engine.scheduler import Dispatcher
from engine.settings import primary_address
from engine.status import ProjectStatus

pytestmark = pytest.mark.slow


def submit(store, settings, script, targets, *, row_timeout=2.0, batch_size=10):
    """A project over rows x = 0..len(targets)-1; row x gets targets[x] (None: a plain row)."""
    lines = ["x,target"] + [f"{x},{'' if t is None else t}" for x, t in enumerate(targets)]
    return projects.submit_project(
        store, settings, accounts.local_admin(store), title=script, script_name=script,
        script_bytes=fixture_bytes(script), dataset_name="d.csv",
        dataset_bytes=("\n".join(lines) + "\n").encode(), batch_size=batch_size,
        row_timeout=row_timeout)


def run(store, settings, pid, timeout=120):
    deadline = time.monotonic() + timeout

    def ended():
        assert time.monotonic() < deadline, "project did not end in time"
        with store.session() as s:
            return ProjectStatus(s.get(Project, pid).status).is_terminal()

    Dispatcher(store, settings).run(until=ended)
    out = io.StringIO()
    export_results(store, accounts.local_admin(store), pid, "json", out)
    view = projects.project_status(store, accounts.local_admin(store), pid)
    assert view.status == "complete", view
    return {r["row"]: r for r in json.loads(out.getvalue())}


def assert_plain_rows_succeeded(rows, hostile):
    for x, row in rows.items():
        if x not in hostile:
            assert (row["status"], row["output"], row["error"]) == ("succeeded", x, None), row


@pytest.fixture
def canaries(cluster_settings):
    """Files outside the sandbox that hostile scripts try to read and overwrite."""
    content = f"canary {uuid.uuid4().hex}"
    paths = {"home": Path.home() / f".constellation-canary-{uuid.uuid4().hex[:8]}",
             "repo": ROOT / f".canary-{uuid.uuid4().hex[:8]}",
             "data": cluster_settings.data_path / "canary.txt"}
    for path in paths.values():
        path.write_text(content)
    yield paths
    for path in paths.values():
        assert path.read_text() == content, f"{path} changed"
        assert not (path.parent / "written-by-sandbox").exists()
        path.unlink()


def sandbox_processes():
    """uid -> number of live processes, for the uids research code runs as (root nodes)."""
    counts = {}
    for uid in live_uids().values():
        if uid >= 1_000_000:
            counts[uid] = counts.get(uid, 0) + 1
    return counts


# -- secrets ----------------------------------------------------------------------------

def test_reading_the_tokens_finds_nothing(store, cluster_settings, ray_head, canaries):
    ray_token = Path.home() / ".ray" / "auth_token"
    targets = [None, None, str(ray_token),
               str(ray_head.data_path / "secrets" / "cluster_token"),
               str(cluster_settings.data_path / "secrets" / "cluster_token"),
               str(cluster_settings.data_path / "constellation.db"),
               str(canaries["home"]), str(canaries["repo"]), str(canaries["data"]), None]
    rows = run(store, cluster_settings, submit(store, cluster_settings, "hostile_reads_secrets.py", targets))
    for x in range(2, 9):
        assert rows[x]["status"] == "failed"
        assert rows[x]["error"] == f"FileNotFoundError: [Errno 2] No such file or directory: '{targets[x]}'"
    assert_plain_rows_succeeded(rows, range(2, 9))


def test_the_environment_holds_no_ray_variables_or_tokens(store, cluster_settings):
    rows = run(store, cluster_settings, submit(store, cluster_settings, "hostile_lists_env.py", [None] * 5))
    assert rows[2]["status"] == "failed"
    assert rows[2]["error"] == (
        "LookupError: no Ray variables or tokens; the environment holds only ['HOME', 'LANG', "
        "'MKL_NUM_THREADS', 'OMP_NUM_THREADS', 'OPENBLAS_NUM_THREADS', 'PATH', 'PWD', "
        "'PYTHONDONTWRITEBYTECODE', 'TMPDIR']")
    assert_plain_rows_succeeded(rows, {2})


def test_walking_the_tree_finds_no_repository_database_or_token(store, cluster_settings):
    rows = run(store, cluster_settings,
               submit(store, cluster_settings, "hostile_walks_dirs.py", [None] * 5, row_timeout=30))
    assert rows[2]["status"] == "failed"
    assert rows[2]["error"].startswith("LookupError: found no repository, database or token in ")
    assert_plain_rows_succeeded(rows, {2})


def test_undoing_the_mounts_fails_and_reveals_nothing(store, cluster_settings, canaries):
    token = Path.home() / ".ray" / "auth_token"
    targets = [None, None] + [f"{token}|{canaries[k]}" for k in ("home", "repo", "data")] + [None]
    rows = run(store, cluster_settings, submit(store, cluster_settings, "hostile_mount_escape.py", targets))
    # The first attempt meets the sandbox as built; later rows run in whatever namespaces
    # the first one created (a nested user namespace may be created: its mounts are locked).
    assert rows[2]["error"].startswith("PermissionError: umount2 $HOME: Operation not permitted; "
                                       "umount2 /tmp: Operation not permitted; "
                                       "remount / rw: Operation not permitted; "), rows[2]
    for x in (2, 3, 4):
        assert rows[x]["status"] == "failed", rows[x]
        error = rows[x]["error"]
        assert "umount2 $HOME again: Invalid argument" in error, error
        assert error.endswith("read token: No such file or directory; "
                              "write canary: No such file or directory"), error
    assert_plain_rows_succeeded(rows, {2, 3, 4})


# -- network ----------------------------------------------------------------------------

def test_no_connection_reaches_the_ray_head_or_the_portal(store, cluster_settings):
    own = primary_address()
    listeners = []
    for host in ("127.0.0.1", own):
        listener = socket.socket()
        listener.bind((host, 0))
        listener.listen()
        listener.setblocking(False)
        listeners.append(listener)
    portal_port = listeners[0].getsockname()[1], listeners[1].getsockname()[1]
    targets = [None, None,
               f"127.0.0.1:{cluster_settings.ray_port}", f"{own}:{cluster_settings.ray_port}",
               f"127.0.0.1:{portal_port[0]}", f"{own}:{portal_port[1]}", None]
    try:
        rows = run(store, cluster_settings, submit(store, cluster_settings, "hostile_connects.py", targets))
        for listener in listeners:
            with pytest.raises(BlockingIOError):
                listener.accept()  # nobody connected
    finally:
        for listener in listeners:
            listener.close()
    # 127.0.0.1 inside is the sandbox's own loopback, where nothing listens; every other
    # address is unreachable from an empty network namespace.
    for x in (2, 4):
        assert rows[x]["error"] == "ConnectionRefusedError: [Errno 111] Connection refused"
    for x in (3, 5):
        assert rows[x]["error"] == "OSError: [Errno 101] Network is unreachable"
    assert_plain_rows_succeeded(rows, {2, 3, 4, 5})


# -- the file system -----------------------------------------------------------------------

def test_writes_outside_the_sandbox_change_nothing(store, cluster_settings, canaries):
    targets = [None, None, str(canaries["home"]), str(canaries["repo"]), str(canaries["data"]),
               str(ROOT / "README.md"), None]
    rows = run(store, cluster_settings, submit(store, cluster_settings, "hostile_writes_outside.py", targets))
    for x in (2, 3, 4, 5):
        assert rows[x]["status"] == "failed"
        assert rows[x]["error"] == f"FileNotFoundError: [Errno 2] No such file or directory: '{targets[x]}'"
    assert_plain_rows_succeeded(rows, {2, 3, 4, 5})


# -- resources ----------------------------------------------------------------------------

def test_fork_bomb_fails_its_row_and_leaves_nothing(store, cluster_settings):
    settings = cluster_settings.replace(process_limit=32)
    rows = run(store, settings, submit(store, settings, "hostile_fork_bomb.py", [None] * 8))
    assert rows[2]["status"] == "failed"
    assert rows[2]["error"] == ("BlockingIOError: [Errno 11] Resource temporarily unavailable "
                                "(the sandbox's limit of 64 processes was reached)") or \
        rows[2]["error"] == ("BlockingIOError: [Errno 11] Resource temporarily unavailable "
                             "(the sandbox's limit of 32 processes was reached)")
    assert_plain_rows_succeeded(rows, {2})
    # A warm child is one process per sandbox uid's worker (two at most); bomb copies are gone.
    assert all(count <= 2 for count in sandbox_processes().values()), sandbox_processes()


def test_allocating_8_gib_fails_at_the_default_2_gib_limit(store, cluster_settings):
    settings = cluster_settings.replace(memory_limit_mb=2048)
    rows = run(store, settings, submit(store, settings, "hostile_allocates.py", [None] * 5))
    assert rows[2]["status"] == "failed"
    assert rows[2]["error"] == "MemoryError: memory limit of 2 GiB exceeded"
    assert_plain_rows_succeeded(rows, {2})


def test_infinite_loop_fails_at_the_row_timeout(store, cluster_settings):
    rows = run(store, cluster_settings,
               submit(store, cluster_settings, "hostile_infinite_loop.py", [None] * 5, row_timeout=1))
    assert rows[2]["error"] == "RowTimeout: row exceeded the 1 s time limit"
    assert_plain_rows_succeeded(rows, {2})


def test_a_loop_that_blocks_the_alarm_is_stopped_from_outside(store, cluster_settings):
    rows = run(store, cluster_settings,
               submit(store, cluster_settings, "hostile_ignores_alarm.py", [None] * 5, row_timeout=1))
    # The parent's watchdog, or the RLIMIT_CPU backstop, whichever comes first.
    assert rows[2]["error"] in (
        "RowTimeout: row exceeded the 1 s time limit (its process stopped responding and was replaced)",
        "WorkerCrashed: the process running this row died: it exceeded the CPU time limit of its batch")
    assert_plain_rows_succeeded(rows, {2})


# -- output ---------------------------------------------------------------------------------

def test_printing_1_gb_is_discarded_without_harm(store, cluster_settings):
    started = time.monotonic()
    rows = run(store, cluster_settings, submit(store, cluster_settings, "hostile_prints_1gb.py", [None] * 5))
    # stdout and stderr of research code go to /dev/null: nothing buffers the gigabyte.
    assert (rows[2]["status"], rows[2]["output"]) == ("succeeded", "printed 1 GiB")
    assert_plain_rows_succeeded(rows, {2})
    assert time.monotonic() - started < 60


def test_flooding_the_result_pipe_fails_the_row(store, cluster_settings):
    rows = run(store, cluster_settings, submit(store, cluster_settings, "hostile_floods_results.py", [None] * 5))
    assert rows[2]["status"] == "failed"
    assert rows[2]["error"] == ("SandboxError: the process running this row broke the result protocol "
                                "(it wrote to the engine's result pipe itself); it was replaced")
    assert_plain_rows_succeeded(rows, {2})


# -- processes ---------------------------------------------------------------------------

def test_killing_the_parent_is_not_permitted(store, cluster_settings):
    rows = run(store, cluster_settings, submit(store, cluster_settings, "hostile_kills_parent.py", [None] * 5))
    # As root the child has switched to a uid of its own: EPERM. Under the confined head
    # (engine.confinement) it runs as the head's unprivileged uid, and its parent is the
    # sandbox's PID-namespace init, which a signal from inside the namespace cannot kill:
    # the call returns, and the parent lives. Either way the row did not crash its process.
    if rows[2]["error"] is not None:
        assert rows[2]["error"] == "PermissionError: [Errno 1] Operation not permitted"
    else:
        assert rows[2]["output"] == "killed my parent"
    assert_plain_rows_succeeded(rows, {2})


def host_processes_running(argv: list[bytes]) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                if cmdline.read().split(b"\0")[:len(argv)] == argv:
                    found.append(int(pid))
        except OSError:
            continue
    return found


def test_a_background_process_does_not_outlive_its_batch(store, cluster_settings):
    marker = f"{uuid.uuid4().int % 10**6 + 4242}s"  # an argument of sleep, not a number
    targets = [None, None, marker, marker, None, None]
    rows = run(store, cluster_settings,
               submit(store, cluster_settings, "hostile_background.py", targets, batch_size=6))
    assert rows[2]["output"] == "left a daemon behind"
    assert rows[3]["output"] == "the daemon is running"  # it did run, during the batch
    assert_plain_rows_succeeded(rows, {2, 3})
    deadline = time.monotonic() + 5
    while host_processes_running([b"sleep", marker.encode()]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert host_processes_running([b"sleep", marker.encode()]) == []


def test_os_exit_halfway_keeps_done_rows_and_fails_only_its_row(store, cluster_settings):
    rows = run(store, cluster_settings,
               submit(store, cluster_settings, "hostile_exits_midway.py", [None] * 10))
    assert rows[5]["status"] == "failed"
    assert rows[5]["error"] == \
        "WorkerCrashed: the process running this row exited unexpectedly (exit code 0)"
    assert_plain_rows_succeeded(rows, {5})


# -- controls: the same attacks without the sandbox do work ------------------------------

def test_controls_the_attacks_work_without_the_sandbox(tmp_path):
    """So that the tests above can fail: unsandboxed, the hostile scripts get what they want."""
    from engine.node import executor
    from engine.node.executor import Limits, run_rows

    unsandboxed = Limits(row_timeout=30.0, sandbox="none")
    canary = tmp_path / "canary"
    canary.write_text("canary")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def attack(script, target):
        source = fixture_bytes(script).decode()
        outcome = run_rows(source, script, ["x", "target"], [(2, [2, target])], unsandboxed)
        return outcome.results[0]

    try:
        assert attack("hostile_reads_secrets.py", str(canary)).output == '"canary"'
        assert attack("hostile_writes_outside.py", str(canary)).succeeded
        assert canary.read_text().startswith("owned")
        assert attack("hostile_connects.py", f"127.0.0.1:{listener.getsockname()[1]}").succeeded
        assert listener.accept()[0].recv(100) == b"hello from the sandbox\n"
        found = attack("hostile_walks_dirs.py", None)
        assert str(ROOT) in found.output
    finally:
        listener.close()
        executor.shutdown()
