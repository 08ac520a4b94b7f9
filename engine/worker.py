"""What a node runs for a batch: the Ray task the dispatcher submits.

This is the only Constellation code that runs on volunteers' machines (shipped to them by
Ray with the ``engine`` package; see ``cluster.connect``). It rebuilds the batch's rows
from the dataset chunks it was sent, runs them through the executor, in the sandbox, and
reports the results with what it learned about the node.
"""

from __future__ import annotations

import json
import pickle
import platform
import time
from typing import Any

from engine.executor import Limits


def run_batch_on_node(source: Any, filename: str, columns: list[str], payload: bytes,
                      limits: Limits) -> bytes:
    """The Ray task: run one batch through the executor on whichever node Ray chose."""
    import ray

    from engine import executor

    context = ray.get_runtime_context()
    limits = Limits(**{**limits.__dict__,
                       "hidden_paths": limits.hidden_paths + (context.get_temp_dir(),)})
    started = time.perf_counter()
    try:
        # Plain tuples pickle about four times faster than named tuples, on both ends;
        # a million rows cross here in a big project. The dispatcher reads them by position.
        outcome = executor.run_rows(source, filename, columns, batch_rows(*pickle.loads(payload)),
                                    limits, plain=True)
    except executor.SandboxUnavailable as exc:
        # Reported, not raised: the dispatcher must learn which node it was, to avoid it.
        outcome = str(exc)
    seconds = time.perf_counter() - started
    # What this node is, measured here (cached per worker): the registry shows it.
    facts = {"sandbox": executor.sandbox_status(), "python_version": platform.python_version(),
             "ray_version": ray.__version__}
    return pickle.dumps((context.get_node_id(), outcome, seconds, facts),
                        protocol=pickle.HIGHEST_PROTOCOL)


def batch_rows(start: int, end: int, wanted: tuple[int, ...] | None,
               parts: list[tuple[int, str | list]]) -> list[tuple[int, list]]:
    """A batch's (row index, values) pairs, rebuilt on the node that runs it.

    ``parts`` are dataset chunks as stored (JSON text, decoded here, which spares the
    dispatcher's single thread the work) or row values the dispatcher already cut out of a
    chunk the batch only partly covers, each with the index of its first row.
    """
    rows: list[tuple[int, list]] = []
    for first, part in parts:
        values = json.loads(part) if isinstance(part, str) else part
        lo, hi = max(start, first), min(end, first + len(values))
        rows.extend(zip(range(lo, hi), values[lo - first:hi - first]))
    if wanted is not None:
        keep = set(wanted)
        rows = [row for row in rows if row[0] in keep]
    return rows
