"""The program that runs research code, inside the sandbox. Standard library only.

``process`` starts it as ``python -I -c <this source> IN_FD OUT_FD``, so it
needs no file on the node and nothing from the ``engine`` package. It is the only
place where a research script is compiled and executed.

Protocol. The parent writes length-prefixed pickles to IN_FD (the parent is trusted);
the child answers with JSON lines on OUT_FD (the child is not trusted, so the parent
never unpickles what it sends):

  parent -> {"source", "filename", "limits"}          child -> {"t": "started"}, then
                                                       {"t": "ready"} | {"t": "script_error", ...}
  parent -> {"columns", "rows": [(index, values)], "isolate", "timeout"}
                                                       child -> {"t": "results", "r": [...]} ... {"t": "done"[, "recycle": why]}

Why this module is one file of about 400 lines: it is sent into the sandbox as source text
(``python -I -c``), where no other file of ours can be imported, so everything the child
does (the limits, the protocol, running rows, ending a batch clean) has to be here.

"started" comes once the limits are applied, before the script is compiled: it tells the
sandbox not starting (the node's problem) apart from a script whose import never ends
(its own; the parent's import time limit runs from "started").

Each result is ``[row_index, ok, output_json_or_error, traceback]``. The child says nothing
about time: research code could write its own lines, so what a row cost is measured by
the parent, from the kernel (``meter.CpuMeter``), never read from here.
Results are flushed every 50 ms, or after every row in isolate mode, which the parent
uses to pin down a row that kills its process. A row that overruns the time limit is
reported, and then the child exits so that the parent replaces the process, whatever
state the script left it in.

A batch ends clean: a process the script started, or a thread still running, would
otherwise live on in this warm child after the batch. Such processes are killed and the
child tells the parent (``"recycle"`` in its ``done``) that it will exit, so the next
batch gets a fresh process. A copy of this program made by ``os.fork()`` inside
``main`` never reports rows: it leaves as soon as control returns here.
"""

import errno
import json
import linecache
import os
import pickle
import re
import resource
import signal
import struct
import sys
import time
import traceback

_FLUSH_SECONDS = 0.05
_CPU_SLACK_SECONDS = 2
_FLUSH_BYTES = 1 << 20
# Outputs nested deeper than this fail their row: results pages and exports read outputs
# with recursive code, and a 3,000-deep list crashed them (docs/results.md).
MAX_OUTPUT_DEPTH = 100
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_SURROGATE = re.compile("[\ud800-\udfff]")


class RowTimeout(BaseException):
    """Raised inside main() when the row runs past its time limit.

    A BaseException, so that a script's ``except Exception`` does not swallow it.
    """


_in_row = False
_row_started = 0.0
_timeout = 60.0
_is_fork_copy = False  # set in a process forked by the script: it must never report rows
_forks = 0             # os.fork() calls by the script, to explain a process-limit error
_protocol_fds = ()


def _count_fork():
    global _forks
    _forks += 1


def _after_fork_in_copy():
    # The copy shares the protocol pipes: point them at /dev/null so that it can neither
    # steal the parent's next batch nor interleave lines with the real child's.
    global _is_fork_copy
    _is_fork_copy = True
    null = os.open(os.devnull, os.O_RDWR)
    for fd in _protocol_fds:
        os.dup2(null, fd)
    os.close(null)


def _on_alarm(signum, frame):
    # One interval timer serves the whole batch: it wakes at most once per timeout and
    # checks how long the current row has run, instead of two setitimer calls per row.
    elapsed = time.monotonic() - _row_started
    if _in_row and elapsed >= _timeout:
        raise RowTimeout()
    remaining = _timeout - elapsed if _in_row else _timeout
    signal.setitimer(signal.ITIMER_REAL, max(remaining, 0.005))


def _read_frame(stream):
    header = stream.read(8)
    if len(header) < 8:
        return None
    (size,) = struct.unpack(">Q", header)
    return pickle.loads(stream.read(size))


def _to_plain(value):
    module = type(value).__module__
    if module == "numpy" or module.startswith("numpy."):
        return value.tolist()  # numpy scalars and arrays become plain Python values
    raise TypeError(
        f"main returned a value that is not JSON-serialisable: "
        f"Object of type {type(value).__name__} is not JSON serializable")


class _OutputError(Exception):
    """main returned a value that has no form every reader of results can take."""


def _encode(dumps, value):
    """The JSON text of main's return value, or _OutputError saying why it cannot be stored.

    Outputs are strict JSON, as every export, page and verifier reads it: no NaN or
    Infinity (Python's json writes them, JSON has no such numbers), no nesting deeper
    than MAX_OUTPUT_DEPTH, and valid Unicode (a lone surrogate cannot be written as UTF-8).
    """
    try:
        text = dumps(value)
    except ValueError as exc:
        if "Out of range float" not in str(exc):
            raise
        raise _OutputError("main returned NaN or Infinity, which JSON cannot hold "
                           "(return None or a string in its place)") from None
    except RecursionError:
        text = None
    if text is None or _too_deep(text):
        raise _OutputError(f"main returned a value nested more than {MAX_OUTPUT_DEPTH} levels "
                           f"deep, more than results pages and exports read") from None
    if not text.isascii():
        lone = _SURROGATE.search(text)
        if lone is not None:
            raise _OutputError(f"main returned text that is not valid Unicode (a lone surrogate, "
                               f"{lone.group()!r}), which cannot be stored")
    return text


def _too_deep(text):
    if text.count("[") + text.count("{") <= MAX_OUTPUT_DEPTH:
        return False  # the common case, at C speed
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text) if '"' in text else text)
    depth = 0
    for char in brackets:
        if char in "[{":
            depth += 1
            if depth > MAX_OUTPUT_DEPTH:
                return True
        else:
            depth -= 1
    return False


def _clean(text):
    """``text`` as valid Unicode: a lone surrogate (in a script's own error message) becomes
    its escape, as text, so that the result line can be written at all."""
    if text is None or text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _describe(exc):
    message = str(exc)
    return _clean(f"{type(exc).__name__}: {message}" if message else type(exc).__name__)


def _format_traceback(exc):
    # Skip the first frame: it is this file's call of main().
    return _clean("".join(traceback.format_exception(type(exc), exc, exc.__traceback__.tb_next)))


def _apply_limits(limits):
    uid = limits.get("uid")
    if uid is not None and os.getuid() == 0:
        # Root's processes are exempt from RLIMIT_NPROC; an unprivileged uid is not.
        # Switching all three uids clears every capability, and bubblewrap's
        # no_new_privs keeps setuid programs from giving them back.
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        if os.getuid() != uid or os.geteuid() != uid:
            raise SystemExit("could not switch to the sandbox uid")
    for name, value in (("RLIMIT_AS", limits.get("memory_bytes")),
                        ("RLIMIT_FSIZE", limits.get("file_bytes")),
                        ("RLIMIT_NOFILE", limits.get("open_files")),
                        ("RLIMIT_NPROC", limits.get("processes")),
                        ("RLIMIT_CPU", limits.get("cpu_seconds")),
                        ("RLIMIT_CORE", 0)):
        if value is not None:
            resource.setrlimit(getattr(resource, name), (value, value))


def _reap():
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                return
        except ChildProcessError:
            return


def _other_processes(own_pid):
    """Live processes of the sandbox's PID namespace other than its init and this one."""
    others = []
    for name in os.listdir("/proc"):
        if name.isdigit() and name not in ("1", own_pid):
            try:
                with open(f"/proc/{name}/stat", "rb") as stat:
                    state = stat.read().rsplit(b")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue  # it exited while we looked
            if state != b"Z":
                others.append(name)
    return others


def _kill_strays(own_pid):
    """Kill every other process in the sandbox (only ever called inside its PID namespace)."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            # kill(-1) reaches this PID namespace only, and never its init (bubblewrap).
            os.kill(-1, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        _reap()
        if not _other_processes(own_pid):
            return
        time.sleep(0.005)


def _leftovers(own_pid, in_namespace):
    """Why this child must not be reused for another batch, or None."""
    _reap()
    if in_namespace:
        others = _other_processes(own_pid)
        if others:
            return f"{len(others)} process(es) left running"
    threads = len(os.listdir("/proc/self/task"))
    if threads > 1:
        return f"{threads - 1} thread(s) left running"
    return None


def _cpu_used():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _limit_batch_cpu(rows, timeout, lifetime):
    # The backstop behind the row timeout: a batch may use each row's time limit in CPU,
    # plus a little. The hard limit stays at the child's lifetime budget: research code
    # can lift this soft limit, but only up to that.
    if lifetime:
        soft = min(int(_cpu_used() + rows * timeout) + _CPU_SLACK_SECONDS, lifetime)
        resource.setrlimit(resource.RLIMIT_CPU, (soft, lifetime))


def _process_limit_text(exc, forks_before, processes):
    if (processes and isinstance(exc, OSError) and exc.errno == errno.EAGAIN
            and _forks > forks_before):
        return f"{_describe(exc)} (the sandbox's limit of {processes} processes was reached)"
    return None


def _storage_limit_text(exc, storage_text):
    if storage_text and isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return f"{_describe(exc)} ({storage_text})"
    return None


def main(in_fd, out_fd):
    global _in_row, _row_started, _timeout, _protocol_fds
    inp = os.fdopen(in_fd, "rb")
    out = os.fdopen(out_fd, "wb")
    _protocol_fds = (in_fd, out_fd)
    own_pid = str(os.getpid())
    os.register_at_fork(before=_count_fork, after_in_child=_after_fork_in_copy)

    def send(message):
        out.write(json.dumps(message, ensure_ascii=False).encode() + b"\n")
        out.flush()

    init = _read_frame(inp)
    limits = init["limits"]
    memory_text = limits.get("memory_text", "the memory limit")
    storage_text = limits.get("storage_text")
    output_bytes = limits.get("output_bytes") or (10 << 20)
    processes = limits.get("processes")
    cpu_lifetime = limits.get("cpu_seconds")
    # Only inside bubblewrap's PID namespace is killing "every other process" safe.
    in_namespace = bool(limits.get("pid_namespace")) and own_pid == "2"
    _apply_limits(limits)
    send({"t": "started"})
    filename = init["filename"]
    source = init["source"]
    # Tracebacks show the script's own lines, although it has no file on this node.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {"__name__": "__research__", "__file__": filename}
    try:
        exec(compile(source, filename, "exec"), namespace)
        entry = namespace["main"]
    except BaseException as exc:  # the script's own failure is reported, whatever it is
        send({"t": "script_error", "error": _describe(exc), "traceback": _format_traceback(exc)})
        return
    send({"t": "ready"})
    signal.signal(signal.SIGALRM, _on_alarm)
    dumps = json.JSONEncoder(default=_to_plain, ensure_ascii=False, allow_nan=False,
                             separators=(",", ":")).encode
    clock = time.monotonic

    while True:
        batch = _read_frame(inp)
        if batch is None:
            return
        columns = batch["columns"]
        isolate = batch["isolate"]
        _timeout = batch["timeout"]
        _limit_batch_cpu(len(batch["rows"]), _timeout, cpu_lifetime)
        signal.setitimer(signal.ITIMER_REAL, _timeout)
        pending = []
        pending_bytes = 0
        last_flush = clock()
        timed_out = False
        recycle = None
        for index, values in batch["rows"]:
            row = dict(zip(columns, values))
            forks_before = _forks
            try:
                _row_started = clock()
                _in_row = True
                result = entry(row)
                _in_row = False
                if _is_fork_copy:
                    os._exit(0)
                text = _encode(dumps, result)
                if len(text) > output_bytes // 4 and len(text.encode()) > output_bytes:
                    raise OverflowError(
                        f"the output is {len(text.encode()) / 1e6:.1f} MB, above the "
                        f"{output_bytes / 1e6:.0f} MB per-row limit")
                pending.append([index, 1, text, None])
                pending_bytes += len(text)
            except _OutputError as exc:
                pending.append([index, 0, f"ValueError: {exc}", None])
            except RowTimeout:
                _in_row = False
                pending.append([index, 0, f"RowTimeout: row exceeded the {_timeout:g} s time limit",
                                None])
                timed_out = True
            except MemoryError as exc:
                _in_row = False
                pending.append([index, 0, f"MemoryError: {memory_text} exceeded",
                                _format_traceback(exc)])
            except BaseException as exc:
                _in_row = False
                if _is_fork_copy:
                    os._exit(0)
                limit_text = _process_limit_text(exc, forks_before, processes)
                if limit_text is not None:
                    # A fork bomb: stop its copies now, so that the batch's other rows
                    # get the CPU, and replace this process after the batch.
                    if in_namespace:
                        _kill_strays(own_pid)
                    recycle = "the process limit was reached"
                limit_text = limit_text or _storage_limit_text(exc, storage_text)
                pending.append([index, 0, limit_text or _describe(exc), _format_traceback(exc)])
            if timed_out:
                break
            if isolate or pending_bytes > _FLUSH_BYTES or clock() - last_flush > _FLUSH_SECONDS:
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
                send({"t": "results", "r": pending})
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})
                pending = []
                pending_bytes = 0
                last_flush = clock()
        signal.setitimer(signal.ITIMER_REAL, 0)
        if pending:
            send({"t": "results", "r": pending})
        if timed_out:
            send({"t": "exit", "reason": "timeout"})
            return
        recycle = _leftovers(own_pid, in_namespace) or recycle
        if cpu_lifetime and _cpu_used() > cpu_lifetime / 2:
            recycle = recycle or "half of its CPU time budget is used"
        if recycle is None:
            send({"t": "done"})
            continue
        # Nothing the script started may outlive its batch: this process exits after
        # the message, which ends the PID namespace and everything left in it.
        if in_namespace:
            _kill_strays(own_pid)
        send({"t": "done", "recycle": recycle})
        return


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
