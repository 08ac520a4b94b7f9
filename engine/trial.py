"""The trial run: ``main`` on a dataset's first rows before the project fans out.

It goes through ``engine.executor.run_rows``, the same sandboxed path a cluster batch
takes, with the same limits, so what a researcher sees here is what the nodes will do.
Nothing is stored.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from dataclasses import dataclass

from engine.accounts import Role, require_role
from engine.dataset import Dataset
from engine.node.executor import Limits, run_rows
from engine.models import User
from engine.script import Script
from engine.settings import Settings
from engine.store import Store

logger = logging.getLogger(__name__)

TRIAL_ROWS = 5


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
              *, rows: int = TRIAL_ROWS, row_timeout: float | None = None) -> TrialRun:
    """Run ``main`` on the first ``rows`` rows, one at a time, timing each.

    The estimate is the median row time times the number of rows, spread over the
    cluster's CPUs (as last reported by the dispatcher, else this machine's).
    The first row also pays for starting the sandbox, hence the median.
    """
    require_role(actor, Role.RESEARCHER)
    # The same limits the cluster applies (settings, capped by the admin maxima).
    limits = Limits.from_settings(settings, hidden_paths=(str(settings.data_path),),
                                  row_timeout=row_timeout or settings.row_timeout)
    done: list[TrialRow] = []
    for index in range(min(rows, len(dataset))):
        started = time.monotonic()
        outcome = run_rows(script.source, script.name, dataset.columns,
                           [(index, dataset.rows[index])], limits)
        seconds = time.monotonic() - started
        if outcome.script_error is not None:
            return TrialRun(rows=[], script_error=outcome.script_error,
                            script_traceback=outcome.script_traceback, seconds_per_row=None,
                            cpus=0, estimated_seconds=None)
        for result in outcome.results:
            output = json.loads(result.output) if result.output is not None else None
            done.append(TrialRow(row=result.row_index, succeeded=result.succeeded,
                                 output=output, error=result.error,
                                 traceback=result.traceback, seconds=seconds))
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
