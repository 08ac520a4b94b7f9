"""``python -m engine serve``: the long-lived processes behind ``make run``.

The supervisor starts the local Ray head, the dispatcher and the Streamlit portal as
separate processes, restarts the dispatcher if it dies, and stops all of them (by
process group) when it is stopped. It never connects to Ray itself, so a dead head
cannot take it down: Ray kills a driver ~60 s after losing the head, and only the
dispatcher process is a driver.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from engine import cluster
from engine.errors import ClusterUnavailable
from engine.settings import Settings
from engine.store import Store

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent


class Supervisor:
    def __init__(self, settings: Settings, *, portal: bool = True):
        self.settings = settings
        self.portal = portal
        self._stopping = False

    def _spawn(self, argv: list[str]) -> subprocess.Popen:
        # Die with the supervisor even if it is killed with SIGKILL: no orphaned portal
        # or dispatcher may keep the port or the lease.
        return subprocess.Popen(argv, cwd=ROOT, start_new_session=True,
                                preexec_fn=_die_with_parent)

    def _start_dispatcher(self) -> subprocess.Popen:
        return self._spawn([sys.executable, "-m", "engine", "dispatcher"])

    def run(self) -> int:
        Store(self.settings)  # creates the database and its schema
        cluster.cluster_token(self.settings)
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        head = self._head()
        token = cluster.cluster_token(self.settings)
        dispatcher = self._start_dispatcher()
        portal = None
        if self.portal:
            portal = self._spawn([
                sys.executable, "-m", "streamlit", "run", str(ROOT / "streamlit_app.py"),
                "--server.port", str(self.settings.portal_port), "--server.headless", "true",
                # Naming the address stops Streamlit from asking an outside service for this
                # machine's public IP at start-up (the portal makes no outside requests).
                "--browser.serverAddress", self.settings.reachable_host,
                "--browser.gatherUsageStats", "false"])
            logger.info("supervisor: portal on http://localhost:%s", self.settings.portal_port)
        restarts = 0
        try:
            while not self._stopping:
                time.sleep(0.5)
                if portal is not None and portal.poll() is not None:
                    logger.error("supervisor: the portal exited (code %s); stopping", portal.returncode)
                    return 1
                if cluster.cluster_token(self.settings) != token:
                    # rotate-cluster-token: Ray reads the token only when it starts.
                    token = cluster.cluster_token(self.settings)
                    logger.warning("supervisor: the cluster token changed; restarting the Ray "
                                   "head and the dispatcher")
                    _stop_group(dispatcher)
                    if head is not None:
                        head.stop(grace=2)
                        head = None
                    head = self._head()
                    dispatcher = self._start_dispatcher()
                    continue
                if head is not None and not head.alive():
                    logger.error("supervisor: the Ray head exited (code %s)", head.process.returncode)
                    head.stop(grace=1)
                    head = None
                if head is None and not cluster.head_reachable(self.settings):
                    head = self._head()
                if dispatcher.poll() is not None and not self._stopping:
                    if not cluster.head_reachable(self.settings):
                        continue  # restart it once there is a head to drive
                    restarts += 1
                    logger.warning("supervisor: dispatcher exited (code %s); restarting (%d)",
                                   dispatcher.returncode, restarts)
                    time.sleep(min(5, restarts))
                    dispatcher = self._start_dispatcher()
            return 0
        finally:
            for process in (portal, dispatcher):
                if process is not None:
                    _stop_group(process)
            if head is not None:
                head.stop()

    def _head(self) -> cluster.LocalHead | None:
        """Start the local head if the policy allows; None when waiting for an operator's head."""
        if cluster.head_reachable(self.settings):
            return None
        if self.settings.head_policy != "restart" or self.settings.ray_address:
            logger.warning("supervisor: no Ray head at %s; waiting for one (head_policy=%s)",
                           cluster.head_address(self.settings), self.settings.head_policy)
            return None
        try:
            return cluster.LocalHead(self.settings)
        except ClusterUnavailable as exc:
            logger.error("supervisor: %s; retrying", exc)
            return None

    def _stop(self, signum, _frame) -> None:
        logger.info("supervisor: received %s; stopping", signal.Signals(signum).name)
        self._stopping = True


def _die_with_parent() -> None:
    import ctypes

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _stop_group(process: subprocess.Popen, grace: float = 10.0) -> None:
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=grace)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
