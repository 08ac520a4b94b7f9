"""How the bubblewrap sandbox around research code is built, and the limits it applies.

``Limits`` is what one sandboxed child may use: node-wide settings, a project's
overrides, and the admin maxima that cap them (``Limits.from_settings``).

``process`` starts every child that runs research code with ``bwrap_argv()``
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

import dataclasses
import os
import re
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Sequence

# The parts of the host the sandbox needs: programs, shared libraries and /etc (for
# locale, time zone and certificate data). Symlinks (Debian's merged /usr) are recreated
# as symlinks.
_SYSTEM_PATHS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_SANDBOX_UID_BASE = 1_000_000
# Linux pids stay below 2**22 (the largest pid_max), so base + slot * 2**22 + pid never
# repeats across processes and slots. 256 slots keep every uid below 2**31.
_PID_SPAN = 1 << 22
UID_SLOTS = 256
# The hard RLIMIT_CPU of one warm child, over all its batches. Raising a hard limit needs
# CAP_SYS_RESOURCE, which the child never has (and which this machine's container denies
# even to the root parent, so prlimit from outside fails too): the limit cannot be
# renewed per batch. The child sets a soft limit per batch under it, and asks to be
# replaced once it has used half of it (see child.py).
_CPU_LIFETIME_SECONDS = 6 * 3600


# Limits an admin maximum caps, with what a project may override.
_CLAMPED = ("row_timeout", "memory_bytes", "output_bytes", "file_bytes", "open_files", "processes")


@dataclass(frozen=True)
class Limits:
    """What one child may use. Build it with ``Limits.from_settings`` (or ``clamped``)."""

    row_timeout: float = 60.0
    # How long the script's top-level code may run while it is imported (the sandbox's own
    # start has a limit of its own, in ``process``).
    import_timeout: float = 60.0
    memory_bytes: int = 2 << 30
    output_bytes: int = 10 << 20
    file_bytes: int = 64 << 20
    open_files: int = 256
    processes: int = 64
    sandbox: str = "bwrap"
    hidden_paths: tuple[str, ...] = ()
    # The project these rows belong to: a warm child serves one project only (None: rows of
    # no project, such as the node check). Not a limit, but part of what keys a child.
    project: int | None = None
    # Run research code without the sandbox when bubblewrap does not work on the node.
    # Only an admin setting may turn this on.
    allow_unsandboxed: bool = False

    def clamped(self, maximum: "Limits", **overrides: Any) -> "Limits":
        """These limits with a project's ``overrides`` (None: keep), each capped at ``maximum``."""
        changes: dict[str, Any] = {}
        for name in _CLAMPED:
            value = overrides.pop(name, None)
            if value is None:
                value = getattr(self, name)
            kind = type(getattr(self, name))
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"the {name.replace('_', ' ')} limit must be a positive number, "
                                 f"not {value!r}")
            changes[name] = min(kind(value), getattr(maximum, name))
        if overrides:
            raise TypeError(f"no such limit: {', '.join(sorted(overrides))}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_settings(cls, settings: Any, *, hidden_paths: Sequence[str] = (),
                      project: int | None = None, **overrides: Any) -> "Limits":
        """The node-wide defaults from ``settings`` with a project's overrides, capped by the admin maxima."""
        defaults = cls(row_timeout=float(settings.row_timeout),
                       import_timeout=float(settings.import_timeout),
                       memory_bytes=settings.memory_limit_mb << 20,
                       output_bytes=settings.output_limit_mb << 20,
                       file_bytes=settings.file_limit_mb << 20,
                       open_files=settings.open_files_limit,
                       processes=settings.process_limit,
                       sandbox=settings.sandbox,
                       hidden_paths=tuple(hidden_paths), project=project,
                       allow_unsandboxed=settings.allow_unsandboxed)
        # Only time, memory and output size may be raised per project; the rest protect
        # the node itself and stay at the node's setting.
        maximum = dataclasses.replace(defaults, row_timeout=float(settings.max_row_timeout),
                                      memory_bytes=settings.max_memory_limit_mb << 20,
                                      output_bytes=settings.max_output_limit_mb << 20)
        return defaults.clamped(maximum, **overrides)

    def storage(self) -> tuple[int, int]:
        """Bytes the sandbox's /tmp and $HOME may hold: they are in memory (tmpfs), so they
        come out of the memory limit, a quarter of it together (3/16 and 1/16)."""
        quarter = self.memory_bytes // 4
        return _pages(quarter * 3 // 4), _pages(quarter // 4)

    def address_space(self) -> int:
        """The research process's address-space limit: the memory limit less its files'."""
        return self.memory_bytes - sum(self.storage())

    def for_child(self) -> dict[str, Any]:
        tmp, home = self.storage()
        return {"memory_bytes": self.address_space(), "file_bytes": self.file_bytes,
                "open_files": self.open_files, "output_bytes": self.output_bytes,
                "processes": self.processes, "cpu_seconds": _CPU_LIFETIME_SECONDS,
                "memory_text": f"memory limit of {size_text(self.memory_bytes)}",
                "storage_text": (f"the sandbox's files may use {size_text(tmp)} in /tmp and "
                                 f"{size_text(home)} in $HOME, out of its memory limit of "
                                 f"{size_text(self.memory_bytes)}")}


def _pages(size: int) -> int:
    return max(1 << 20, size // 4096 * 4096)  # whole pages, and at least 1 MiB


def size_text(size: int) -> str:
    gib = size / (1 << 30)
    return f"{gib:g} GiB" if gib >= 1 else f"{size >> 20} MiB"


def sandbox_home() -> str:
    """$HOME inside the sandbox: the host's, masked by an empty tmpfs, or /tmp when the
    host's cannot be masked on its own (a service account's ``/`` or ``/usr/...``)."""
    home = os.path.abspath(os.path.expanduser("~") or "/")
    if home == "/" or any(_under(home, root) for root in ("/tmp", *_SYSTEM_PATHS)):
        return "/tmp"
    return home


def runs_as_root() -> bool:
    return os.geteuid() == 0


def sandbox_uid(slot: int = 0) -> int | None:
    """The unprivileged uid research code runs as, or None when this node is not root.

    One uid per calling process (a Ray worker) and ``slot`` (a private sandbox of that
    process, such as one trial run in the portal), so that the process limit, which the
    kernel counts per uid, is that sandbox's alone. Non-root nodes keep their own uid:
    there ``RLIMIT_NPROC`` already applies.
    """
    if not 0 <= slot < UID_SLOTS:
        raise ValueError(f"no sandbox uid slot {slot}")
    return _SANDBOX_UID_BASE + slot * _PID_SPAN + os.getpid() if runs_as_root() else None


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


def bwrap_argv(hidden_paths: Sequence[str] = (),
               storage: tuple[int, int] | None = None) -> list[str]:
    """The ``bwrap ...`` prefix that runs a command in the sandbox; ``storage`` bounds the
    sizes of its /tmp and $HOME (``Limits.storage``; bubblewrap 0.7 or later)."""
    home = sandbox_home()
    tmp_size, home_size = storage if storage is not None else (None, None)
    args = ["bwrap"]
    bound = []
    for path in _SYSTEM_PATHS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
            bound.append(path)
    # /tmp and $HOME are private and empty; writable by the sandbox's own uid. A tmpfs is
    # half of the machine's RAM unless told otherwise: each is bounded, and freed with the
    # sandbox's mount namespace when the child ends.
    args += ["--dev", "/dev", "--proc", "/proc", "--perms", "1777"]
    args += (["--size", str(tmp_size)] if tmp_size else []) + ["--tmpfs", "/tmp"]
    if home != "/tmp":
        args += ["--perms", "1777"] + (["--size", str(home_size)] if home_size else [])
        args += ["--tmpfs", home]
    masks = []
    for path in hidden_paths:
        # Only what is visible needs a mask: the Ray session and data directories are
        # normally outside the allow-list already.
        if path and os.path.isdir(path) and any(_under(path, root) for root in bound):
            args += ["--size", "4096", "--tmpfs", path]
            masks.append(path)
    created = {"/", "/tmp", home, *bound}
    for path in python_paths():  # sorted: a prefix comes before what lies under it
        if any(_under(path, root) for root in bound):
            continue  # already visible (through /usr, or an enclosing prefix)
        args += ro_bind_reachable(path, created)
        bound.append(path)
    args += ["--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
             "--unshare-cgroup-try", "--hostname", "sandbox", "--die-with-parent",
             "--new-session", "--cap-drop", "ALL"]
    if runs_as_root():
        # Kept only until child.py switches to sandbox_uid(); switching drops them.
        args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    # bubblewrap's own / and /dev are tmpfs too, unbounded, and owned by the sandbox's user
    # on a node that is not root (measured: writable there): only /tmp and $HOME stay
    # writable. (Not recursive: the mounts on them keep their own flags.)
    for path in ["/", "/dev", *masks]:
        args += ["--remount-ro", path]
    args += ["--chdir", "/tmp"]
    return args


def bwrap_problem() -> str | None:
    """Why this node's bubblewrap cannot build the sandbox, or None.

    ``--size`` (the bound on /tmp and $HOME) came in bubblewrap 0.7.0, and a setuid
    bubblewrap refuses it to users other than root.
    """
    path = shutil.which("bwrap")
    if path is None:
        return "bubblewrap (bwrap) is not installed"
    if os.stat(path).st_mode & stat.S_ISUID and not runs_as_root():
        return ("bubblewrap is installed setuid, and a setuid bubblewrap cannot bound the "
                "size of the sandbox's /tmp and $HOME (install it without the setuid bit)")
    try:
        version = subprocess.run([path, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"bwrap --version failed: {exc}"
    found = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if found and tuple(int(part or 0) for part in found.groups()) < (0, 7, 0):
        return (f"bubblewrap {found.group(0)} cannot bound the size of the sandbox's /tmp and "
                f"$HOME (--size needs bubblewrap 0.7 or later)")
    return None


def ro_bind_reachable(path: str, created: set[str]) -> list[str]:
    """bwrap options that bind ``path`` read-only where a mask hid it, and let any uid reach it.

    bwrap creates missing mount points 0700, which another uid could not cross (a pyenv
    under /root): each missing ancestor is created 0755 first. ``created`` holds the
    directories that exist in the new root already, and is updated.
    """
    args, ancestors = [], []
    parent = os.path.dirname(path)
    while parent not in created and parent != "/":
        ancestors.append(parent)
        parent = os.path.dirname(parent)
    for ancestor in reversed(ancestors):
        args += ["--perms", "0755", "--dir", ancestor]
        created.add(ancestor)
    created.add(path)
    return args + ["--ro-bind", path, path]


def home_entries_allowed() -> set[str]:
    """Names that may appear in the sandbox's $HOME: ancestors of bound-back Python paths."""
    return entries_allowed(sandbox_home())


def entries_allowed(directory: str) -> set[str]:
    """Names that may appear in a masked ``directory``: ancestors of bound-back Python paths
    (a pyenv under $HOME, a virtual environment under /tmp)."""
    prefix = directory.rstrip("/") + "/"
    return {p[len(prefix):].split("/", 1)[0] for p in python_paths() if p.startswith(prefix)}
