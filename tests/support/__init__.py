"""Plain helpers for every layer of the tests: paths, ports, temporary directories, the
session's cluster token, the CLI as a subprocess, and projects run to their end.

Fixtures live in the ``conftest.py`` files (``tests/conftest.py`` for those of several
layers); this package holds only functions and constants, imported by name
(``from support import ROOT``). ``pytest.ini`` puts ``tests/`` on ``sys.path``
(``pythonpath = tests``), so every layer's folder imports it the same way, once.

Ray reads RAY_AUTH_MODE / RAY_AUTH_TOKEN when it is first imported, so the session's
token is put in the environment here, when ``tests/conftest.py`` first imports this
package, before any test imports Ray. Every test data directory gets the same token
file, so every test can reach the session's head.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

TESTS = Path(__file__).resolve().parent.parent
ROOT = TESTS.parent
FIXTURES = TESTS / "fixtures"
SHARED_DATA = ROOT.parent / "shared" / "data"

SESSION_TOKEN = secrets.token_hex(32)
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = SESSION_TOKEN

from engine.settings import Settings  # noqa: E402
from engine.store import Store  # noqa: E402


# Heads in tests let Ray choose their ports: several run on this machine at once, and a
# fixed range (head_ports, which production pins for firewalls) would collide.
TEST_HEAD_PORTS = ""


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: every socket stays bound until all are chosen.

    Closing each socket before binding the next lets the kernel hand the same port out
    twice, and Ray refuses a node whose components share a port.
    """
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("", 0))
        return [sock.getsockname()[1] for sock in sockets]


@contextlib.contextmanager
def small_disk(prefix: str, size: str = "8m") -> Iterator[Path]:
    """A real tmpfs of ``size``, holding the session's token, for a store that runs out of
    room; mounting needs root (CI runs as root), so the test is skipped otherwise."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    mount_point = short_tempdir(prefix)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)],
                   check=True)
    try:
        write_token(mount_point)
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
        mount_point.rmdir()


def fill_disk(mount_point: Path) -> Path:
    """Fill the (small, test-made) filesystem at ``mount_point``; returns the filler file,
    for the test to remove."""
    filler = mount_point / "filler"
    # Unbuffered: a buffered file would raise ENOSPC again when it is closed.
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def short_tempdir(prefix: str) -> Path:
    # Ray's unix socket paths must stay under 107 characters: keep temp dirs short.
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def write_token(data_dir: Path, token: str = SESSION_TOKEN) -> None:
    secrets_dir = data_dir / "secrets"
    secrets_dir.mkdir(parents=True, exist_ok=True)
    (secrets_dir / "cluster_token").write_text(token)


def on_backend(request, data_dir: Path, **overrides) -> Settings:
    """Settings whose store is the backend a test is parametrized with: ``"sqlite"`` (a file
    in ``data_dir``) or ``"postgresql"`` (a new database on the session's real server)."""
    base = Settings(data_dir=str(data_dir), row_timeout=10.0, replication=1).replace(**overrides)
    if request.param == "postgresql":
        base = base.replace(db_url=request.getfixturevalue("postgres_server").create_database())
    return base


def fixture_bytes(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def engine_env(settings: Settings) -> dict[str, str]:
    """Environment for a CLI subprocess working on ``settings``' data."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "CONSTELLATION_"))}
    env.update({"CONSTELLATION_DATA_DIR": settings.data_dir,
                "CONSTELLATION_RAY_PORT": str(settings.ray_port),
                "CONSTELLATION_REPLICATION": str(settings.replication),
                "CONSTELLATION_HEAD_PORTS": settings.head_ports,
                "PYTHONPATH": str(ROOT)})
    if settings.ray_num_cpus:
        env["CONSTELLATION_RAY_NUM_CPUS"] = str(settings.ray_num_cpus)
    return env


def cli(settings: Settings, *args, check=False, timeout=300) -> subprocess.CompletedProcess:
    """``python -m engine ARGS`` as a user runs it, on ``settings``' data."""
    return subprocess.run([python(), "-m", "engine", *map(str, args)], env=engine_env(settings),
                          capture_output=True, text=True, timeout=timeout, check=check)


def stop_serve(serve, grace: float = 60.0) -> None:
    """Stop an `engine serve` started in its own session: SIGTERM (it stops what it
    started), then SIGKILL to its process group after ``grace`` seconds."""
    import signal

    os.killpg(serve.pid, signal.SIGTERM)
    try:
        serve.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(serve.pid, signal.SIGKILL)
        serve.wait()


def python() -> str:
    return sys.executable


def submit_numbers(store: Store, settings: Settings, script: str, n: int, *,
                   source: bytes | None = None, **options) -> int:
    """Submit ``script`` (a file in tests/fixtures, or ``source``) over a CSV of x = 0..n-1."""
    from engine import accounts, projects

    data = b"x\n" + b"".join(b"%d\n" % i for i in range(n))
    return projects.submit_project(
        store, settings, accounts.local_admin(store), title=script, script_name=script,
        script_bytes=source if source is not None else fixture_bytes(script),
        dataset_name="d.csv", dataset_bytes=data, **options)


def project_ended(store: Store, project_id: int) -> bool:
    from engine.models import Project
    from engine.status import ProjectStatus

    with store.session() as session:
        return ProjectStatus(session.get(Project, project_id).status).is_terminal()


def run_to_end(store: Store, settings: Settings, project_id: int, timeout: float = 180):
    """Run a dispatcher in this process until the project ends; returns its status view."""
    import time

    from engine import accounts, projects
    from engine.scheduler import Dispatcher

    deadline = time.monotonic() + timeout

    def ended() -> bool:
        assert time.monotonic() < deadline, "the project did not end in time"
        return project_ended(store, project_id)

    Dispatcher(store, settings).run(until=ended)
    return projects.project_status(store, accounts.local_admin(store), project_id)


def live_uids() -> dict[int, int]:
    """pid -> uid of every live (not zombie) process, read from /proc."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as status:
                fields = dict(line.split(":", 1) for line in status if ":" in line)
        except OSError:
            continue
        if fields["State"].split()[0] != "Z":
            found[int(pid)] = int(fields["Uid"].split()[0])
    return found
