"""The one shape of what a node reports to the dispatcher, defined once.

A batch comes back as a ``BatchReport``: the node that ran it, one ``RowResult`` per row
it finished, how long it took, what the node is (sandbox, versions), and at most one
``BatchFailure``. A failure is either the research script's own (it raised while being
imported) or the infrastructure's (this node could not do the work); the dispatcher
treats the two very differently, so the kind is part of the report, never guessed from
text. On the wire a report is a pickled tuple of plain values, so that even a node
which cannot import this module can send one (see ``entry``).
"""

from __future__ import annotations

import enum
import pickle
import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple


class RowResult(NamedTuple):
    """One row's outcome.

    A NamedTuple, not a dataclass: a million of them cross Ray and the store per big
    project, and tuples pickle and unpickle several times faster. Nodes send plain tuples
    in this field order (``executor.run_rows(plain=True)``).
    """

    row_index: int
    succeeded: bool
    output: str | None       # JSON text of main's return value
    error: str | None        # "ExceptionType: message"
    traceback: str | None
    cpu_seconds: float


class FailureKind(str, enum.Enum):
    """Why a batch produced no results on a node."""

    # The research script raised (or did not finish) while being imported: the script's fault.
    SCRIPT_IMPORT = "script-import"
    # This machine cannot load Constellation's node code (a missing module, a wrong Python).
    CODE_UNLOADABLE = "code-unloadable"
    # The sandbox does not work on this node (bubblewrap missing or refused).
    SANDBOX_UNAVAILABLE = "sandbox-unavailable"
    # Constellation's code on the node raised: a bug or a broken machine.
    NODE_ERROR = "node-error"
    # Seen by the dispatcher, not sent by a node: Ray lost the worker or the node.
    WORKER_CRASHED = "worker-crashed"
    NODE_DIED = "node-died"

    def is_infrastructure(self) -> bool:
        """Whether the node, not the research script, is to blame."""
        return self is not FailureKind.SCRIPT_IMPORT

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class BatchFailure:
    kind: FailureKind
    message: str                 # plain text a volunteer or researcher can act on
    traceback: str | None = None


@dataclass
class BatchReport:
    node_id: str
    results: list = field(default_factory=list)  # RowResult-ordered tuples
    seconds: float = 0.0
    facts: dict = field(default_factory=dict)    # sandbox status, versions: the registry shows them
    failure: BatchFailure | None = None

    def encode(self) -> bytes:
        failure = None if self.failure is None else (
            self.failure.kind.value, self.failure.message, self.failure.traceback)
        return pickle.dumps((self.node_id, self.results, self.seconds, self.facts, failure),
                            protocol=pickle.HIGHEST_PROTOCOL)

    @classmethod
    def decode(cls, payload: bytes) -> "BatchReport":
        node_id, results, seconds, facts, failure = pickle.loads(payload)
        if failure is not None:
            kind, message, traceback = failure
            failure = BatchFailure(FailureKind(kind), message, traceback)
        return cls(node_id, results, seconds, facts, failure)


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def plain_text(text: Any) -> str:
    """``text`` without terminal colour codes (Ray colours its tracebacks)."""
    return _ANSI.sub("", str(text))


def describe(exc: BaseException) -> str:
    """``Type: message`` of an exception, on one line, without colour codes."""
    message = plain_text(exc).strip().splitlines()
    return f"{type(exc).__name__}: {message[0]}" if message else type(exc).__name__
