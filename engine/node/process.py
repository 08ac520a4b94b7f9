"""One sandboxed child process that runs research code, seen from the parent.

The code runs in a child process (``child.py``) under bubblewrap (``sandbox.py``): no
network, only the system and Python visible and read-only, empty and bounded ``/tmp``
and ``$HOME``, no capabilities, an unprivileged uid, a scrubbed environment and resource
limits. The parent only feeds rows in (pickled, on one pipe) and reads JSON lines out (on
another), so research code never shares a process with the Ray token. Every line is
checked here (``_parse_result``) and nothing the child says about time is believed: the
CPU of each row is measured from the kernel (``meter``).

A ``ChildProcess`` starts, imports the script, runs batches of rows and reports how each
batch ended; when it dies mid-batch it says why, in words (``_death_text``). Which child
runs which batch, and when one is replaced, is the ``pool``'s and ``executor``'s business.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from engine.node import sandbox
from engine.node.meter import CpuMeter, child_of, price, proc_stat
from engine.node.sandbox import Limits

logger = logging.getLogger(__name__)

CHILD_SOURCE = (Path(__file__).parent / "child.py").read_text()
_GRACE_SECONDS = 3.0
_WAKE_SECONDS = 0.25  # longest wait on a child before looking for an interrupt
_STARTUP_SECONDS = 60.0


class SandboxUnavailable(RuntimeError):
    """This node cannot start the sandbox; research code must not run here."""


def _set_parent_death_signal() -> None:
    # Runs in the forked child before exec: die when the Ray worker dies (cancel, crash).
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class ChildProcess:
    """One child: started by ``__init__`` (fast), ready after ``start()``.

    ``sandboxed`` says whether it runs under bubblewrap (``probe.use_sandbox`` decides).
    Only the thread that owns it reads, writes and closes it; any thread may ``kill()`` it.
    """

    def __init__(self, source: str, filename: str, limits: Limits, sandboxed: bool,
                 uid_slot: int = 0):
        self.script_error: tuple[str, str | None] | None = None
        self._import_timeout = limits.import_timeout
        self._meter: CpuMeter | None = None
        self._init: tuple[int, bytes] | None = None  # bubblewrap's init: (pid, start time)
        self._marks: list[tuple[float, float | None]] = []
        self._kill_lock = threading.Lock()
        self.recycle: str | None = None
        in_read, self._in_write = os.pipe()
        self._out_read, out_write = os.pipe()
        prefix = sandbox.bwrap_argv(limits.hidden_paths, limits.storage()) if sandboxed else []
        argv = prefix + [sys.executable, "-I", "-c", CHILD_SOURCE, str(in_read), str(out_write)]
        self.process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=(in_read, out_write), env=sandbox.child_env(), start_new_session=True,
            preexec_fn=_set_parent_death_signal)
        os.close(in_read)
        os.close(out_write)
        self._sandboxed = sandboxed
        self._buffer = b""
        self._max_line = limits.output_bytes * 2 + (1 << 20)
        child_limits = limits.for_child()
        if sandboxed:
            child_limits.update(uid=sandbox.sandbox_uid(uid_slot), pid_namespace=True)
        self._send({"source": source, "filename": filename, "limits": child_limits})

    def start(self) -> None:
        """Wait until the script is imported: ready, or ``script_error`` says why not."""
        try:
            self._start(self._import_timeout)
        except BaseException:
            self.close()  # a cancelled batch, or a sandbox that did not start
            raise

    def _start(self, import_timeout: float) -> None:
        # Two limits, two culprits: the child says "started" once the sandbox is up and its
        # limits are applied, before it compiles the script. Not starting is the node's
        # problem; a script whose top-level code does not finish is the script's.
        message = self._next_message(time.monotonic() + _STARTUP_SECONDS)
        if message is None or message.get("t") != "started":
            self.close()
            if self._sandboxed:
                raise SandboxUnavailable(
                    f"the sandbox did not start ({self._exit_text()}); check that bubblewrap works here")
            raise RuntimeError(f"the worker process did not start ({self._exit_text()})")
        self._find_processes()
        message = self._next_message(time.monotonic() + import_timeout)
        kind = message.get("t") if message is not None else self.failure
        if kind == "ready":
            return
        if kind == "script_error":
            self.script_error = (_clean(str(message.get("error"))),
                                 _str_or_none(message.get("traceback")))
        elif kind == "timeout":
            self.script_error = (f"ImportTimeout: the script's top-level code was still running after "
                                 f"{import_timeout:g} s (the import time limit)", None)
        elif kind == "eof":
            self.script_error = (f"SystemExit: the script ended its process while being imported "
                                 f"({self._exit_text()})", None)
        else:
            self.script_error = ("SandboxError: the script wrote to the engine's result pipe while "
                                 "being imported", None)
        self.close()

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

        After None, ``self.failure`` says which: "timeout", "eof" or "protocol".
        """
        self.failure = None
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.failure = "timeout"
                return None
            # Wake at least every _WAKE_SECONDS: a cancelled Ray task gets its
            # KeyboardInterrupt between two Python instructions, not inside select().
            if not select.select([self._out_read], [], [], min(remaining, _WAKE_SECONDS))[0]:
                continue
            chunk = os.read(self._out_read, 1 << 20)
            if not chunk:
                self.failure = "eof"
                return None
            # When each read came, and the child's CPU clock then: how rows are priced.
            self._marks.append((time.monotonic(), self._meter.clock() if self._meter else None))
            self._buffer += chunk
            if len(self._buffer) > self._max_line and b"\n" not in self._buffer:
                self.failure = "protocol"
                return None
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            message = json.loads(line)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            self.failure = "protocol"
            return None
        return message

    def run(self, columns, rows, isolate: bool, timeout: float) -> tuple[list[tuple], str]:
        """Send rows; collect results in order. Returns (results, how it ended).

        How it ended: "done" (the child stays warm), "recycle" (all rows done, but the
        child exits because something it started was still running), "timeout" (the
        child reported a row over its time limit and exited), or an error text for the
        row that was running when the child died.

        Each result's CPU time is measured here, never taken from the child (see ``meter.price``).
        """
        started = self._reading(settle=True)  # it waits for rows: its clock is exact now
        self._marks = [(time.monotonic(), started[0] if started else None)]
        groups: list[tuple[int, list[tuple]]] = []  # (mark, results without CPU time)
        ended = [None]

        def finish(end, settle: bool = False) -> tuple[list[tuple], str]:
            # Read the child's clock before it is closed: ``end`` is the end's text, or
            # what closes the child and says why (a broken protocol, a death).
            ended[0] = self._reading(settle=settle)
            return price(groups, self._marks, started, ended[0]), end() if callable(end) else end

        if not self._send({"columns": list(columns), "rows": list(rows),
                           "isolate": isolate, "timeout": timeout}):
            return finish(self._death_text)
        expected = iter(index for index, _ in rows)
        count = 0
        while True:
            message = self._next_message(time.monotonic() + timeout + _GRACE_SECONDS)
            if message is None:
                if self.failure == "timeout":
                    priced = finish(f"RowTimeout: row exceeded the {timeout:g} s time limit "
                                    f"(its process stopped responding and was replaced)")
                    self.close()
                    return priced
                if self.failure == "protocol":
                    return finish(self._protocol_error)
                return finish(self._death_text)
            kind = message.get("t")
            if kind == "results":
                items = message.get("r")
                group = []
                for item in items if isinstance(items, list) else (None,):
                    result = _parse_result(item, next(expected, None))
                    if result is None:
                        groups.append((len(self._marks) - 1, group))
                        return finish(self._protocol_error)
                    group.append(result)
                groups.append((len(self._marks) - 1, group))
                count += len(group)
            elif kind == "done":
                if count != len(rows):
                    # A script can write to the result pipe itself; a "done" that leaves
                    # rows unanswered would lose them silently.
                    return finish(self._protocol_error)
                self.recycle = _str_or_none(message.get("recycle"))
                if self.recycle is not None:
                    logger.info("sandbox: replacing a child after its batch: %s", self.recycle)
                    priced = finish("recycle")
                    self.close()
                    return priced
                return finish("done", settle=True)
            elif kind == "exit":
                priced = finish("timeout")
                self.close()
                return priced
            else:
                return finish(self._protocol_error)

    def _find_processes(self) -> None:
        # Found now, before the script runs: nothing of research code can stand in for them.
        # Under bubblewrap: bwrap (ours), then its init (pid 1 of the sandbox's PID
        # namespace), then the research process (pid 2).
        research = self.process.pid
        if self._sandboxed:
            init = child_of(self.process.pid)
            stat = proc_stat(init) if init is not None else None
            self._init = (init, stat[19]) if stat is not None else None
            research = child_of(init) if init is not None else None
        stat = proc_stat(research) if research is not None else None
        if stat is None:
            logger.warning("sandbox: cannot find the research process of child %s; its rows "
                           "are measured as 0 s of CPU", self.process.pid)
            return
        self._meter = CpuMeter(research, stat[19])

    def _reading(self, settle: bool = False) -> tuple[float, float] | None:
        """(CPU seconds of the research process itself, of the children it waited for)."""
        if self._meter is None:
            return None
        return self._meter.read(settle)

    def _protocol_error(self) -> str:
        self.close()
        return ("SandboxError: the process running this row broke the result protocol "
                "(it wrote to the engine's result pipe itself); it was replaced")

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
        signum = None
        if code is not None and code < 0:
            signum = -code
        elif self._sandboxed and code is not None and 128 < code < 128 + 65:
            signum = code - 128  # bubblewrap exits with 128 + the signal that ended its command
        if signum is not None:
            try:
                name = signal.Signals(signum).name
            except ValueError:
                name = f"signal {signum}"
            reason = {"SIGXCPU": "it exceeded the CPU time limit of its batch",
                      "SIGXFSZ": "it exceeded the file size limit",
                      "SIGKILL": "it was killed (out of memory, or over the CPU time limit)",
                      "SIGSEGV": "it crashed (segmentation fault)"}.get(name, f"it was killed by {name}")
            return f"WorkerCrashed: the process running this row died: {reason}"
        return f"WorkerCrashed: the process running this row exited unexpectedly (exit code {code})"

    def kill(self) -> None:
        """End the child now, from any thread; its owner then reads the end of its pipe.

        The sandbox's init goes first: with it the kernel kills everything left in the
        sandbox's PID namespace, and bubblewrap, seeing its child end, exits having reaped
        it, so no process of the sandbox is left orphaned (or as a zombie). Without a known
        init (no sandbox), the child's process group goes.
        """
        with self._kill_lock:
            if self.process.returncode is not None:
                return
            if self._init is not None:
                init, born = self._init
                stat = proc_stat(init)
                if stat is not None and stat[19] == born and stat[1] == str(self.process.pid).encode():
                    try:
                        os.kill(init, signal.SIGKILL)
                        return
                    except ProcessLookupError:
                        pass
            self._kill_group()

    def _kill_group(self) -> None:
        try:
            # Killing bubblewrap kills its init (--die-with-parent), and with the init the
            # kernel kills everything left in the sandbox's PID namespace.
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def close(self) -> None:
        if self.process.poll() is None:
            self.kill()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            with self._kill_lock:
                self._kill_group()
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
    return _clean(value) if isinstance(value, str) else None


# A \uD800-\uDFFF escape that is not itself escaped (an even run of backslashes before it).
_ESCAPED_SURROGATE = re.compile(r"(?<!\\)(?:\\\\)*\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _clean(text: str) -> str:
    """``text`` as valid Unicode. JSON lines can carry lone surrogates (as escapes), which
    no database or export can store: a script's error texts keep them as escaped text."""
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _parse_result(item: Any, expected_index: int | None) -> tuple | None:
    """A child's result item, checked: ``RowResult``'s fields but the CPU time (``meter.price``)."""
    if not (isinstance(item, list) and len(item) == 4 and item[0] == expected_index
            and item[0] is not None and item[1] in (0, 1) and isinstance(item[2], str)):
        return None
    if item[1] == 1:
        text = item[2]
        if ((not text.isascii() and _clean(text) != text)
                or ("\\u" in text and _ESCAPED_SURROGATE.search(text))):
            # The child refuses outputs with lone surrogates, and writes no surrogate as an
            # escape: this line is not the child's.
            return None
        return (item[0], True, text, None, None)
    return (item[0], False, None, _clean(item[2]), _str_or_none(item[3]))
