"""The sandbox's self-test, and what a node does when the sandbox does not work.

Before the first child, each process runs ``sandbox_status()``: a real sandboxed child
that reports what it can see (the node check runs it again as soon as a node joins, see
``batch.check``). A node where that fails refuses research code (``SandboxUnavailable``)
unless ``Limits.allow_unsandboxed`` says otherwise (``use_sandbox``).
"""

from __future__ import annotations

import json
import logging
import threading

from engine.node import sandbox
from engine.node.process import ChildProcess, SandboxUnavailable
from engine.node.result import RowResult
from engine.node.sandbox import Limits

logger = logging.getLogger(__name__)

_status_lock = threading.Lock()
_status: str | None = None


def sandbox_status(refresh: bool = False) -> str:
    """``"available"``, or ``"unavailable: <reason>"``: a self-test of the sandbox on this node.

    It starts a real sandboxed child, as research code would get, and checks what that
    child sees: no network interface but loopback, nothing of ``$HOME`` and ``/tmp``,
    no ``~/.ray``, no capabilities, no ``RAY_*`` variables, and not uid 0. The answer is
    cached per process (about 50 ms to compute).
    """
    global _status
    with _status_lock:
        if _status is None or refresh:
            _status = _self_test()
            if _status != "available":
                logger.warning("sandbox: %s", _status)
        return _status


def sandbox_available() -> bool:
    """Whether the sandbox works on this node (see ``sandbox_status``)."""
    return sandbox_status() == "available"


def use_sandbox(limits: Limits) -> bool:
    """Whether a new child under ``limits`` runs in the sandbox.

    Raises ``SandboxUnavailable`` when the limits ask for the sandbox and it does not work
    on this node, unless they allow running without it (then it warns, and says no).
    """
    if limits.sandbox != "bwrap":
        return False
    if sandbox_available():
        return True
    if not limits.allow_unsandboxed:
        raise SandboxUnavailable(f"the sandbox does not work on this node ({sandbox_status()}); "
                                 f"research code does not run here")
    logger.warning("sandbox: running research code WITHOUT the sandbox (%s), as allowed",
                   sandbox_status())
    return False


_PROBE = """
import os, socket
def main(row):
    status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    return {"uid": os.getuid(), "cap_eff": int(status["CapEff"].strip(), 16),
            "no_new_privs": status["NoNewPrivs"].strip(),
            "interfaces": sorted(name for _, name in socket.if_nameindex()),
            "home": sorted(os.listdir(os.path.expanduser("~"))), "tmp": sorted(os.listdir("/tmp")),
            "ray_dir": os.path.exists(os.path.expanduser("~/.ray")),
            "ray_env": sorted(k for k in os.environ if k.startswith("RAY_"))}
"""


def _self_test() -> str:
    problem = sandbox.bwrap_problem()
    if problem is not None:
        return f"unavailable: {problem}"
    child = None
    try:
        child = ChildProcess(_PROBE, "sandbox-probe.py", Limits(row_timeout=30.0), sandboxed=True)
        child.start()
        if child.script_error is not None:
            return f"unavailable: the probe failed: {child.script_error[0]}"
        results, end = child.run(["x"], [(0, [0])], False, 30.0)
    except (SandboxUnavailable, OSError) as exc:
        return f"unavailable: {exc}"
    finally:
        if child is not None:
            child.close()
    results = list(map(RowResult._make, results))
    if end != "done" or not results or not results[0].succeeded:
        reason = results[0].error if results else end
        return f"unavailable: the probe failed: {reason}"
    seen = json.loads(results[0].output)
    problems = []
    if seen["interfaces"] not in ([], ["lo"]):
        problems.append(f"network interfaces are visible: {', '.join(seen['interfaces'])}")
    if seen["cap_eff"]:
        problems.append(f"capabilities remain ({seen['cap_eff']:#x})")
    if seen["no_new_privs"] != "1":
        problems.append("no_new_privs is not set")
    if sandbox.runs_as_root() and seen["uid"] == 0:
        problems.append("research code runs as uid 0")
    if seen["ray_dir"] or set(seen["home"]) - sandbox.home_entries_allowed():
        problems.append(f"$HOME is not empty: {', '.join(seen['home'])}")
    if set(seen["tmp"]) - sandbox.entries_allowed("/tmp"):
        problems.append(f"/tmp is not empty: {', '.join(seen['tmp'])}")
    if seen["ray_env"]:
        problems.append(f"Ray variables are visible: {', '.join(seen['ray_env'])}")
    return "unavailable: " + "; ".join(problems) if problems else "available"
