"""Trial runs for browser sessions.

A trial runs ``main`` in a sandboxed child process (bubblewrap) of the portal process. The
engine gives each trial a child of its own and ends it (and waits for it) when the trial
ends; here each trial is tied to its browser session, so that closing the tab ends a
trial still running (an endless ``main`` would otherwise run on for its rows' timeouts),
and a session's new trial ends its previous one.

(Before the engine ended each trial's child, the child stayed warm in a shared pool and
was killed by the kernel when the Streamlit script thread that started it ended: a child
dies with the thread that forked it (``PR_SET_PDEATHSIG``), and Streamlit ends each
script run's thread. Nothing waited for it, so bwrap zombies piled up under the portal.
``tests/portal/test_portal_people.py`` checks that none is left.)
"""

from __future__ import annotations

from typing import Callable

from streamlit.runtime import Runtime
from streamlit.runtime.scriptrunner import get_script_run_ctx

from engine.trial import trial_run


def run(store, settings, user, script, dataset, **options):
    """``engine.trial.trial_run`` for this browser session."""
    ctx = get_script_run_ctx()
    session = ctx.session_id if ctx is not None else None
    return trial_run(store, settings, user, script, dataset, session_key=session,
                     session_alive=_alive(session), **options)


def _alive(session: str | None) -> Callable[[], bool] | None:
    """A thread-safe check that the browser session is still connected (None under AppTest,
    which has no server runtime)."""
    if session is None or not Runtime.exists():
        return None
    runtime = Runtime.instance()
    return lambda: runtime.is_active_session(session)
