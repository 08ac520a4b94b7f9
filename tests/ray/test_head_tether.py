"""A local Ray head never outlives the process that started it (engine.tether).

Seen for real: a ``submit --wait`` killed while its own head ran left that head (``ray
start --block``, the GCS, the raylet) running in its own process group, holding its port,
until someone found it by PID. Parent-death signals reach one child only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from support import FIXTURES, ROOT, engine_env, free_port, python

TETHER = ROOT / "engine" / "tether.py"


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # pgrp; zombies hold nothing
            members.append(int(entry.name))
    return members


def _wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if text.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_a_killed_owner_takes_the_tethered_group_with_it(tmp_path):
    """The owner is SIGKILLed (no handler runs); the tethered command's grandchildren, which
    no parent-death signal reaches, are ended with it."""
    owner_code = textwrap.dedent(f"""
        import subprocess, sys, time
        tether = subprocess.Popen([sys.executable, "-I", {str(TETHER)!r}, "sh", "-c",
                                   "sleep 300 & sleep 300 & wait"],
                                  stdin=subprocess.PIPE, start_new_session=True)
        print(tether.pid, flush=True)
        time.sleep(300)
    """)
    owner = subprocess.Popen([sys.executable, "-c", owner_code], stdout=subprocess.PIPE, text=True)
    pgid = int(owner.stdout.readline())
    try:
        assert _wait_until(lambda: len(_group_members(pgid)) >= 4, 10)  # tether, sh, 2 sleeps
        owner.kill()
        owner.wait()
        assert _wait_until(lambda: not _group_members(pgid), 30), _group_members(pgid)
    finally:
        owner.kill()
        if _group_members(pgid):
            os.killpg(pgid, signal.SIGKILL)


def test_the_tether_passes_on_its_commands_exit_code():
    tether = subprocess.Popen([sys.executable, "-I", str(TETHER), "sh", "-c", "exit 7"],
                              stdin=subprocess.PIPE, start_new_session=True)
    try:
        assert tether.wait(timeout=30) == 7
    finally:
        tether.stdin.close()


def test_the_tether_refuses_to_end_a_group_it_does_not_lead():
    """It would otherwise end its starter's whole group (a shell, a test run) with it."""
    done = subprocess.run([sys.executable, "-I", str(TETHER), "true"], stdin=subprocess.PIPE,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "must lead its own process group" in done.stderr


@pytest.mark.slow
def test_a_killed_submit_wait_leaves_no_head_behind(settings, tmp_path):
    """``submit --wait`` starts its own head (none runs on this port), and is SIGKILLed
    while the project runs: the head's port closes and none of its processes is left."""
    settings = settings.replace(ray_port=free_port(), ray_num_cpus=1)
    dataset = tmp_path / "d.csv"
    dataset.write_text("x\n" + "".join(f"{i}\n" for i in range(2_000)))
    from engine.cluster import head_reachable

    submit = subprocess.Popen([python(), "-m", "engine", "submit", str(FIXTURES / "slow.py"),
                               str(dataset), "--wait"], env=engine_env(settings),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        assert _wait_until(lambda: head_reachable(settings, timeout=0.5), 120), \
            "the CLI's own head never came up"
        assert _processes_mentioning(settings.data_dir)  # the head's processes, by their paths
        os.kill(submit.pid, signal.SIGKILL)
        submit.wait()
        assert _wait_until(lambda: not head_reachable(settings, timeout=0.5), 30), \
            "the head still answers after its owner was killed"
        assert _wait_until(lambda: not _processes_mentioning(settings.data_dir), 30), \
            _processes_mentioning(settings.data_dir)
    finally:
        for pid in _processes_mentioning(settings.data_dir):
            try:
                os.killpg(os.getpgid(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
