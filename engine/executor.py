"""Running research code: the one module every execution goes through.

Cluster batches (inside a Ray worker) and trial runs (inside the portal or CLI) both
call ``run_rows``. The code itself runs in a child process (``engine/child.py``) under
bubblewrap: no network, read-only system, empty ``/tmp`` and ``$HOME``, no
capabilities, a scrubbed environment and resource limits. The calling process only
feeds rows in and reads results out, so research code never shares a process with
the Ray token.

Children are kept warm per script between batches (starting one costs ~35 ms), and
replaced whenever one dies or overruns. A row that crashes its process is found by
re-running the rest of the batch in isolate mode, one flushed result per row; the
rows before it keep their results.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from engine.status import RowResult

logger = logging.getLogger(__name__)

CHILD_SOURCE = (Path(__file__).parent / "child.py").read_text()
_WARM_CHILDREN = 2
_GRACE_SECONDS = 3.0
_STARTUP_SECONDS = 60.0


class SandboxUnavailable(RuntimeError):
    """This node cannot start the sandbox; research code must not run here."""


@dataclass(frozen=True)
class Limits:
    """What one child may use. Built by the caller from settings and project overrides."""

    row_timeout: float = 60.0
    memory_bytes: int = 2 << 30
    output_bytes: int = 10 << 20
    file_bytes: int = 64 << 20
    open_files: int = 256
    sandbox: str = "bwrap"
    hidden_paths: tuple[str, ...] = ()

    def for_child(self) -> dict[str, Any]:
        gib = self.memory_bytes / (1 << 30)
        memory_text = (f"memory limit of {gib:g} GiB" if gib >= 1
                       else f"memory limit of {self.memory_bytes >> 20} MiB")
        return {"memory_bytes": self.memory_bytes, "file_bytes": self.file_bytes,
                "open_files": self.open_files, "output_bytes": self.output_bytes,
                "memory_text": memory_text}


@dataclass
class Outcome:
    """What a batch produced: a result per row, or the script's import-time error."""

    results: list[RowResult] = field(default_factory=list)
    script_error: str | None = None
    script_traceback: str | None = None


def run_rows(source: str, filename: str, columns: Sequence[str],
             rows: Sequence[tuple[int, Sequence[Any]]], limits: Limits) -> Outcome:
    """Run ``main`` over ``rows`` (pairs of row index and values) in a sandboxed child."""
    outcome = Outcome()
    pending = list(rows)
    isolate = False
    while pending:
        child = _pool.get(source, filename, limits)
        if child.script_error is not None:
            _pool.discard(child)
            outcome.script_error, outcome.script_traceback = child.script_error
            return outcome
        received, end = child.run(columns, pending, isolate, limits.row_timeout)
        outcome.results.extend(received)
        pending = pending[len(received):]
        if end == "done":
            break
        _pool.discard(child)
        if end == "timeout":
            continue  # the child reported the row itself and exited
        if not pending:
            break
        if not isolate:
            # We cannot tell which row killed it: buffered results may have been lost.
            # Go on one flushed row at a time, so the next death names its row.
            isolate = True
            continue
        index, _values = pending.pop(0)
        outcome.results.append(RowResult(index, False, None, end, None, 0.0))
    return outcome


def sandbox_available() -> bool:
    """Whether bubblewrap is installed and can start a sandbox on this machine."""
    if shutil.which("bwrap") is None:
        return False
    probe = subprocess.run(_bwrap_prefix(()) + [sys.executable, "-I", "-c", "pass"],
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    return probe.returncode == 0


def shutdown() -> None:
    """Stop every warm child (used by tests and at worker exit)."""
    _pool.close_all()


# -- children ------------------------------------------------------------------------


def _child_env() -> dict[str, str]:
    # Only what Python needs. No RAY_*, no tokens, no credentials of the host's user.
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": _sandbox_home(),
            "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def _sandbox_home() -> str:
    return os.path.expanduser("~") or "/root"


def _bwrap_prefix(hidden_paths: Sequence[str]) -> list[str]:
    home = _sandbox_home()
    args = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
            "--tmpfs", "/tmp", "--tmpfs", home]
    masked = ["/tmp", home]
    for path in hidden_paths:
        if path and os.path.isdir(path):
            args += ["--tmpfs", path]
            masked.append(path)
    # The masks above can hide the Python installation or the virtual environment
    # (pyenv under $HOME, a venv under /tmp): bind those back, read-only.
    for path in sorted({os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix),
                        sys.prefix, sys.base_prefix,
                        os.path.dirname(os.path.realpath(sys.executable))}):
        if any(path == m or path.startswith(m.rstrip("/") + "/") for m in masked):
            args += ["--ro-bind", path, path]
    args += ["--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
             "--unshare-cgroup-try", "--die-with-parent", "--new-session",
             "--cap-drop", "ALL", "--chdir", "/tmp"]
    return args


def _set_parent_death_signal() -> None:
    # Runs in the forked child before exec: die when the Ray worker dies (cancel, crash).
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class _Child:
    def __init__(self, source: str, filename: str, limits: Limits):
        self.script_error: tuple[str, str | None] | None = None
        in_read, self._in_write = os.pipe()
        self._out_read, out_write = os.pipe()
        prefix = _bwrap_prefix(limits.hidden_paths) if limits.sandbox == "bwrap" else []
        if prefix and shutil.which("bwrap") is None:
            os.close(in_read)
            os.close(out_write)
            raise SandboxUnavailable("bubblewrap (bwrap) is not installed on this node")
        argv = prefix + [sys.executable, "-I", "-c", CHILD_SOURCE, str(in_read), str(out_write)]
        self.process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(in_read, out_write), env=_child_env(), start_new_session=True,
            preexec_fn=_set_parent_death_signal)
        os.close(in_read)
        os.close(out_write)
        self._buffer = b""
        self._max_line = limits.output_bytes * 2 + (1 << 20)
        self._send({"source": source, "filename": filename, "limits": limits.for_child()})
        deadline = time.monotonic() + max(_STARTUP_SECONDS, limits.row_timeout)
        message = self._next_message(deadline)
        if message is None or message.get("t") not in ("ready", "script_error"):
            self.close()
            if limits.sandbox == "bwrap":
                raise SandboxUnavailable(
                    f"the sandbox did not start ({self._exit_text()}); check that bubblewrap works here")
            raise RuntimeError(f"the worker process did not start ({self._exit_text()})")
        if message["t"] == "script_error":
            self.script_error = (str(message.get("error")), _str_or_none(message.get("traceback")))

    def _send(self, message: dict) -> bool:
        payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            os.write(self._in_write, struct.pack(">Q", len(payload)))
            view = memoryview(payload)
            while view:
                written = os.write(self._in_write, view)
                view = view[written:]
            return True
        except (BrokenPipeError, OSError):
            return False

    def _next_message(self, deadline: float) -> dict | None:
        """The next JSON message, or None if the child died, misbehaved or ran out of time.

        After None, ``self.timed_out`` tells a silent child from a dead one.
        """
        self.timed_out = False
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            ready = select.select([self._out_read], [], [], remaining)[0] if remaining > 0 else []
            if not ready:
                self.timed_out = True
                return None
            chunk = os.read(self._out_read, 1 << 20)
            if not chunk:
                return None
            self._buffer += chunk
            if len(self._buffer) > self._max_line and b"\n" not in self._buffer:
                return None
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            message = json.loads(line)
        except ValueError:
            return None
        return message if isinstance(message, dict) else None

    def run(self, columns, rows, isolate: bool, timeout: float) -> tuple[list[RowResult], str]:
        """Send rows; collect results in order. Returns (results, how it ended)."""
        received: list[RowResult] = []
        if not self._send({"columns": list(columns), "rows": list(rows),
                           "isolate": isolate, "timeout": timeout}):
            return received, self._death_text()
        expected = iter(index for index, _ in rows)
        while True:
            message = self._next_message(time.monotonic() + timeout + _GRACE_SECONDS)
            if message is None:
                if self.timed_out:
                    self.close()
                    return received, (f"RowTimeout: row exceeded the {timeout:g} s time limit "
                                      f"(its process stopped responding and was replaced)")
                return received, self._death_text()
            kind = message.get("t")
            if kind == "results":
                for item in message.get("r", ()):
                    result = _parse_result(item, next(expected, None))
                    if result is None:
                        self.close()
                        return received, "SandboxError: the process running this row broke the protocol"
                    received.append(result)
            elif kind == "done":
                return received, "done"
            elif kind == "exit":
                self.close()
                return received, "timeout"
            else:
                self.close()
                return received, "SandboxError: the process running this row broke the protocol"

    def _exit_text(self) -> str:
        try:
            code = self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return "still running"
        return f"exit code {code}" if code >= 0 else f"killed by {signal.Signals(-code).name}"

    def _death_text(self) -> str:
        try:
            self.process.wait(timeout=5)  # it closed its pipe; let it finish exiting
        except subprocess.TimeoutExpired:
            pass
        self.close()
        code = self.process.returncode
        if code is not None and code < 0:
            name = signal.Signals(-code).name
            reason = {"SIGXCPU": "it exceeded the CPU time limit",
                      "SIGXFSZ": "it exceeded the file size limit",
                      "SIGKILL": "it was killed (often: out of memory)",
                      "SIGSEGV": "it crashed (segmentation fault)"}.get(name, f"it was killed by {name}")
            return f"WorkerCrashed: the process running this row died: {reason}"
        return f"WorkerCrashed: the process running this row exited unexpectedly (exit code {code})"

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        for fd in (self._in_write, self._out_read):
            try:
                os.close(fd)
            except OSError:
                pass
        self._in_write = self._out_read = -1


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _parse_result(item: Any, expected_index: int | None) -> RowResult | None:
    if not (isinstance(item, list) and len(item) == 5 and item[0] == expected_index
            and item[0] is not None and item[1] in (0, 1) and isinstance(item[2], str)
            and isinstance(item[4], (int, float))):
        return None
    tb = item[3] if isinstance(item[3], str) else None
    if item[1] == 1:
        return RowResult(item[0], True, item[2], None, None, float(item[4]))
    return RowResult(item[0], False, None, item[2], tb, float(item[4]))


class _Pool:
    """Warm children of this process, one per (script, limits), least recently used first out."""

    def __init__(self) -> None:
        self._children: OrderedDict[tuple, _Child] = OrderedDict()

    def get(self, source: str, filename: str, limits: Limits) -> _Child:
        key = (source, filename, limits)
        child = self._children.get(key)
        if child is not None and child.process.poll() is None:
            self._children.move_to_end(key)
            return child
        if child is not None:
            self.discard(child)
        child = _Child(source, filename, limits)
        self._children[key] = child
        while len(self._children) > _WARM_CHILDREN:
            _, oldest = self._children.popitem(last=False)
            oldest.close()
        return child

    def discard(self, child: _Child) -> None:
        for key, value in list(self._children.items()):
            if value is child:
                del self._children[key]
        child.close()

    def close_all(self) -> None:
        for child in list(self._children.values()):
            self.discard(child)


_pool = _Pool()
