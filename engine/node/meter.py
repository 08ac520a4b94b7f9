"""What research code cost in CPU: measured by the parent, from the kernel, never taken
from the child (docs/credit.md).

``CpuMeter`` reads the CPU time of the process that runs research code; ``price`` shares
a batch's CPU out among its rows. ``proc_stat`` and ``child_of`` read ``/proc``, which is
also how ``process.ChildProcess`` finds the processes of its sandbox.
"""

from __future__ import annotations

import os
import time

_TICKS = os.sysconf("SC_CLK_TCK")
_SETTLE_TRIES = 20


class CpuMeter:
    """The CPU time of the process that runs research code, read by the parent from the kernel.

    Its clock is the process's CPU-time clock (``clock_getcpuclockid``: every thread, to the
    nanosecond), which any process may read; the children it waited for come from
    ``/proc/<pid>/stat`` (in clock ticks). With ``RLIMIT_CPU`` set (the child's backstop),
    the kernel updates that clock only at its ticks and context switches while the process
    runs, so a read is exact only while it sleeps: ``read(settle=True)`` waits (up to about
    2 ms) for it to sleep, as it does between batches. Under bubblewrap the research process
    is the grandchild of the one started here (bwrap, then bwrap's init in the sandbox's PID
    namespace); it is found when it says "started", before the script runs
    (``ChildProcess._find_processes``), and recognised by its start time afterwards, so that
    a reused pid is never read.
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
            stat = proc_stat(self.pid)
            if stat is None or stat[19] != self._born:
                return None
            if stat[0] != b"R":
                break
            time.sleep(0.0001)
        clock = self.clock()
        if clock is None:
            return None
        return clock, (int(stat[13]) + int(stat[14])) / _TICKS


def price(groups, marks, started, ended) -> list[tuple]:
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


def proc_stat(pid: int) -> list[bytes] | None:
    """Fields of /proc/<pid>/stat after the command name: [0] state, [1] parent, [13] and
    [14] children's user and system ticks, [19] start time."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields if len(fields) > 19 else None


def child_of(pid: int) -> int | None:
    """A child process of ``pid`` (bubblewrap's processes have one each). Pids come in
    order, so the next few are tried before all of /proc."""
    parent = str(pid).encode()
    nearby = [str(pid + step) for step in range(1, 9)]
    for name in nearby + [n for n in os.listdir("/proc") if n.isdigit() and n not in nearby]:
        stat = proc_stat(int(name))
        if stat is not None and stat[1] == parent:
            return int(name)
    return None
