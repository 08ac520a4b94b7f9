"""Running research code: the one module every execution goes through.

Cluster batches (inside a Ray worker) and trial runs (inside the portal or CLI) both
call ``run_rows``. The code itself runs in a child process (``child.py``) under
bubblewrap (``sandbox.py``): no network, only the system and Python visible and
read-only, empty and bounded ``/tmp`` and ``$HOME``, no capabilities, an unprivileged
uid, a scrubbed environment and resource limits. The calling process only feeds rows in
and reads JSON results out, so research code never shares a process with the Ray token.
What a row cost in CPU is measured here, from the kernel, never taken from the child
(``_CpuMeter``, ``_price``; docs/credit.md).

Children are kept warm per project and script between batches (starting one costs
~35 ms), ended after a minute unused, and replaced whenever one dies, overruns, or
leaves a process or thread behind after a batch. A row that crashes its process is found
by re-running the rest of the batch in isolate mode, one flushed result per row; the
rows before it keep their results. Callers that run concurrently in one process (trial
runs) each take a private pool (``private_pool``).

Before the first child, each process runs ``sandbox_status()``: a real sandboxed child
that reports what it can see (the node check runs it as soon as a node joins, see
``batch.check``). A node where that fails refuses research code (``SandboxUnavailable``)
unless ``Limits.allow_unsandboxed`` says otherwise.
"""

from __future__ import annotations

import contextlib
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
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from engine.node import sandbox
from engine.node.result import RowResult
from engine.node.sandbox import Limits  # noqa: F401 (callers import Limits from here)

logger = logging.getLogger(__name__)

CHILD_SOURCE = (Path(__file__).parent / "child.py").read_text()
_WARM_CHILDREN = 2
# A warm child unused this long is ended, and the memory of its /tmp and $HOME with it.
_IDLE_SECONDS = 60.0
_GRACE_SECONDS = 3.0
_WAKE_SECONDS = 0.25  # longest wait on a child before looking for an interrupt
_STARTUP_SECONDS = 60.0


class SandboxUnavailable(RuntimeError):
    """This node cannot start the sandbox; research code must not run here."""


@dataclass
class Outcome:
    """What a batch produced: a result per row, or the script's import-time error."""

    # RowResults, or plain tuples in the same field order from run_rows(plain=True).
    results: list[RowResult] = field(default_factory=list)
    script_error: str | None = None
    script_traceback: str | None = None


def run_rows(source: str, filename: str, columns: Sequence[str],
             rows: Sequence[tuple[int, Sequence[Any]]], limits: Limits, *,
             plain: bool = False, keep_warm: bool = True, pool: "Pool | None" = None) -> Outcome:
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


_status_lock = threading.Lock()
_status: str | None = None


def sandbox_status(refresh: bool = False) -> str:
    """``"available"``, or ``"unavailable: <reason>"``: a self-test of the sandbox on this node.

    It starts a real sandboxed child, as research code would get, and checks what that
    child sees: no network interface but loopback, nothing of ``$HOME`` and ``/tmp``,
    no ``~/.ray``, no capabilities, no ``RAY_*`` variables, and not uid 0. The answer is
    cached per process (about 50 ms to compute).
    """
    global _status
    with _status_lock:
        if _status is None or refresh:
            _status = _self_test()
            if _status != "available":
                logger.warning("sandbox: %s", _status)
        return _status


def sandbox_available() -> bool:
    """Whether the sandbox works on this node (see ``sandbox_status``)."""
    return sandbox_status() == "available"


_PROBE = """
import os, socket
def main(row):
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    return {"uid": os.getuid(), "cap_eff": int(status["CapEff"].strip(), 16),
            "no_new_privs": status["NoNewPrivs"].strip(),
            "interfaces": sorted(name for _, name in socket.if_nameindex()),
            "home": sorted(os.listdir(os.path.expanduser("~"))), "tmp": sorted(os.listdir("/tmp")),
            "ray_dir": os.path.exists(os.path.expanduser("~/.ray")),
            "ray_env": sorted(k for k in os.environ if k.startswith("RAY_"))}
"""


def _self_test() -> str:
    problem = sandbox.bwrap_problem()
    if problem is not None:
        return f"unavailable: {problem}"
    child = None
    try:
        child = _Child(_PROBE, "sandbox-probe.py", Limits(row_timeout=30.0), probe=True)
        child.start()
        if child.script_error is not None:
            return f"unavailable: the probe failed: {child.script_error[0]}"
        results, end = child.run(["x"], [(0, [0])], False, 30.0)
    except (SandboxUnavailable, OSError) as exc:
        return f"unavailable: {exc}"
    finally:
        if child is not None:
            child.close()
    results = list(map(RowResult._make, results))
    if end != "done" or not results or not results[0].succeeded:
        reason = results[0].error if results else end
        return f"unavailable: the probe failed: {reason}"
    seen = json.loads(results[0].output)
    problems = []
    if seen["interfaces"] not in ([], ["lo"]):
        problems.append(f"network interfaces are visible: {', '.join(seen['interfaces'])}")
    if seen["cap_eff"]:
        problems.append(f"capabilities remain ({seen['cap_eff']:#x})")
    if seen["no_new_privs"] != "1":
        problems.append("no_new_privs is not set")
    if sandbox.runs_as_root() and seen["uid"] == 0:
        problems.append("research code runs as uid 0")
    if seen["ray_dir"] or set(seen["home"]) - sandbox.home_entries_allowed():
        problems.append(f"$HOME is not empty: {', '.join(seen['home'])}")
    if set(seen["tmp"]) - sandbox.entries_allowed("/tmp"):
        problems.append(f"/tmp is not empty: {', '.join(seen['tmp'])}")
    if seen["ray_env"]:
        problems.append(f"Ray variables are visible: {', '.join(seen['ray_env'])}")
    return "unavailable: " + "; ".join(problems) if problems else "available"


def shutdown() -> None:
    """Stop every warm child (used by tests and at worker exit)."""
    _pool.close_all()


# -- children ------------------------------------------------------------------------


def _set_parent_death_signal() -> None:
    # Runs in the forked child before exec: die when the Ray worker dies (cancel, crash).
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class _Child:
    """One sandboxed child: started by ``__init__`` (fast), ready after ``start()``.

    Only the thread that owns it reads, writes and closes it; any thread may ``kill()`` it.
    """

    def __init__(self, source: str, filename: str, limits: Limits, probe: bool = False,
                 uid_slot: int = 0):
        self.script_error: tuple[str, str | None] | None = None
        self._import_timeout = limits.import_timeout
        self._meter: _CpuMeter | None = None
        self._init: tuple[int, bytes] | None = None  # bubblewrap's init: (pid, start time)
        self._marks: list[tuple[float, float | None]] = []
        self._kill_lock = threading.Lock()
        self.recycle: str | None = None
        sandboxed = limits.sandbox == "bwrap"
        if sandboxed and not probe and not sandbox_available():
            if not limits.allow_unsandboxed:
                raise SandboxUnavailable(f"the sandbox does not work on this node ({sandbox_status()}); "
                                         f"research code does not run here")
            logger.warning("sandbox: running research code WITHOUT the sandbox (%s), as allowed",
                           sandbox_status())
            sandboxed = False
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

        Each result's CPU time is measured here, never taken from the child (see ``_price``).
        """
        started = self._reading(settle=True)  # it waits for rows: its clock is exact now
        self._marks = [(time.monotonic(), started[0] if started else None)]
        groups: list[tuple[int, list[tuple]]] = []  # (mark, results without CPU time)
        ended = [None]

        def finish(end, settle: bool = False) -> tuple[list[tuple], str]:
            # Read the child's clock before it is closed: ``end`` is the end's text, or
            # what closes the child and says why (a broken protocol, a death).
            ended[0] = self._reading(settle=settle)
            return _price(groups, self._marks, started, ended[0]), end() if callable(end) else end

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
            init = _child_of(self.process.pid)
            stat = _proc_stat(init) if init is not None else None
            self._init = (init, stat[19]) if stat is not None else None
            research = _child_of(init) if init is not None else None
        stat = _proc_stat(research) if research is not None else None
        if stat is None:
            logger.warning("sandbox: cannot find the research process of child %s; its rows "
                           "are measured as 0 s of CPU", self.process.pid)
            return
        self._meter = _CpuMeter(research, stat[19])

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
                stat = _proc_stat(init)
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


def _price(groups, marks, started, ended) -> list[tuple]:
    """``groups`` of results (``(mark, results)``, in order) with their CPU time: the
    batch's, shared out by measured wall time. ``marks`` are (time, CPU clock) at the
    sending of the rows and at each read of the result pipe; ``started`` and ``ended``
    the research process's (own CPU, waited-for children's CPU) before and after.

    Nothing the child says about time is used. The CPU is the kernel's count for the
    research process (its clock, read from here, plus the children it waited for),
    from before the rows were sent to after the last result. The wall time of each
    read of the result pipe goes to the rows that read completed, in equal parts
    (the child chose how to group them, not how long they took), and each row gets
    the batch's CPU in proportion to its wall time, but never more than that wall
    time: a row is credited at most one core's worth.
    """
    if started is None or not groups:
        return [r + (0.0,) for _, group in groups for r in group]
    if ended is None:
        # The process is gone: its clock as last read, with the pipe's last data.
        clock = next((c for _, c in reversed(marks) if c is not None), started[0])
        ended = (clock, started[1])
    cpu = max(0.0, (ended[0] - started[0]) + (ended[1] - started[1]))
    walls = []  # (results, wall seconds of each)
    previous = marks[0][0]
    for mark, group in groups:
        if walls and walls[-1][2] == mark:
            walls[-1][0].extend(group)  # two messages in one read: one group
            continue
        walls.append([list(group), marks[mark][0] - previous, mark])
        previous = marks[mark][0]
    total = previous - marks[0][0]
    priced = []
    for group, wall, _ in walls:
        if not group:
            continue
        share = wall / len(group)
        row_cpu = min(cpu * share / total, share) if total > 0 else 0.0
        priced.extend(r + (row_cpu,) for r in group)
    return priced


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
    """A child's result item, checked: ``RowResult``'s fields but the CPU time (``_price``)."""
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


_TICKS = os.sysconf("SC_CLK_TCK")
_SETTLE_TRIES = 20


class _CpuMeter:
    """The CPU time of the process that runs research code, read by the parent from the kernel.

    Its clock is the process's CPU-time clock (``clock_getcpuclockid``: every thread, to the
    nanosecond), which any process may read; the children it waited for come from
    ``/proc/<pid>/stat`` (in clock ticks). With ``RLIMIT_CPU`` set (the child's backstop),
    the kernel updates that clock only at its ticks and context switches while the process
    runs, so a read is exact only while it sleeps: ``read(settle=True)`` waits (up to about
    2 ms) for it to sleep, as it does between batches. Under bubblewrap the research process
    is the grandchild of the one started here (bwrap, then bwrap's init in the sandbox's PID
    namespace); it is found when it says "started", before the script runs
    (``_Child._find_processes``), and recognised by its start time afterwards, so that a
    reused pid is never read.
    """

    def __init__(self, pid: int, born: bytes):
        self.pid = pid
        self._born = born
        self._clock_id = (~pid << 3) | 2  # CPUCLOCK_SCHED of a whole process (glibc's encoding)

    def clock(self) -> float | None:
        try:
            return time.clock_gettime(self._clock_id)
        except OSError:
            return None  # it exited

    def read(self, settle: bool) -> tuple[float, float] | None:
        for _ in range(_SETTLE_TRIES if settle else 1):
            stat = _proc_stat(self.pid)
            if stat is None or stat[19] != self._born:
                return None
            if stat[0] != b"R":
                break
            time.sleep(0.0001)
        clock = self.clock()
        if clock is None:
            return None
        return clock, (int(stat[13]) + int(stat[14])) / _TICKS


def _proc_stat(pid: int) -> list[bytes] | None:
    """Fields of /proc/<pid>/stat after the command name: [0] state, [1] parent, [13] and
    [14] children's user and system ticks, [19] start time."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields if len(fields) > 19 else None


def _child_of(pid: int) -> int | None:
    """A child process of ``pid`` (bubblewrap's processes have one each). Pids come in
    order, so the next few are tried before all of /proc."""
    parent = str(pid).encode()
    nearby = [str(pid + step) for step in range(1, 9)]
    for name in nearby + [n for n in os.listdir("/proc") if n.isdigit() and n not in nearby]:
        stat = _proc_stat(int(name))
        if stat is not None and stat[1] == parent:
            return int(name)
    return None


class Pool:
    """Warm children, one per (project, script, limits), the least recently used out first.

    A child serves one project only: research code can keep anything in its module globals
    or its /tmp, and the next batch it runs must be the same project's. A Ray worker runs
    one batch at a time and uses this process's pool; callers that run concurrently in one
    process (the portal's trial runs) each use a pool of their own (``private_pool``), so
    that no two of them ever share a child's pipes or its process limit.
    """

    def __init__(self, capacity: int = _WARM_CHILDREN, uid_slot: int = 0) -> None:
        self._children: OrderedDict[tuple, _Child] = OrderedDict()
        self._starting: set[_Child] = set()
        self._lock = threading.Lock()
        self._capacity = capacity
        self.uid_slot = uid_slot
        self.killed = False
        self._in_use: _Child | None = None   # the one child handed out by get()
        self._last_used: dict[_Child, float] = {}
        self._reaper: threading.Thread | None = None

    def get(self, source: str, filename: str, limits: Limits) -> _Child:
        key = (limits.project, source, filename, limits)
        with self._lock:
            child = self._children.get(key)
            if child is not None and child.process.poll() is None:
                self._children.move_to_end(key)
                self._in_use = child
                return child
            if child is not None:
                del self._children[key]
            # Started under the lock, so that kill() also reaches a child still importing.
            fresh = _Child(source, filename, limits, uid_slot=self.uid_slot)
            self._starting.add(fresh)
            if self.killed:
                fresh.kill()
        if child is not None:
            child.close()
        try:
            fresh.start()
        finally:
            with self._lock:
                self._starting.discard(fresh)
        with self._lock:
            self._children[key] = fresh
            self._in_use = fresh
            evicted = []
            while len(self._children) > self._capacity:
                evicted.append(self._children.popitem(last=False)[1])
        for oldest in evicted:
            oldest.close()
        return fresh

    def release(self) -> None:
        """The caller is done with the child ``get`` gave it; it may now expire when idle."""
        with self._lock:
            if self._in_use is not None:
                self._last_used[self._in_use] = time.monotonic()
                self._in_use = None
            if self._children and self._reaper is None:
                self._reaper = threading.Thread(target=self._end_idle, daemon=True,
                                                name="sandbox-idle-reaper")
                self._reaper.start()

    def _end_idle(self) -> None:
        # Warm children unused for _IDLE_SECONDS are ended: a project that finished must
        # not keep a child, and the memory of its /tmp and $HOME, on the node for ever.
        while True:
            time.sleep(min(_IDLE_SECONDS / 4, 5.0))
            now = time.monotonic()
            with self._lock:
                idle = [(key, child) for key, child in self._children.items()
                        if child is not self._in_use
                        and now - self._last_used.get(child, now) >= _IDLE_SECONDS]
                for key, _child in idle:
                    del self._children[key]
                    self._last_used.pop(_child, None)
                done = not self._children
                if done:
                    self._reaper = None
            for _key, child in idle:
                logger.info("sandbox: ending a child idle for %.0f s", _IDLE_SECONDS)
                child.close()
            if done:
                return

    def discard(self, child: _Child) -> None:
        with self._lock:
            for key, value in list(self._children.items()):
                if value is child:
                    del self._children[key]
            self._last_used.pop(child, None)
            if self._in_use is child:
                self._in_use = None
        child.close()

    def close_all(self) -> None:
        for child in list(self._children.values()):
            self.discard(child)

    def kill(self) -> None:
        """End every child of this pool now, from any thread (a trial whose session ended):
        the rows running there fail, and whatever the pool would start next is killed too."""
        with self._lock:
            self.killed = True
            for child in [*self._children.values(), *self._starting]:
                child.kill()


_slots_lock = threading.Lock()
_slots_taken: set[int] = set()


@contextlib.contextmanager
def private_pool() -> Iterator[Pool]:
    """A pool of one child for one caller alone, with a sandbox uid (and so a process
    limit) of its own; its child is ended on leaving."""
    with _slots_lock:
        free = [n for n in range(1, sandbox.UID_SLOTS) if n not in _slots_taken]
        if not free:
            raise RuntimeError(f"{sandbox.UID_SLOTS - 1} private sandboxes are in use in this process")
        slot = free[0]
        _slots_taken.add(slot)
    pool = Pool(capacity=1, uid_slot=slot)
    try:
        yield pool
    finally:
        pool.close_all()
        with _slots_lock:
            _slots_taken.discard(slot)


_pool = Pool()
