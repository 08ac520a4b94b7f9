"""`python -m engine serve` on free ports for end-to-end tests, stopped by its process group."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from support import ROOT, free_ports, python


@dataclass
class ServedPortal:
    url: str
    port: int
    env: dict[str, str]
    data_dir: Path
    log: Path
    pid: int


@contextmanager
def served_portal(data_dir: Path, startup_seconds: float = 120) -> Iterator[ServedPortal]:
    """The whole stack (Ray head, dispatcher, portal) in ``data_dir``, until the portal answers."""
    port, ray_port = free_ports(2)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "CONSTELLATION_"))}
    env.update({"CONSTELLATION_DATA_DIR": str(data_dir), "CONSTELLATION_RAY_PORT": str(ray_port),
                "CONSTELLATION_PORTAL_PORT": str(port), "CONSTELLATION_RAY_NUM_CPUS": "2",
                # One machine: a row cannot be replicated on two distinct volunteers here.
                "CONSTELLATION_REPLICATION": "1", "CONSTELLATION_HEAD_PORTS": "",
                "PYTHONPATH": str(ROOT)})
    log_path = data_dir / "serve.log"
    log = open(log_path, "wb")
    server = subprocess.Popen([python(), "-m", "engine", "serve"], cwd=ROOT, env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_seconds
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass  # not listening yet
            assert server.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, \
                f"the portal did not answer within {startup_seconds:.0f} s"
            time.sleep(0.5)
        yield ServedPortal(url, port, env, data_dir, log_path, server.pid)
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        except ProcessLookupError:
            pass
        log.close()
