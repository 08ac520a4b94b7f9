"""The trial run: ``main`` on a dataset's first rows before the project fans out.

It goes through ``engine.node.executor.run_rows``, the same sandboxed path a cluster batch
takes, with the same limits, so what a researcher sees here is what the nodes will do.
Nothing is stored.

Trials run in the portal's process, several at once (one per browser session that clicks
"Trial run"). Each gets a sandboxed child of its own, with a sandbox uid of its own (so
its own process limit), ended when the trial ends: no trial shares a child, its pipes or
its memory with another. A trial whose browser session went away is ended at once with
``close(session_key)``, which ``trial_run`` also calls by itself when it is given a
``session_alive`` check that turns false.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Callable

from engine.accounts import Role, require_role
from engine.dataset import Dataset
from engine.node import executor
from engine.node.executor import Limits, run_rows
from engine.models import User
from engine.script import Script
from engine.settings import Settings
from engine.store import Store

logger = logging.getLogger(__name__)

TRIAL_ROWS = 5
_WATCH_SECONDS = 0.5  # how often a running trial asks whether its session is still there


@dataclass(frozen=True)
class TrialRow:
    row: int
    succeeded: bool
    output: object
    error: str | None
    traceback: str | None
    seconds: float


@dataclass(frozen=True)
class TrialRun:
    rows: list[TrialRow]
    script_error: str | None
    script_traceback: str | None
    seconds_per_row: float | None
    cpus: int
    estimated_seconds: float | None


def trial_run(store: Store, settings: Settings, actor: User, script: Script, dataset: Dataset,
              *, rows: int = TRIAL_ROWS, row_timeout: float | None = None,
              session_key: str | None = None,
              session_alive: Callable[[], bool] | None = None) -> TrialRun:
    """Run ``main`` on the first ``rows`` rows, one at a time, timing each.

    The estimate is the median row time times the number of rows, spread over the
    cluster's CPUs (as last reported by the dispatcher, else this machine's).
    The first row also pays for starting the sandbox, hence the median.

    ``session_key`` names the browser session the trial runs for: ``close(session_key)``
    ends it (and a new trial of the same session ends the one before). With
    ``session_alive`` (a thread-safe check, such as Streamlit's
    ``Runtime.is_active_session``), the trial watches it and closes itself when it turns
    false. A closed trial returns the rows done so far.
    """
    require_role(actor, Role.RESEARCHER)
    # The same limits the cluster applies (settings, capped by the admin maxima).
    limits = Limits.from_settings(settings, hidden_paths=(str(settings.data_path),),
                                  row_timeout=row_timeout or settings.row_timeout)
    done: list[TrialRow] = []
    with executor.private_pool() as pool:
        _open(session_key, pool, session_alive)
        try:
            for index in range(min(rows, len(dataset))):
                if pool.killed:
                    break
                started = time.monotonic()
                try:
                    outcome = run_rows(script.source, script.name, dataset.columns,
                                       [(index, dataset.rows[index])], limits, pool=pool)
                except executor.SandboxUnavailable:
                    if pool.killed:
                        break  # closed while its sandbox was starting
                    raise
                seconds = time.monotonic() - started
                if pool.killed:
                    break  # what came back is the end its closing made
                if outcome.script_error is not None:
                    return TrialRun(rows=[], script_error=outcome.script_error,
                                    script_traceback=outcome.script_traceback,
                                    seconds_per_row=None, cpus=0, estimated_seconds=None)
                for result in outcome.results:
                    output = json.loads(result.output) if result.output is not None else None
                    done.append(TrialRow(row=result.row_index, succeeded=result.succeeded,
                                         output=output, error=result.error,
                                         traceback=result.traceback, seconds=seconds))
        finally:
            _forget(session_key, pool)
    if pool.killed:
        logger.info("trial %s: closed with its session after %d rows", script.name, len(done))
    per_row = statistics.median(r.seconds for r in done) if done else None
    cpus = cluster_cpus(store, settings)
    estimate = per_row * len(dataset) / cpus if per_row is not None else None
    logger.info("trial %s: %d rows by %s, %.4f s per row", script.name, len(done), actor.name,
                per_row or 0.0)
    return TrialRun(rows=done, script_error=None, script_traceback=None, seconds_per_row=per_row,
                    cpus=cpus, estimated_seconds=estimate)


def cluster_cpus(store: Store, settings: Settings) -> int:
    """CPUs the cluster offers, as the dispatcher last reported; else the local head's."""
    reported = store.cluster_health()["cpus"]
    if reported:
        return max(1, int(reported))
    return max(1, settings.ray_num_cpus or os.cpu_count() or 1)


# -- trials by browser session -----------------------------------------------------------

_sessions_lock = threading.Lock()
_sessions: dict[str, executor.Pool] = {}


def running_pool(session_key: str) -> executor.Pool | None:
    """The pool of the trial running for ``session_key``, if one is."""
    with _sessions_lock:
        return _sessions.get(session_key)


def close(session_key: str) -> bool:
    """End the trial running for ``session_key``, if any, now: its sandboxed child is killed
    and ``trial_run`` returns the rows done so far. Safe from any thread; returns whether a
    trial was running."""
    with _sessions_lock:
        pool = _sessions.pop(session_key, None)
    if pool is None:
        return False
    pool.kill()
    logger.info("trial of session %s: closed", session_key)
    return True


def _open(session_key: str | None, pool: executor.Pool,
          session_alive: Callable[[], bool] | None) -> None:
    if session_key is None:
        return
    with _sessions_lock:
        previous, _sessions[session_key] = _sessions.get(session_key), pool
    if previous is not None:
        previous.kill()  # one trial per session: the newer one wins
    if session_alive is not None:
        threading.Thread(target=_watch, args=(session_key, pool, session_alive), daemon=True,
                         name=f"trial-watch-{session_key}").start()


def _forget(session_key: str | None, pool: executor.Pool) -> None:
    if session_key is None:
        return
    with _sessions_lock:
        if _sessions.get(session_key) is pool:
            del _sessions[session_key]


def _watch(session_key: str, pool: executor.Pool, session_alive: Callable[[], bool]) -> None:
    while True:
        with _sessions_lock:
            if _sessions.get(session_key) is not pool:
                return  # the trial ended, or a newer one of the session replaced it
        if not session_alive():
            with _sessions_lock:
                if _sessions.get(session_key) is pool:
                    del _sessions[session_key]
            pool.kill()
            logger.info("trial of session %s: its session ended, trial closed", session_key)
            return
        time.sleep(_WATCH_SECONDS)
