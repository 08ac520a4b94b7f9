"""The Ray cluster: the cluster token, the local head, and connecting as a driver.

Ray 2.60 uses token authentication. Every process that joins or connects with an
explicit address needs ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN``; with the token
but not the mode a join fails after ~20 s. The token is generated once into the data
directory (mode 0600) and is never logged.

The local head runs as ``ray start --head --block`` in its own process group, so the
engine can stop exactly the processes it started (never ``ray stop``, which would also
stop other clusters on the machine). It is tethered to the process that started it
(``engine.tether``): when that process dies, even by SIGKILL, the head goes with it.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from engine import confinement
from engine.errors import ClusterUnavailable
from engine.keys import data_secret, replace_secret
from engine.settings import Settings

logger = logging.getLogger(__name__)

_HEAD_START_SECONDS = 60.0
_TETHER = Path(__file__).with_name("tether.py")
_AGENT_TIMEOUT_MS = 120_000


def cluster_token(settings: Settings) -> str:
    """The cluster's auth token, created on first use."""
    return data_secret(settings, "cluster_token")


def rotate_cluster_token(settings: Settings) -> None:
    """Replace the cluster token. Ray reads it only when a process starts, so the head must
    restart with it (``engine serve`` does so within a second, see ``Supervisor``), and
    every node must join again with the new join command; the old one no longer joins."""
    replace_secret(settings, "cluster_token")
    logger.warning("cluster: the cluster token was replaced; nodes must join again")


def auth_env(settings: Settings) -> dict[str, str]:
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": cluster_token(settings)}


# Where each of a node's Ray ports sits in its range (FIRST-LAST); workers take the rest.
_PORT_LAYOUT = (("node-manager-port", 0), ("object-manager-port", 1),
                ("runtime-env-agent-port", 2), ("dashboard-agent-grpc-port", 3),
                ("dashboard-agent-listen-port", 4), ("metrics-export-port", 5))
_FIRST_WORKER_PORT = 10
_MIN_PORTS = 110


def port_range(text: str) -> tuple[int, int] | None:
    """``"20000-20299"`` as (20000, 20299); None when empty. Raises ValueError otherwise."""
    if not text.strip():
        return None
    first, _, last = text.partition("-")
    low, high = int(first), int(last)
    if not (0 < low and high <= 65535 and high - low + 1 >= _MIN_PORTS):
        raise ValueError(f"a port range must be FIRST-LAST with at least {_MIN_PORTS} ports, "
                         f"not {text!r}")
    return low, high


def port_options(text: str) -> list[str]:
    """``ray start`` options that keep a node's every port inside the range ``text``."""
    ports = port_range(text)
    if ports is None:
        return []
    low, high = ports
    return ([f"--{option}={low + offset}" for option, offset in _PORT_LAYOUT]
            + [f"--min-worker-port={low + _FIRST_WORKER_PORT}", f"--max-worker-port={high}"])


def head_address(settings: Settings) -> str:
    return settings.ray_address or f"{settings.reachable_host}:{settings.ray_port}"


def head_reachable(settings: Settings, timeout: float = 1.0) -> bool:
    host, _, port = head_address(settings).rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def ray_temp_dir(settings: Settings) -> Path:
    """A new session directory for each start of the head (see engine.confinement): what
    a task wrote into the last one is never read again. Earlier ones are removed."""
    for old in (p for p in settings.data_path.glob("ray-*") if p.is_dir()):
        shutil.rmtree(old, ignore_errors=True)
    return settings.data_path / f"ray-{secrets.token_hex(4)}"


class LocalHead:
    """A Ray head started by this process; ``stop()`` ends it and everything it started."""

    def __init__(self, settings: Settings):
        self.settings = settings
        temp_dir = ray_temp_dir(settings)
        settings.data_path.mkdir(parents=True, exist_ok=True)
        confinement.prepare_temp_dir(temp_dir)
        argv = [*confinement.head_prefix(settings, temp_dir),
                str(Path(sys.executable).parent / "ray"), "start", "--head", "--block",
                f"--port={settings.ray_port}", f"--temp-dir={temp_dir}",
                f"--node-ip-address={settings.reachable_host}",
                "--include-dashboard=false", "--disable-usage-stats",
                "--labels=constellation-role=head", *port_options(settings.head_ports)]
        if settings.ray_num_cpus is not None:
            argv.append(f"--num-cpus={settings.ray_num_cpus}")
        log_path = settings.data_path / "ray-head.log"
        self._log = open(log_path, "ab")
        env = {**os.environ, **auth_env(settings),
               # The raylet gives its Python agents a few seconds to come up and dies after; on a busy
               # machine (or one that is compiling bytecode it cannot cache, as the confined
               # head cannot) they take longer (measured: 18 s at a load average of 14).
               "RAY_agent_register_timeout_ms": str(_AGENT_TIMEOUT_MS)}
        logger.info("cluster: starting a local Ray head on port %s", settings.ray_port)
        started = time.monotonic()
        # The tether holds the head to this process (see engine.tether); only we hold the
        # pipe's other end, and -I keeps engine/ off the tether's sys.path.
        self.process = subprocess.Popen([sys.executable, "-I", str(_TETHER), *argv],
                                        stdin=subprocess.PIPE, stdout=self._log,
                                        stderr=subprocess.STDOUT, env=env, start_new_session=True)
        while not head_reachable(settings, timeout=0.5):
            if self.process.poll() is not None:
                self._log.close()
                raise ClusterUnavailable(
                    f"the Ray head exited during start-up (code {self.process.returncode}); "
                    f"see {log_path}")
            if time.monotonic() - started > _HEAD_START_SECONDS:
                self.stop()
                raise ClusterUnavailable(f"the Ray head did not start in {_HEAD_START_SECONDS:.0f} s")
            time.sleep(0.2)
        self.startup_seconds = time.monotonic() - started
        logger.info("cluster: Ray head up in %.1f s (pid %s)", self.startup_seconds, self.process.pid)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, grace: float = 5.0) -> None:
        """Stop the head's process group: SIGTERM, then SIGKILL after ``grace`` seconds."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        self.process.stdin.close()
        self._log.close()
        logger.info("cluster: Ray head (pid %s) stopped", self.process.pid)


def ensure_head(settings: Settings) -> LocalHead | None:
    """Start a local head unless one is reachable; returns the head it started, if any."""
    if head_reachable(settings):
        return None
    if settings.ray_address:
        raise ClusterUnavailable(f"the Ray head at {settings.ray_address} cannot be reached")
    return LocalHead(settings)


def connect(settings: Settings) -> None:
    """Connect this process to the cluster as a Ray driver (idempotent).

    Ray reads ``RAY_AUTH_MODE`` and ``RAY_AUTH_TOKEN`` when it is first imported (measured:
    setting them after ``import ray`` fails with InvalidAuthToken), so the variables are
    set here, before the import, and a process that imported Ray earlier with another
    token gets a clear error instead of a 20 s hang.
    """
    env = auth_env(settings)
    if "ray" in sys.modules and os.environ.get("RAY_AUTH_TOKEN") != env["RAY_AUTH_TOKEN"]:
        raise ClusterUnavailable(
            "Ray was imported before the cluster token was set; set RAY_AUTH_MODE and "
            "RAY_AUTH_TOKEN (or call engine.cluster.connect) before importing ray")
    os.environ.update(env)
    import ray
    import ray.cloudpickle

    import engine
    from engine.node import entry

    # The functions a node runs travel by value, so that a node which cannot import the
    # engine still runs them and says why (see engine.node.entry).
    ray.cloudpickle.register_pickle_by_value(entry)
    if ray.is_initialized():
        return
    try:
        ray.init(
            address=head_address(settings),
            # Volunteer nodes do not have the engine installed: ship the package with the
            # job. Only engine.node is ever imported there (stdlib and Ray only).
            runtime_env={"py_modules": [str(Path(engine.__file__).parent)]},
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
    except ConnectionError as exc:
        raise ClusterUnavailable(
            f"cannot connect to the Ray head at {head_address(settings)}: {exc}") from None
