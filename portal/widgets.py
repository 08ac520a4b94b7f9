"""Small rendering pieces shared by pages: the page header, the product's description,
numbers, durations, statuses, confirmations and per-session caches."""

from __future__ import annotations

import time
from typing import Callable

import streamlit as st

from engine import ProjectStatusView
from engine.errors import ConstellationError
from engine.projects import one_line
from engine.status import ProjectStatus
from portal import errors

STATUS_BADGES = {
    ProjectStatus.SUBMITTED: ("Submitted", "gray", ":material/schedule:"),
    ProjectStatus.RUNNING: ("Running", "blue", ":material/sync:"),
    ProjectStatus.COMPLETE: ("Complete", "green", ":material/check_circle:"),
    ProjectStatus.FAILED: ("Failed", "red", ":material/error:"),
    ProjectStatus.CANCELLED: ("Cancelled", "orange", ":material/cancel:"),
}

ABOUT = (
    "**Constellation** runs a researcher's Python function over every row of a dataset, on "
    "the spare CPUs of volunteers' machines. **Researchers** upload a script that defines "
    "`main(row)` and a CSV or JSON dataset, try it on a few rows, and download every row's "
    "result. **Volunteers** join a machine to the cluster with one command, and earn credit "
    "for each result that other volunteers' machines confirm."
)


def header(title: str, icon: str, caption: str | None = None) -> None:
    """Every page's title, in one style."""
    st.title(f"{icon} {title}")
    if caption:
        st.caption(caption)


def about() -> None:
    """What Constellation is, for a visitor who has not signed in."""
    st.markdown(ABOUT)


def title(text: str) -> str:
    """A project title for Markdown: one line, its Markdown escaped."""
    return errors.plain(one_line(text))


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if 0 < seconds < 1:
        return "under 1 s"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def rate(rows_per_second: float | None) -> str:
    if rows_per_second is None:
        return "–"
    return f"{rows_per_second:,.0f}" if rows_per_second >= 10 else f"{rows_per_second:.2f}"


def status_badge(status: str) -> None:
    label, color, icon = STATUS_BADGES.get(ProjectStatus(status), (status, "gray", None))
    st.badge(label, color=color, icon=icon)


def progress(view: ProjectStatusView) -> None:
    done = view.rows_succeeded + view.rows_failed
    fraction = done / view.rows_total if view.rows_total else 1.0
    st.progress(min(1.0, fraction), text=f"{done:,} of {view.rows_total:,} rows ({fraction:.0%})")


def checked(slot: str, upload, check):
    """Run ``check`` on an uploaded file once per upload (parsing a large dataset on every
    rerun would be slow) and show its engine error. Returns the checked value or None.

    ``slot`` names the uploader: a new upload replaces only that uploader's parse.
    """
    if upload is None:
        return None
    cache = st.session_state.setdefault("_checked_uploads", {})
    entry = cache.get(slot)
    if entry is None or entry[0] != upload.file_id:
        try:
            entry = (upload.file_id, check(upload), None)
        except ConstellationError as exc:
            entry = (upload.file_id, None, exc)
        cache[slot] = entry
    _, value, error = entry
    if error is not None:
        errors.show(error)
    return value


# -- confirmations --------------------------------------------------------------------------


def ask(key: str, question: str, yes: str, action: Callable[..., str | None], *args) -> None:
    """Ask ``question`` before a destructive ``action(*args)``: "Yes" runs it in a callback,
    so the page that follows (every table on it) already shows its effect; "Keep" forgets
    it. ``action`` returns what to tell the user afterwards."""
    with st.container(border=True, key=f"confirm_{key}"):
        st.warning(question, icon=":material/warning:")
        left, right = st.columns(2)
        left.button(yes, key=f"{key}_yes", type="primary", on_click=_do, args=(key, action, *args),
                    width="stretch")
        right.button("Keep", key=f"{key}_no", on_click=forget, args=(key,), width="stretch")


def asking(key: str):
    """What is waiting for confirmation under ``key`` (set by ``ask_later``), or None."""
    return st.session_state.get(f"_asking_{key}")


def ask_later(key: str, what) -> None:
    """Remember ``what`` to confirm under ``key`` (a button's callback)."""
    st.session_state[f"_asking_{key}"] = what


def forget(key: str) -> None:
    st.session_state.pop(f"_asking_{key}", None)


def _do(key: str, action: Callable[..., str | None], *args) -> None:
    forget(key)
    act(action, *args)


def act(action: Callable[..., str | None], *args) -> None:
    """Run ``action(*args)`` in a callback; its message, or its engine error, shows on the
    next run (``outcome``)."""
    try:
        done = action(*args)
    except ConstellationError as exc:
        st.session_state["_outcome"] = ("error", errors.plain(errors.message(exc)))
        return
    if done:
        st.session_state["_outcome"] = ("success", errors.plain(done))


def outcome() -> None:
    """What the last action did, once."""
    kind, text = st.session_state.pop("_outcome", (None, None))
    if kind == "error":
        st.error(text, icon=":material/error:")
    elif kind == "success":
        st.success(text, icon=":material/check_circle:")


# -- per-session caches -------------------------------------------------------------------

# Counting a million-row project's tasks per node or per error type takes 0.3-0.6 s, too
# much for every 2-s refresh: a finished project's answer never changes, and a running
# project's chart may lag its live counters by a few seconds.
_REFRESH_RUNNING_SECONDS = 10.0


def per_view(view: ProjectStatusView, what: str, compute):
    """``compute()``, remembered in the session for this project: for good once it ended,
    else for a few seconds. Callers compute through the engine, which checks access."""
    cache = st.session_state.setdefault("_per_project", {})
    key = (what, view.id, view.finished_at)
    now = time.monotonic()
    hit = cache.get(key)
    finished = ProjectStatus(view.status).is_terminal()
    if hit is None or (not finished and now - hit[0] > _REFRESH_RUNNING_SECONDS):
        hit = cache[key] = (now, compute())
    return hit[1]
