"""What a volunteer's machine has, for the tests that start nodes: a clean Python with
only the pinned Ray, a home directory of its own, and a minimal environment.

The README tells a volunteer to install the head's Python minor version and
``pip install ray==<the head's Ray>``, nothing else. A node started from the project's own
``.venv`` would find SQLAlchemy, bcrypt, pandas and the repository, and hide every import
that a real volunteer's node cannot do. So every node in the tests runs from
``volunteer_python()``: a virtual environment made from the system's Python of the head's
minor version with ``python -m venv`` and ``pip install ray==<pinned>``, built once and
reused. Each node runs as an unprivileged user of its own (``node_uid``), as a volunteer
does: the join command confines the node, and refuses root.

It lives under ``/var/tmp/constellation-volunteer`` (``CONSTELLATION_VOLUNTEER_DIR``
overrides it): outside the repository, so that no path into the repository is on a node,
and outside ``/tmp``, because the sandbox replaces ``/tmp`` with an empty one (a node's
interpreter must stay visible in it) and because ``/tmp`` is cleaned more eagerly than
``/var/tmp`` (the venv is worth keeping between runs). Homes are there too, for the same
reasons: the sandbox masks ``$HOME`` and treats a ``$HOME`` under ``/tmp`` differently.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

# Its own ROOT, not support.ROOT: it also runs alone, as a script (see the end).
ROOT = Path(__file__).resolve().parents[2]
BASE = Path(os.environ.get("CONSTELLATION_VOLUNTEER_DIR", "/var/tmp/constellation-volunteer"))
STAMP = "constellation-volunteer.json"
# What the project needs and a volunteer does not have: none may be importable there.
ABSENT = ("sqlalchemy", "bcrypt", "pandas", "streamlit", "engine", "portal")
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"
PIP_SECONDS = 1800

_checked: dict[Path, Path] = {}


def pinned_ray() -> str:
    """The ``ray==`` version in requirements.txt (what volunteers are told to install)."""
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        found = re.match(r"\s*ray\s*==\s*([^\s;#]+)", line)
        if found:
            return found.group(1)
    raise AssertionError("requirements.txt pins no ray== version")


def python_minor() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def venv_dir() -> Path:
    return BASE / f"py{python_minor()}-ray{pinned_ray()}"


def volunteer_python() -> Path:
    """The interpreter of the volunteers' clean venv, built on first use and then reused."""
    venv = venv_dir()
    if venv in _checked:
        return _checked[venv]
    _make_dir(BASE)
    with _locked(BASE / ".lock"):
        problem = _problem(venv)
        if problem is not None:
            if venv.exists():
                print(f"volunteer venv {venv}: {problem}; rebuilding", file=sys.stderr)
                _discard(venv)
            _build(venv)
            problem = _problem(venv)
            assert problem is None, f"the volunteer venv just built is not clean: {problem}"
    _checked[venv] = venv / "bin" / "python"
    return _checked[venv]


def volunteer_home(name: str) -> Path:
    """A fresh, empty home directory for one node; the caller removes it at teardown."""
    homes = BASE / "homes"
    _make_dir(homes)
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=homes))


def volunteer_env(home: Path, extra_pythonpath: Path | None = None, *,
                  venv_bin: Path | None = None) -> dict[str, str]:
    """A volunteer's shell, from scratch: the clean venv first on PATH, their own HOME.

    Nothing is inherited from this process: no RAY_*, no CONSTELLATION_*, no PYTHONPATH,
    no path into the repository. ``extra_pythonpath`` is the volunteer's
    own addition (a directory inside ``home``, see ``copy_into_home``); ``venv_bin``
    replaces the clean venv's bin directory (a node whose venv has something more).
    """
    bin_dir = venv_bin if venv_bin is not None else volunteer_python().parent
    # As ``source bin/activate`` leaves it: the join command binds $VIRTUAL_ENV into the node.
    env = {"PATH": f"{bin_dir}:{SYSTEM_PATH}", "HOME": str(home), "LANG": "C.UTF-8",
           "VIRTUAL_ENV": str(bin_dir.parent)}
    if extra_pythonpath is not None:
        env["PYTHONPATH"] = str(extra_pythonpath)
    leaked = [f"{k}={v}" for k, v in env.items() if str(ROOT) in v]
    assert not leaked, f"a volunteer's environment names the repository: {leaked}"
    return env


def copy_into_home(home: Path, source: Path) -> Path:
    """Copy a node's own extra modules (a file, or a directory's contents) into its home.

    Returns the directory to put on the node's PYTHONPATH, so that no path into the
    repository is on the node.
    """
    target = home / "python-extra"
    target.mkdir(exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, target, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    else:
        shutil.copy2(source, target / source.name)
    return target


def node_environ(pid: int) -> dict[str, str]:
    """The environment a running process started with (``/proc/<pid>/environ``)."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


# -- building ------------------------------------------------------------------------------


def _make_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    # Research code runs as an unprivileged uid: it must reach the venv's interpreter.
    path.chmod(0o755)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One builder at a time (pytest processes, CI jobs sharing the machine)."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def base_python() -> str:
    """The volunteer's interpreter: the system's Python of the head's minor version.

    A volunteer installs it from their distribution (``python3.X``, ``python3.X-venv``)
    and runs the node as their own user, so the venv must not be made from the project's
    interpreter when that lives where only its owner can read (pyenv under /root). A
    machine without it can still run nodes as the same user as the tests.
    """
    for directory in ("/usr/bin", "/usr/local/bin"):
        candidate = os.path.join(directory, f"python{python_minor()}")
        if os.access(candidate, os.X_OK):
            return candidate
    assert os.geteuid() != 0, (
        f"nodes run as an unprivileged user, and need a system python{python_minor()} "
        f"(Debian: apt install python{python_minor()} python{python_minor()}-venv)")
    return os.path.realpath(getattr(sys, "_base_executable", sys.executable))


# -- the volunteer's user --------------------------------------------------------------------

# A volunteer runs the join command as their own user, never root (the node refuses root).
# Tests run by root give each node a uid of its own, from here up; otherwise nodes run as
# the tests' own user.
FIRST_NODE_UID = 42_000
_node_uids: dict[str, int] = {}


def node_uid(name: str) -> int | None:
    """The uid ``name``'s node runs as (None: this process's own)."""
    if os.geteuid() != 0:
        return None
    return _node_uids.setdefault(name, FIRST_NODE_UID + len(_node_uids))


def give_to(path: Path, uid: int | None) -> None:
    """Make ``path`` (and everything in it) the volunteer's own."""
    if uid is None:
        return
    for root, dirs, files in os.walk(path):
        for name in [*dirs, *files]:
            os.lchown(os.path.join(root, name), uid, uid)
    os.lchown(path, uid, uid)


def _problem(venv: Path) -> str | None:
    """Why ``venv`` is not a volunteer's clean venv, or None when it is."""
    stamp = venv / STAMP
    if not stamp.is_file():
        return "no stamp file" if venv.exists() else "missing"
    try:
        stamped = json.loads(stamp.read_text())
    except ValueError:
        return "unreadable stamp file"
    wanted = {"ray": pinned_ray(), "python": python_minor(), "base_python": base_python()}
    if {k: stamped.get(k) for k in wanted} != wanted:
        return f"stamped {stamped}, wanted {wanted}"
    probe = ("import importlib.util, json, sys\n"
             "import ray\n"
             f"absent = {ABSENT!r}\n"
             "print(json.dumps({'ray': ray.__version__, 'prefix': sys.prefix,\n"
             "    'present': [m for m in absent if importlib.util.find_spec(m) is not None]}))\n")
    home = Path(tempfile.mkdtemp(prefix="probe-", dir=BASE))
    try:
        done = subprocess.run([str(venv / "bin" / "python"), "-c", probe], cwd=home,
                              env=volunteer_env(home, venv_bin=venv / "bin"),
                              capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"its python does not run: {exc}"
    finally:
        shutil.rmtree(home, ignore_errors=True)
    if done.returncode != 0:
        return f"the probe failed: {done.stderr.strip()[-2000:]}"
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    if seen["ray"] != pinned_ray():
        return f"it has ray {seen['ray']}, not {pinned_ray()}"
    if seen["present"]:
        return f"it can import {', '.join(seen['present'])}"
    if not (venv / "bin" / "ray").read_text(errors="replace").startswith(f"#!{venv}/bin/python"):
        return "its ray command does not run its own python"
    return None


def _build(venv: Path) -> None:
    """``python -m venv`` with the base interpreter, then ``pip install ray==<pinned>`` only,
    in a temporary sibling directory that is renamed into place when it is complete."""
    started = time.monotonic()
    building = Path(tempfile.mkdtemp(prefix=f".{venv.name}.building-", dir=venv.parent))
    try:
        building.chmod(0o755)
        subprocess.run([base_python(), "-m", "venv", "--prompt", venv.name, str(building)],
                       check=True, stdin=subprocess.DEVNULL, timeout=600)
        # pip's own configuration (index, certificates) comes from this machine: the
        # volunteer installs from the package registry like anyone else. Nothing else.
        pip_env = {k: v for k, v in os.environ.items()
                   if not k.startswith(("PYTHON", "VIRTUAL_ENV", "RAY_", "CONSTELLATION_"))}
        subprocess.run([str(building / "bin" / "python"), "-m", "pip", "install", "--no-compile",
                        "--no-input", f"ray=={pinned_ray()}"],
                       check=True, cwd=building, env=pip_env, stdin=subprocess.DEVNULL,
                       timeout=PIP_SECONDS)
        _relocate(building, venv)
        # Byte-compile with the final paths in the code objects (tracebacks name real files).
        subprocess.run([str(building / "bin" / "python"), "-m", "compileall", "-q", "-f", "-j", "0",
                        "-s", str(building), "-p", str(venv), str(building / "lib")],
                       check=True, env=pip_env, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, timeout=600)
        stamp = {"ray": pinned_ray(), "python": python_minor(), "base_python": base_python(),
                 "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "build_seconds": round(time.monotonic() - started, 1)}
        (building / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
        os.rename(building, venv)  # atomic: a venv at this path is always a complete one
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    print(f"built the volunteer venv {venv} in {stamp['build_seconds']} s", file=sys.stderr)


def _relocate(building: Path, venv: Path) -> None:
    """Point the scripts pip and venv wrote (shebangs, activate, pyvenv.cfg) at the final path."""
    old, new = str(building).encode(), str(venv).encode()
    for path in [*sorted((building / "bin").iterdir()), building / "pyvenv.cfg"]:
        if path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        if old in data and b"\0" not in data:
            mode = path.stat().st_mode
            path.write_bytes(data.replace(old, new))
            path.chmod(mode)


def _discard(venv: Path) -> None:
    aside = Path(tempfile.mkdtemp(prefix=f".{venv.name}.broken-", dir=venv.parent))
    os.rename(venv, aside / "venv")
    shutil.rmtree(aside, ignore_errors=True)


if __name__ == "__main__":  # build it ahead of a test run: python tests/support/volunteer_env.py
    print(volunteer_python())
