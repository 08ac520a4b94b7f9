"""The program that runs research code, inside the sandbox. Standard library only.

``engine.executor`` starts it as ``python -I -c <this source> IN_FD OUT_FD``, so it
needs no file on the node and nothing from the ``engine`` package. It is the only
place where a research script is compiled and executed.

Protocol. The parent writes length-prefixed pickles to IN_FD (the parent is trusted);
the child answers with JSON lines on OUT_FD (the child is not trusted, so the parent
never unpickles what it sends):

  parent -> {"source", "filename", "limits"}          child -> {"t": "ready"} | {"t": "script_error", ...}
  parent -> {"columns", "rows": [(index, values)], "isolate", "timeout"}
                                                       child -> {"t": "results", "r": [...]} ... {"t": "done"}

Each result is ``[row_index, ok, output_json_or_error, traceback, cpu_seconds]``.
Results are flushed every 50 ms, or after every row in isolate mode, which the parent
uses to pin down a row that kills its process. A row that overruns the time limit is
reported, and then the child exits so that the parent replaces the process, whatever
state the script left it in.
"""

import json
import linecache
import os
import pickle
import resource
import signal
import struct
import sys
import time
import traceback

_FLUSH_SECONDS = 0.05
_FLUSH_BYTES = 1 << 20


class RowTimeout(BaseException):
    """Raised inside main() when the row runs past its time limit.

    A BaseException, so that a script's ``except Exception`` does not swallow it.
    """


_in_row = False
_row_started = 0.0
_timeout = 60.0


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


def _describe(exc):
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _format_traceback(exc):
    # Skip the first frame: it is this file's call of main().
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__.tb_next))


def _apply_limits(limits):
    for name, value in (("RLIMIT_AS", limits.get("memory_bytes")),
                        ("RLIMIT_FSIZE", limits.get("file_bytes")),
                        ("RLIMIT_NOFILE", limits.get("open_files")),
                        ("RLIMIT_NPROC", limits.get("processes"))):
        if value:
            resource.setrlimit(getattr(resource, name), (value, value))


def main(in_fd, out_fd):
    global _in_row, _row_started, _timeout
    inp = os.fdopen(in_fd, "rb")
    out = os.fdopen(out_fd, "wb")

    def send(message):
        out.write(json.dumps(message, ensure_ascii=False).encode() + b"\n")
        out.flush()

    init = _read_frame(inp)
    limits = init["limits"]
    memory_text = limits.get("memory_text", "the memory limit")
    output_bytes = limits.get("output_bytes") or (10 << 20)
    _apply_limits(limits)
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
    dumps = json.JSONEncoder(default=_to_plain, ensure_ascii=False, separators=(",", ":")).encode
    cpu_clock = time.process_time
    clock = time.monotonic

    while True:
        batch = _read_frame(inp)
        if batch is None:
            return
        columns = batch["columns"]
        isolate = batch["isolate"]
        _timeout = batch["timeout"]
        signal.setitimer(signal.ITIMER_REAL, _timeout)
        pending = []
        pending_bytes = 0
        last_flush = clock()
        timed_out = False
        cpu_before = cpu_clock()
        for index, values in batch["rows"]:
            row = dict(zip(columns, values))
            try:
                _row_started = clock()
                _in_row = True
                result = entry(row)
                _in_row = False
                text = dumps(result)
                if len(text) > output_bytes // 4 and len(text.encode()) > output_bytes:
                    raise OverflowError(
                        f"the output is {len(text.encode()) / 1e6:.1f} MB, above the "
                        f"{output_bytes / 1e6:.0f} MB per-row limit")
                cpu_after = cpu_clock()
                pending.append([index, 1, text, None, cpu_after - cpu_before])
                pending_bytes += len(text)
            except RowTimeout:
                _in_row = False
                cpu_after = cpu_clock()
                pending.append([index, 0, f"RowTimeout: row exceeded the {_timeout:g} s time limit",
                                None, cpu_after - cpu_before])
                timed_out = True
            except MemoryError as exc:
                _in_row = False
                cpu_after = cpu_clock()
                pending.append([index, 0, f"MemoryError: {memory_text} exceeded",
                                _format_traceback(exc), cpu_after - cpu_before])
            except BaseException as exc:
                _in_row = False
                cpu_after = cpu_clock()
                pending.append([index, 0, _describe(exc), _format_traceback(exc),
                                cpu_after - cpu_before])
            cpu_before = cpu_after
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
        send({"t": "done"})


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
