"""The join command's confinement (engine.confinement.node_argv), run for real with bubblewrap.

No cluster here: the volunteer's venv is a directory whose ``bin/ray`` is a shell script
that reports what it sees from inside, so what the node's Ray would reach is measured in
a second. The multi-node tests (test_rogue_driver, test_isolation_cluster) run the same
command with the real Ray.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from engine import confinement
from support.volunteer_env import BASE, give_to, node_uid

# Stands in for Ray: reports what a process started by `ray start` sees, then leaves a
# process behind (as a task could) and returns, as `ray start` without --block does.
FAKE_RAY = """#!/bin/sh
echo "args: $*"
echo "uid: $(id -u)"
cat "$HOME/private-notes.txt" >/dev/null 2>&1 && echo "home: visible" || echo "home: absent"
echo "var/tmp: $(ls -A /var/tmp)"
touch /usr/planted 2>/dev/null && echo "usr: writable" || echo "usr: read-only"
echo "processes: $(ls -d /proc/[0-9]* | wc -l)"
echo "init: $(cat /proc/1/comm)"
echo "venv: $(test -x "$VIRTUAL_ENV/bin/ray" && echo visible)"
"""


@pytest.fixture
def volunteer():
    """A volunteer's home with something private in it, and a venv whose ray is FAKE_RAY
    (under /var/tmp, outside /tmp and the repository, as the clean volunteer venv is)."""
    BASE.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="confine-", dir=BASE))
    os.chmod(root, 0o755)
    home, venv = root / "home", root / "venv"
    (venv / "bin").mkdir(parents=True)
    home.mkdir()
    (home / "private-notes.txt").write_text("the volunteer's own")
    (venv / "bin" / "ray").write_text(FAKE_RAY)
    (venv / "bin" / "ray").chmod(0o755)
    uid = node_uid("confined")
    give_to(home, uid)
    yield home, venv, uid
    shutil.rmtree(root, ignore_errors=True)


def run_join(command: str, home: Path, venv: Path, uid: int | None) -> subprocess.CompletedProcess:
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(home), "VIRTUAL_ENV": str(venv),
           "LANG": "C.UTF-8"}
    user = {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}
    return subprocess.run(["/bin/bash", "-c", command], cwd=home, env=env, capture_output=True,
                          text=True, timeout=60, **user)


def report(done: subprocess.CompletedProcess) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line)


def test_the_node_sees_the_system_and_its_venv_and_nothing_of_the_volunteers(volunteer):
    home, venv, uid = volunteer
    command = confinement.node_command({"RAY_AUTH_MODE": "token"}, ["--address=192.0.2.1:6379"])
    done = run_join(command + " --num-cpus=2", home, venv, uid)
    assert done.returncode == 0, done.stderr
    seen = report(done)
    # Options appended to the command reach ray start, after the command's own.
    assert seen["args"] == "start --address=192.0.2.1:6379 --num-cpus=2"
    assert (seen["home"], seen["usr"]) == ("absent", "read-only")
    # /var/tmp holds only the way to the venv (bubblewrap made its mount point), empty.
    assert seen["var/tmp"] == venv.relative_to("/var/tmp").parts[0]
    assert seen["venv"] == "visible"  # "$VIRTUAL_ENV" is the volunteer's shell's, expanded
    # Its own PID namespace, whose init is bubblewrap: none of the machine's processes
    # (init, the watching shell, this script and its pipeline's few).
    assert seen["init"] == "bwrap" and int(seen["processes"]) <= 8, seen


def test_the_node_refuses_to_run_as_root(volunteer):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    home, venv, _ = volunteer
    command = confinement.node_command({}, ["--address=192.0.2.1:6379"])
    done = run_join(command, home, venv, None)
    assert done.returncode == 1
    assert "run this as your own user, not as root" in done.stderr
    assert "args:" not in done.stdout  # ray start never ran


def test_the_venv_is_the_volunteers_shell_variable_not_a_path_of_ours():
    command = confinement.node_command({}, [])
    assert '--ro-bind-try "$VIRTUAL_ENV" "$VIRTUAL_ENV"' in command
    words = shlex.split(command)
    assert words[:5] == ["bwrap", "--die-with-parent", "--unshare-user", "--unshare-pid",
                         "--unshare-ipc"]
    assert "/home" not in words and "/var" not in words and "/" not in words
