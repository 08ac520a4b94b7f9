"""Warm children, kept per project and script between batches (starting one costs ~35 ms).

A pool hands a child out for a batch (``get``, which starts one if none is warm), takes
it back (``release``), and ends it when the executor finds it dead, over its time, or
left with a process or thread after its batch (``discard``). A child unused for a minute
(``_IDLE_SECONDS``) is ended too.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from typing import Iterator

from engine.node import sandbox
from engine.node.probe import use_sandbox
from engine.node.process import ChildProcess
from engine.node.sandbox import Limits

logger = logging.getLogger(__name__)

_WARM_CHILDREN = 2
# A warm child unused this long is ended, and the memory of its /tmp and $HOME with it.
_IDLE_SECONDS = 60.0


class Pool:
    """Warm children, one per (project, script, limits), the least recently used out first.

    A child serves one project only: research code can keep anything in its module globals
    or its /tmp, and the next batch it runs must be the same project's. A Ray worker runs
    one batch at a time and uses this process's pool; callers that run concurrently in one
    process (the portal's trial runs) each use a pool of their own (``private_pool``), so
    that no two of them ever share a child's pipes or its process limit.
    """

    def __init__(self, capacity: int = _WARM_CHILDREN, uid_slot: int = 0) -> None:
        self._children: OrderedDict[tuple, ChildProcess] = OrderedDict()
        self._starting: set[ChildProcess] = set()
        self._lock = threading.Lock()
        self._capacity = capacity
        self.uid_slot = uid_slot
        self.killed = False
        self._in_use: ChildProcess | None = None   # the one child handed out by get()
        self._last_used: dict[ChildProcess, float] = {}
        self._reaper: threading.Thread | None = None

    def warm(self) -> dict[tuple, ChildProcess]:
        """The warm children now, by (project, script source, filename, limits): a copy."""
        with self._lock:
            return dict(self._children)

    def get(self, source: str, filename: str, limits: Limits) -> ChildProcess:
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
            fresh = ChildProcess(source, filename, limits, use_sandbox(limits),
                                 uid_slot=self.uid_slot)
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

    def discard(self, child: ChildProcess) -> None:
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
