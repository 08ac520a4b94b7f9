"""How the bubblewrap sandbox around research code is built.

``engine.executor`` starts every child that runs research code with ``bwrap_argv()``
in front of it. The sandbox sees an allow-list of the system (``/usr``, ``/etc`` and
the library links), the Python installation and virtual environment read-only, a
private empty ``/tmp`` and ``$HOME``, its own network (no interfaces but a down
loopback), PID, IPC and UTS namespaces, and no capabilities. Everything else on the
machine (the repository, the data directory, ``/work``, ``/home``, ``/run``, ``/var``,
``~/.ray``) is simply absent.

When the node runs as root (the head and CI do), bubblewrap alone is not enough:
``RLIMIT_NPROC`` does not apply to uid 0, even inside a user namespace (the mapped
uid is still 0 outside), so a fork bomb is unlimited. The child therefore keeps
``CAP_SETUID``/``CAP_SETGID`` just long enough to switch to an unprivileged uid of its
own (``sandbox_uid()``) before it reads the script; bubblewrap sets ``no_new_privs``,
so nothing can raise it back. As a bonus, files that are root's alone (0600, 0700)
stay unreadable even if a mask were ever missed.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

# The parts of the host the sandbox needs: programs, shared libraries and /etc (for
# locale, time zone and certificate data). Symlinks (Debian's merged /usr) are recreated
# as symlinks.
_SYSTEM_PATHS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_SANDBOX_UID_BASE = 1_000_000


def sandbox_home() -> str:
    return os.path.expanduser("~") or "/root"


def runs_as_root() -> bool:
    return os.geteuid() == 0


def sandbox_uid() -> int | None:
    """The unprivileged uid research code runs as, or None when this node is not root.

    One uid per calling process (a Ray worker), so that the process limit, which the
    kernel counts per uid, is this worker's sandbox's alone. Non-root nodes keep their
    own uid: there ``RLIMIT_NPROC`` already applies.
    """
    return _SANDBOX_UID_BASE + os.getpid() if runs_as_root() else None


def python_paths() -> list[str]:
    """The directories the child's Python needs: the interpreter and the virtual environment."""
    paths = {os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix),
             os.path.abspath(sys.prefix), os.path.abspath(sys.base_prefix),
             os.path.dirname(os.path.realpath(sys.executable))}
    return sorted(p for p in paths if os.path.isdir(p))


def child_env() -> dict[str, str]:
    """Only what Python needs. No RAY_*, no tokens, no credentials of the host's user."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": sandbox_home(),
            "TMPDIR": "/tmp", "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def bwrap_argv(hidden_paths: Sequence[str] = ()) -> list[str]:
    """The ``bwrap ...`` prefix that runs a command in the sandbox."""
    home = sandbox_home()
    args = ["bwrap"]
    bound = []
    for path in _SYSTEM_PATHS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
            bound.append(path)
    # /tmp and $HOME are private and empty; writable by the sandbox's own uid.
    args += ["--dev", "/dev", "--proc", "/proc",
             "--perms", "1777", "--tmpfs", "/tmp", "--perms", "1777", "--tmpfs", home]
    for path in hidden_paths:
        # Only what is visible needs a mask: the Ray session and data directories are
        # normally outside the allow-list already.
        if path and os.path.isdir(path) and any(_under(path, root) for root in bound):
            args += ["--tmpfs", path]
    created = {"/", "/tmp", home, *bound}
    for path in python_paths():  # sorted: a prefix comes before what lies under it
        if any(_under(path, root) for root in bound):
            continue  # already visible (through /usr, or an enclosing prefix)
        # bwrap creates missing mount points 0700, which the sandbox's uid could not
        # cross (pyenv under /root): create each ancestor 0755 first.
        ancestors = []
        parent = os.path.dirname(path)
        while parent not in created and parent != "/":
            ancestors.append(parent)
            parent = os.path.dirname(parent)
        for ancestor in reversed(ancestors):
            args += ["--perms", "0755", "--dir", ancestor]
            created.add(ancestor)
        args += ["--ro-bind", path, path]
        bound.append(path)
    args += ["--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
             "--unshare-cgroup-try", "--hostname", "sandbox", "--die-with-parent",
             "--new-session", "--cap-drop", "ALL"]
    if runs_as_root():
        # Kept only until child.py switches to sandbox_uid(); switching drops them.
        args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    args += ["--chdir", "/tmp"]
    return args


def home_entries_allowed() -> set[str]:
    """Names that may appear in the sandbox's $HOME: ancestors of bound-back Python paths."""
    home = sandbox_home().rstrip("/") + "/"
    return {p[len(home):].split("/", 1)[0] for p in python_paths() if p.startswith(home)}
