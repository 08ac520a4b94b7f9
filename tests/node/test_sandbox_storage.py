"""The sandbox's /tmp and $HOME are in memory (tmpfs): bounded, counted against the memory
limit, and freed when the child ends. Real bubblewrap, real tmpfs."""

import io
import json
import os
import shutil
import subprocess
import time

import pytest

from support import fixture_bytes, run_to_end
from engine import accounts, projects
from engine.export import export_results
from engine.node import executor, pool, sandbox
from engine.node.executor import Limits, run_rows

MIB = 1 << 20
SMALL = Limits(row_timeout=60.0, memory_bytes=256 * MIB)


def fill(targets, limits=SMALL):
    source = fixture_bytes("hostile_fills_tmp.py").decode()
    rows = [(x, [x, t]) for x, t in enumerate(targets)]
    return run_rows(source, "fills.py", ["x", "target"], rows, limits).results


FULL = ("OSError: [Errno 28] No space left on device (the sandbox's files may use 48 MiB in "
        "/tmp and 16 MiB in $HOME, out of its memory limit of 256 MiB)")


def test_writing_past_the_bound_fails_the_row_with_a_clear_error():
    results = fill(["", "/tmp", "~", ""])
    assert [r.succeeded for r in results] == [True, False, False, True]
    assert results[1].error == FULL and results[2].error == FULL


def test_files_come_out_of_the_memory_limit():
    assert SMALL.storage() == (48 * MIB, 16 * MIB)
    probe = ("import resource\n"
             "def main(row):\n"
             "    return resource.getrlimit(resource.RLIMIT_AS)[0]\n")
    outcome = run_rows(probe, "as.py", ["x"], [(0, [0])], SMALL)
    # The address space gets the other three quarters.
    assert json.loads(outcome.results[0].output) == 256 * MIB - 64 * MIB == SMALL.address_space()


def test_bubblewrap_s_own_root_and_dev_are_read_only():
    probe = ("import errno\n"
             "def main(row):\n"
             "    try:\n"
             "        open(row['x'] + '/probe', 'w')\n"
             "    except OSError as exc:\n"
             "        return errno.errorcode[exc.errno]\n"
             "    return 'written'\n")
    outcome = run_rows(probe, "ro.py", ["x"], [(0, ["/"]), (1, ["/dev"]), (2, ["/dev/shm"]),
                                               (3, ["/tmp"])], SMALL)
    said = [json.loads(r.output) for r in outcome.results]
    # On a root node the sandbox's uid cannot write there anyway (EACCES); on a node that is
    # not root, bubblewrap's tmpfs is the user's own, and only the read-only remount stops it.
    assert said[:3] in (["EROFS"] * 3, ["EACCES"] * 3) and said[3] == "written"
    argv = sandbox.bwrap_argv((), SMALL.storage())
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--remount-ro"] == ["/", "/dev"]


NOBODY = 65534


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="needs root, to run bubblewrap as an unprivileged user")
def test_on_a_node_that_is_not_root_only_tmp_and_home_are_writable(monkeypatch):
    """Run by an unprivileged user, bubblewrap's own / and /dev are that user's tmpfs."""
    monkeypatch.setattr(sandbox, "runs_as_root", lambda: False)
    monkeypatch.setattr(sandbox, "python_paths", lambda: [])  # root's Python is not theirs
    argv = sandbox.bwrap_argv((), (MIB, MIB))
    script = ("for d in / /dev /dev/shm /tmp \"$HOME\"; do "
              "(echo x > \"$d/probe\") 2>/dev/null && echo \"$d writable\" || echo \"$d no\"; done; "
              "head -c 2097152 /dev/zero > /tmp/big 2>/dev/null || echo '/tmp full'")
    run = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                          *argv, "/bin/sh", "-c", script], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "HOME": sandbox.sandbox_home()}, timeout=60)
    if "writable" not in run.stdout:
        pytest.skip(f"unprivileged bubblewrap does not work here: {run.stderr.strip()}")
    home = sandbox.sandbox_home()
    assert run.stdout.split("\n")[:-1] == [
        "/ no", "/dev no", "/dev/shm no", "/tmp writable", f"{home} writable", "/tmp full"], run


def shmem_bytes() -> int:
    """The machine's memory in tmpfs and shared memory (what a sandbox's files hold)."""
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    return int(fields["Shmem"].split()[0]) * 1024


def keep_files(mib: int):
    source = fixture_bytes("writes_tmp.py").decode()
    limits = Limits(row_timeout=60.0)
    before = shmem_bytes()
    outcome = run_rows(source, "keeps.py", ["x", "mib"], [(0, [0, mib])], limits)
    assert outcome.results[0].succeeded, outcome.results[0]
    held = shmem_bytes() - before
    child = executor.shared_pool().warm()[(None, source, "keeps.py", limits)]
    return child, held


def test_a_childs_files_are_freed_when_it_ends():
    child, held = keep_files(200)
    # The warm child's /tmp holds them (in the machine's memory) for as long as it lives.
    assert held >= 150 * MIB, f"only {held / MIB:.0f} MiB more in tmpfs"
    assert child.process.poll() is None
    before = shmem_bytes()
    executor.shutdown()
    assert child.process.returncode is not None
    # The kernel frees a tmpfs when the sandbox's last process is gone and its mount
    # namespace with it, a moment later (the last unmount is deferred work).
    freed(before)


def freed(before, at_least=150 * MIB):
    deadline = time.monotonic() + 30
    while before - shmem_bytes() < at_least:
        assert time.monotonic() < deadline, \
            f"only {(before - shmem_bytes()) / MIB:.0f} MiB of tmpfs were freed"
        time.sleep(0.05)


def test_an_idle_warm_child_is_ended_and_its_files_freed(monkeypatch):
    monkeypatch.setattr(pool, "_IDLE_SECONDS", 1.0)
    child, held = keep_files(200)
    assert held >= 150 * MIB
    before = shmem_bytes()
    deadline = time.monotonic() + 60
    while child.process.poll() is None:
        assert time.monotonic() < deadline, "the idle child was not ended"
        time.sleep(0.1)
    assert executor.shared_pool().warm() == {}
    freed(before)


def test_a_memfd_is_bounded_by_the_file_size_limit_not_the_address_space():
    # memfd_create's memory is not mapped, so RLIMIT_AS does not count it; each memfd is a
    # file, so RLIMIT_FSIZE does. What is left open: open_files x file_bytes of them (16 GiB
    # with the defaults), like processes x address space; only a cgroup would bound both.
    probe = ("import os\n"
             "def main(row):\n"
             "    fd = os.memfd_create('m')\n"
             "    block = b'x' * (1 << 20)\n"
             "    written = 0\n"
             "    try:\n"
             "        while written < 128:\n"
             "            os.write(fd, block)\n"
             "            written += 1\n"
             "    except OSError as exc:\n"
             "        return [written, exc.strerror]\n"
             "    return [written, None]\n")
    limits = Limits(row_timeout=60.0, memory_bytes=256 * MIB, file_bytes=32 * MIB)
    outcome = run_rows(probe, "memfd.py", ["x"], [(0, [0])], limits)
    assert json.loads(outcome.results[0].output) == [32, "File too large"]


@pytest.mark.slow
def test_a_project_s_rows_meet_the_bound_through_the_dispatcher(store, cluster_settings):
    data = b"x,target\n0,\n1,/tmp\n2,\n"
    pid = projects.submit_project(
        store, cluster_settings, accounts.local_admin(store), title="fills", script_name="fills.py",
        script_bytes=fixture_bytes("hostile_fills_tmp.py"), dataset_name="d.csv",
        dataset_bytes=data, memory_limit_mb=256)
    view = run_to_end(store, cluster_settings, pid)
    assert (view.rows_succeeded, view.rows_failed) == (2, 1)
    out = io.StringIO()
    export_results(store, accounts.local_admin(store), pid, "json", out)
    assert json.loads(out.getvalue())[1]["error"] == FULL
