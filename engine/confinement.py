"""Confining Ray itself on the head: its processes reach nothing of value.

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
