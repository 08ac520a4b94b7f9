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
from engine.settings import Settings
from engine.store import Store

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent


class Supervisor:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._stopping = False

    def _spawn(self, argv: list[str]) -> subprocess.Popen:
        return subprocess.Popen(argv, cwd=ROOT, start_new_session=True)

    def run(self) -> int:
        Store(self.settings)  # creates the database and its schema
        cluster.cluster_token(self.settings)
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        head = cluster.ensure_head(self.settings)
        dispatcher = self._spawn([sys.executable, "-m", "engine", "dispatcher"])
        portal = self._spawn([
            sys.executable, "-m", "streamlit", "run", str(ROOT / "streamlit_app.py"),
            "--server.port", str(self.settings.portal_port), "--server.headless", "true",
            "--browser.gatherUsageStats", "false"])
        logger.info("supervisor: portal on http://localhost:%s", self.settings.portal_port)
        restarts = 0
        try:
            while not self._stopping:
                time.sleep(0.5)
                if portal.poll() is not None:
                    logger.error("supervisor: the portal exited (code %s); stopping", portal.returncode)
                    return 1
                if dispatcher.poll() is not None and not self._stopping:
                    restarts += 1
                    logger.warning("supervisor: dispatcher exited (code %s); restarting (%d)",
                                   dispatcher.returncode, restarts)
                    if head is not None and not head.alive():
                        head = cluster.ensure_head(self.settings)
                    time.sleep(min(30, 2 ** min(restarts, 5)))
                    dispatcher = self._spawn([sys.executable, "-m", "engine", "dispatcher"])
            return 0
        finally:
            for process in (portal, dispatcher):
                _stop_group(process)
            if head is not None:
                head.stop()

    def _stop(self, signum, _frame) -> None:
        logger.info("supervisor: received %s; stopping", signal.Signals(signum).name)
        self._stopping = True


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
