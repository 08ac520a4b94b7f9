"""The tether: a local Ray head lives only as long as the process that started it.

``LocalHead`` runs ``python engine/tether.py ARGV...`` as the leader of a new process
group, with its standard input a pipe whose other end only the owner holds. The tether
starts ARGV (``ray start --head --block``, confined or not) in its own group and waits.
When the owner goes, however it goes (SIGKILL included), the pipe reaches end of file and
the tether ends the whole group: SIGTERM, then SIGKILL after a grace period. Signals from
the owner cannot do this: a parent-death signal reaches only one child, and Ray's GCS
and raylet are grandchildren.

It is run as a file, not as ``-m engine.tether``, so that it needs only the standard
library and starts at once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

GRACE_SECONDS = 5.0
_ending = threading.Event()


def end_group(grace: float = GRACE_SECONDS) -> None:
    """SIGTERM to this process group, then SIGKILL (which ends the tether too)."""
    _ending.set()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.killpg(0, signal.SIGTERM)
    time.sleep(grace)
    os.killpg(0, signal.SIGKILL)


def _exit_with(child: subprocess.Popen) -> None:
    code = child.wait()
    if not _ending.is_set():  # the command ended by itself: so does the tether
        os._exit(code if code >= 0 else 128 - code)


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: tether.py COMMAND [ARG...]", file=sys.stderr)
        return 2
    if os.getpgrp() != os.getpid():  # it ends its whole group: that must be its own
        print("tether.py: must lead its own process group (start_new_session=True)",
              file=sys.stderr)
        return 2
    child = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
    threading.Thread(target=_exit_with, args=(child,), daemon=True).start()
    while os.read(0, 4096):  # only the owner holds the other end: EOF means it is gone
        pass
    end_group()
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
