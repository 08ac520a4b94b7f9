"""Confining Ray itself, on the head and on volunteers' machines: its processes reach
nothing of value.

The head (``head_prefix``) and a volunteer's node (``node_command``, which the join
command is made of) are confined differently, because of who starts them: the head by the
operator, often root; a node by the volunteer, as their own unprivileged user.

Ray trusts every holder of the cluster token, and every volunteer holds it: any of them
can run a task on the head (``NodeAffinitySchedulingStrategy(head, soft=False)``), outside
any research sandbox. So the head's Ray processes (GCS, raylet, agents and every worker)
run inside a bubblewrap mount namespace where

- the data directory (database, ``secrets/``), ``/home``, ``/root``, ``/var/tmp`` and the repository's
  ``.streamlit/secrets.toml`` do not exist (empty tmpfs or ``/dev/null`` over them);
- everything else is read-only (``/`` bound read-only): the code, the Python and the venv;
- ``/tmp`` is private, with only this start's own Ray session directory bound back, at
  the same path so that the dispatcher outside reaches the raylet's sockets there; a new
  directory per start, so nothing a task writes is read by the next start;
- when the head is started by root, they run as an unprivileged uid of their own
  (``RAY_UID``), without capabilities: the dispatcher's and the portal's processes (root)
  cannot be read or traced from there, and the mounts cannot be undone.

The row sandbox nests inside: bubblewrap as that uid creates its own user, PID and network
namespaces. That needs the host's ``/proc`` (bound, not a new one: a new proc mount with
bubblewrap's read-only overmounts makes the kernel refuse the inner sandbox's proc mount)
and unprivileged user namespaces.

The dispatcher and the portal, which need the database, run outside, as the operator.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import sys
from pathlib import Path

from engine.node.sandbox import ro_bind_reachable
from engine.settings import Settings

logger = logging.getLogger(__name__)

# The uid the head's Ray processes run as when started by root: no account uses it, and it
# lies below the row sandbox's uids (1,000,000 + the worker's pid).
RAY_UID = 999_999
_REPO = Path(__file__).resolve().parent.parent


def available() -> bool:
    return shutil.which("bwrap") is not None and shutil.which("setpriv") is not None


def prepare_temp_dir(path: Path) -> None:
    """Ray's session directory for one start: private to the confined uid."""
    path.mkdir(mode=0o700, parents=True, exist_ok=False)
    if os.geteuid() == 0:
        os.chown(path, RAY_UID, RAY_UID)


def head_prefix(settings: Settings, ray_temp: Path) -> list[str]:
    """The command that runs the rest of the argv confined (empty when not confining)."""
    if not settings.confine_ray:
        return []
    args = ["bwrap", "--ro-bind", "/", "/", "--bind", "/proc", "/proc", "--dev", "/dev",
            "--perms", "1777", "--tmpfs", "/dev/shm",
            "--tmpfs", "/tmp", "--tmpfs", "/var/tmp", "--tmpfs", "/home",
            "--perms", "0755", "--tmpfs", "/root"]
    args += _python_back("/root")
    hidden = [settings.data_path]
    if settings.db_url.startswith("sqlite:///"):
        hidden.append(Path(settings.db_url.split("///", 1)[1]).resolve().parent)
    for path in hidden:
        if path.is_dir():
            args += ["--tmpfs", str(path)]
    secrets_toml = _REPO / ".streamlit" / "secrets.toml"
    if secrets_toml.exists():
        args += ["--ro-bind", "/dev/null", str(secrets_toml)]
    # This start's session directory only, at its own path (it may lie in a masked one).
    args += ["--bind", str(ray_temp), str(ray_temp), "--die-with-parent", "--"]
    if os.geteuid() == 0:
        # Changing uid clears the parent-death signal bubblewrap set; set it again, so that
        # Ray goes with whoever started it (a killed supervisor or test leaves nothing behind).
        args += ["setpriv", f"--reuid={RAY_UID}", f"--regid={RAY_UID}", "--clear-groups",
                 "--inh-caps=-all", "--bounding-set=-all", "--pdeathsig=SIGTERM", "--"]
    return args


def _python_back(masked: str) -> list[str]:
    """Bind the Python installation and the venv back where a tmpfs masked them."""
    args, created, bound = [], {masked}, []
    for path in sorted({os.path.realpath(sys.prefix), os.path.realpath(sys.base_prefix),
                        os.path.dirname(os.path.realpath(sys.executable))}):
        if not _under(path, masked) or not os.path.isdir(path) or any(_under(path, b) for b in bound):
            continue
        args += ro_bind_reachable(path, created)
        bound.append(path)
    return args


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


# -- a volunteer's node ----------------------------------------------------------------------

# What a node sees of the volunteer's machine: the system, read-only, and nothing else.
# Each is bound only if it exists (``-try``), so one command fits merged-/usr distributions
# (/bin a symlink) and others alike. /sys is there for Ray's CPU and memory detection.
_NODE_SYSTEM = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/sys",
                "/run/systemd/resolve")  # the last: where systemd-resolved puts resolv.conf

# Run inside the node's sandbox by ``sh -c``: refuse root (see node_command), start Ray
# without --block, then stay until the raylet ends. ``ray stop`` ends the raylet, so this
# shell returns, and bubblewrap, as the PID namespace's init, takes every process left in it
# along (a task's daemon included). ``ray start --block`` would not do: after ``ray stop``
# it keeps running (it counts SIGTERM as a clean exit), and so would whatever a task left.
NODE_WATCH = (
    'if [ "$(id -u)" = 0 ]; then echo "Constellation: run this as your own user, not as root" >&2; exit 1; fi; '
    'ray start "$@" || exit; '
    'for p in /proc/[0-9]*; do [ "$(cat "$p/comm" 2>/dev/null)" = raylet ] && r=${p#/proc/}; done; '
    'while kill -0 "$r" 2>/dev/null; do sleep 2; done'
)


# Expanded by the volunteer's shell, not by us: the venv they activated, where ``ray`` is.
VENV = "$VIRTUAL_ENV"


def node_command(env: dict[str, str], ray_options: list[str]) -> str:
    """The shell command that starts a confined volunteer's node: ``env`` assigned, then
    bubblewrap, then ``ray start`` with ``ray_options``. Options appended to the command
    go to ``ray start`` too."""
    words = [f"{key}={shlex.quote(value)}" for key, value in env.items()]
    words += ['"$VIRTUAL_ENV"' if word == VENV else shlex.quote(word)
              for word in node_argv(ray_options)]
    return " ".join(words)


def node_argv(ray_options: list[str]) -> list[str]:
    """The argv of a confined volunteer's node (``VENV`` stands for the venv's path).

    Inside, the node has the system read-only, the volunteer's virtual environment
    (``$VIRTUAL_ENV``, expanded by the volunteer's shell) read-only, a private /tmp for Ray
    (a tmpfs: nothing stays on disk), and no home directory, /var/tmp, /run, /mnt, /media,
    /opt or /srv. It has its own user, PID and IPC namespaces: another process of the
    volunteer is neither visible nor readable from inside, and ending the PID namespace's
    init (bubblewrap) ends everything in it. The network is the machine's: Ray needs it.

    The row sandbox nests inside. That works when an unprivileged user starts the node,
    and is refused by the kernel when root does (the outer user namespace then keeps
    capabilities or locks its /proc mounts), so the node refuses to start as root.
    """
    args = ["bwrap", "--die-with-parent", "--unshare-user", "--unshare-pid", "--unshare-ipc"]
    for path in _NODE_SYSTEM:
        args += ["--ro-bind-try", path, path]
    args += ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
             "--ro-bind-try", VENV, VENV, "--chdir", "/tmp",
             "--", "sh", "-c", NODE_WATCH, "constellation-node"]
    return args + ray_options
