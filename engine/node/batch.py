"""A batch on a node: rebuild its rows from the dataset chunks it was sent, run them
through the executor, in the sandbox, and report what came back (``BatchReport``).

Called by ``entry.run_batch`` and ``entry.check_node`` inside a Ray worker.
"""

from __future__ import annotations

import json
import pickle
import platform
import time
from typing import Any

from engine.node import executor
from engine.node.result import BatchFailure, BatchReport, FailureKind
from engine.node.sandbox import Limits

# What the node check runs: one row through a real sandboxed child, and its answer.
_CHECK_SCRIPT = "def main(row):\n    return row['x'] + 1\n"
_CHECK_TIMEOUT_SECONDS = 30.0


def run(source: Any, filename: str, columns: list[str], payload: bytes, limits: dict) -> bytes:
    """Run one batch; ``limits`` are ``Limits`` fields (plain values cross to any node)."""
    import ray

    context = ray.get_runtime_context()
    node_limits = _node_limits(Limits(**limits), context)
    started = time.perf_counter()
    report = BatchReport(context.get_node_id())
    try:
        # Plain tuples pickle about four times faster than named tuples, on both ends;
        # a million rows cross here in a big project. The dispatcher reads them by position.
        outcome = executor.run_rows(source, filename, columns, batch_rows(*pickle.loads(payload)),
                                    node_limits, plain=True)
    except executor.SandboxUnavailable as exc:
        report.failure = BatchFailure(FailureKind.SANDBOX_UNAVAILABLE, sandbox_advice(str(exc)))
    else:
        report.results = outcome.results
        if outcome.script_error is not None:
            report.failure = BatchFailure(FailureKind.SCRIPT_IMPORT, outcome.script_error,
                                          outcome.script_traceback)
    report.seconds = time.perf_counter() - started
    report.facts = node_facts()
    return report.encode()


def check() -> bytes:
    """The node check: the sandbox self-test, versions, and one row there and back."""
    import ray

    context = ray.get_runtime_context()
    report = BatchReport(context.get_node_id())
    started = time.perf_counter()
    report.facts = node_facts(refresh=True)
    if report.facts["sandbox"] != "available":
        report.failure = BatchFailure(FailureKind.SANDBOX_UNAVAILABLE,
                                      sandbox_advice(report.facts["sandbox"]))
        return report.encode()
    limits = _node_limits(Limits(row_timeout=_CHECK_TIMEOUT_SECONDS), context)
    try:
        outcome = executor.run_rows(_CHECK_SCRIPT, "node-check.py", ["x"], [(0, [41])], limits,
                                    plain=True, keep_warm=False)
    except executor.SandboxUnavailable as exc:
        report.failure = BatchFailure(FailureKind.SANDBOX_UNAVAILABLE, sandbox_advice(str(exc)))
        return report.encode()
    # By position, as the dispatcher reads results: (row, ok, output, error, traceback, cpu).
    answer = outcome.results[0] if outcome.results else None
    if answer is None or not answer[1] or json.loads(answer[2]) != 42:
        detail = outcome.script_error or (answer[3] or answer[2] if answer else "no result")
        report.failure = BatchFailure(FailureKind.NODE_ERROR,
                                      f"a test row did not come back right: {detail}")
    report.seconds = time.perf_counter() - started
    return report.encode()


def node_facts(refresh: bool = False) -> dict:
    """What this node is, measured here (the sandbox test is cached per worker)."""
    import ray

    return {"sandbox": executor.sandbox_status(refresh=refresh),
            "python_version": platform.python_version(), "ray_version": ray.__version__}


def sandbox_advice(status: str) -> str:
    """A sandbox problem in words a volunteer can act on."""
    reason = status.removeprefix("unavailable: ")
    if "not installed" in reason:
        return ("bubblewrap is not installed on this machine: sudo apt install bubblewrap "
                "(Debian, Ubuntu; sudo dnf install bubblewrap on Fedora)")
    return f"the sandbox does not work on this machine: {reason}"


def _node_limits(limits: Limits, context) -> Limits:
    # Ray's session directory on this node is hidden from research code too.
    return Limits(**{**limits.__dict__,
                     "hidden_paths": tuple(limits.hidden_paths) + (context.get_temp_dir(),)})


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
