"""Running research code: the one module every execution goes through.

Cluster batches (inside a Ray worker) and trial runs (inside the portal or CLI) both
call ``run_rows``. The code itself runs in a sandboxed child process (``process``), taken
from a pool of warm children (``pool``); what a row cost in CPU is measured from the
kernel, never taken from the child (``meter``; docs/credit.md). A node where the sandbox
does not work refuses research code (``SandboxUnavailable``; the self-test is ``probe``).

A child is replaced whenever it dies, overruns, or leaves a process or thread behind
after a batch. A row that crashes its process is found by re-running the rest of the
batch in isolate mode, one flushed result per row; the rows before it keep their
results.

Callers import from here what they need to run rows: ``Limits``, ``Outcome``,
``SandboxUnavailable``, ``sandbox_status``/``sandbox_available``, and for callers that
run concurrently in one process, ``private_pool`` (a ``Pool`` of their own).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from engine.node.pool import Pool, private_pool
from engine.node.probe import sandbox_available, sandbox_status
from engine.node.process import SandboxUnavailable
from engine.node.result import RowResult
from engine.node.sandbox import Limits

__all__ = ["Limits", "Outcome", "Pool", "SandboxUnavailable", "private_pool", "run_rows",
           "sandbox_available", "sandbox_status", "shared_pool", "shutdown"]


@dataclass
class Outcome:
    """What a batch produced: a result per row, or the script's import-time error."""

    # RowResults, or plain tuples in the same field order from run_rows(plain=True).
    results: list[RowResult] = field(default_factory=list)
    script_error: str | None = None
    script_traceback: str | None = None


def run_rows(source: str, filename: str, columns: Sequence[str],
             rows: Sequence[tuple[int, Sequence[Any]]], limits: Limits, *,
             plain: bool = False, keep_warm: bool = True, pool: Pool | None = None) -> Outcome:
    """Run ``main`` over ``rows`` (pairs of row index and values) in a sandboxed child.

    Raises ``SandboxUnavailable`` when the sandbox does not work on this node (and the
    limits do not allow running without it): the caller retries the batch elsewhere.
    With ``plain``, results are plain tuples in ``RowResult``'s field order: a million-row
    project's nodes build and pickle those several times faster. Without ``keep_warm``
    the child is ended afterwards (a one-off, such as the node check). ``pool`` is where
    the child comes from: this process's own by default (a Ray worker runs one batch at a
    time); a caller that may run concurrently with others brings its own (``private_pool``).
    """
    pool = _pool if pool is None else pool
    try:
        return _run_rows(pool, source, filename, columns, rows, limits, plain, keep_warm)
    finally:
        pool.release()


def _run_rows(pool, source, filename, columns, rows, limits, plain, keep_warm) -> Outcome:
    outcome = Outcome()
    pending = list(rows)
    isolate = False
    child = None
    while pending:
        child = pool.get(source, filename, limits)
        if child.script_error is not None:
            pool.discard(child)
            outcome.script_error, outcome.script_traceback = child.script_error
            return outcome
        try:
            received, end = child.run(columns, pending, isolate, limits.row_timeout)
        except BaseException:
            # Interrupted mid-batch (a cancelled Ray task): the child still holds rows.
            pool.discard(child)
            raise
        outcome.results.extend(received)
        pending = pending[len(received):]
        if end == "done":
            break
        pool.discard(child)
        if end in ("timeout", "recycle"):
            continue  # the child reported its rows itself and exited
        if not pending:
            break
        if not isolate:
            # We cannot tell which row killed it: buffered results may have been lost.
            # Go on one flushed row at a time, so the next death names its row.
            isolate = True
            continue
        index, _values = pending.pop(0)
        outcome.results.append((index, False, None, end, None, 0.0))
    if not keep_warm and child is not None:
        pool.discard(child)
    if not plain:
        outcome.results = list(map(RowResult._make, outcome.results))
    return outcome


def shutdown() -> None:
    """Stop every warm child (used by tests and at worker exit)."""
    _pool.close_all()


_pool = Pool()  # this process's own: a Ray worker runs one batch at a time


def shared_pool() -> Pool:
    """This process's own pool, which ``run_rows`` uses when given none."""
    return _pool
