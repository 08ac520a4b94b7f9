"""Small rendering pieces shared by pages: numbers, durations, statuses, the page header."""

from __future__ import annotations

import json
import time

import pandas as pd
import streamlit as st

from engine import ProjectStatusView
from engine.errors import ConstellationError
from portal import errors

STATUS_BADGES = {
    "submitted": ("Submitted", "gray", ":material/schedule:"),
    "running": ("Running", "blue", ":material/sync:"),
    "complete": ("Complete", "green", ":material/check_circle:"),
    "failed": ("Failed", "red", ":material/error:"),
    "cancelled": ("Cancelled", "orange", ":material/cancel:"),
}


def header(title: str, icon: str, caption: str | None = None) -> None:
    """Every page's title, in one style."""
    st.title(f"{icon} {title}")
    if caption:
        st.caption(caption)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
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
    label, color, icon = STATUS_BADGES.get(status, (status, "gray", None))
    st.badge(label, color=color, icon=icon)


def progress(view: ProjectStatusView) -> None:
    done = view.rows_succeeded + view.rows_failed
    fraction = done / view.rows_total if view.rows_total else 1.0
    st.progress(min(1.0, fraction), text=f"{done:,} of {view.rows_total:,} rows ({fraction:.0%})")


def counts(view: ProjectStatusView) -> None:
    cols = st.columns(6)
    cols[0].metric("Succeeded", f"{view.rows_succeeded:,}")
    cols[1].metric("Failed", f"{view.rows_failed:,}")
    cols[2].metric("Pending", f"{view.rows_pending:,}")
    cols[3].metric("Rows/s", rate(view.rows_per_second))
    cols[4].metric("Elapsed", duration(view.elapsed_seconds))
    cols[5].metric("ETA", duration(view.eta_seconds) if view.eta_seconds is not None
                   else ("done" if view.status == "complete" else "–"))


def node_health(node) -> None:
    """One node's health in words: checking, ready, or quarantined and why."""
    from engine.status import NodeHealth

    where = f"{node.hostname or node.host} ({node.node_id[:12]})"
    if node.health == NodeHealth.QUARANTINED:
        until = f" It will be checked again after {node.quarantined_until}." \
            if node.quarantined_until else ""
        st.error(f"**{where}** gets no work: {errors.plain(node.health_reason or 'it failed its check')}."
                 f"{until}", icon=":material/block:")
    elif node.health == NodeHealth.CHECKING:
        st.info(f"**{where}** is being checked (Constellation's code, the sandbox, one test row).",
                icon=":material/hourglass_top:")
    else:
        st.success(f"**{where}** is ready and takes work.", icon=":material/check_circle:")


def verification_counts(view: ProjectStatusView) -> None:
    """Replicated projects: verified, inconclusive and pending rows, and executions per row."""
    if view.notice:
        st.warning(errors.plain(view.notice), icon=":material/group_add:")
    if view.replication <= 1:
        st.caption("Replication 1: results are unverified.")
        return
    cols = st.columns(4)
    cols[0].metric("Verified", f"{view.rows_verified:,}",
                   help=(f"{view.rows_trusted:,} of them trusted: computed on the operator's own "
                         f"nodes, accepted without replication." if view.rows_trusted else None))
    cols[1].metric("Inconclusive", f"{view.rows_inconclusive:,}")
    cols[2].metric("Awaiting quorum", f"{view.rows_pending:,}")
    cols[3].metric("Executions per row",
                   "–" if view.executions_per_task is None else f"{view.executions_per_task:.2f}",
                   help=f"Replication {view.replication}: the overhead of verification.")


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


def trial_table(trial) -> None:
    rows = [{"row": r.row, "status": "succeeded" if r.succeeded else "failed",
             "output": json.dumps(r.output) if r.succeeded else None, "error": r.error,
             "time": f"{r.seconds * 1000:.1f} ms"} for r in trial.rows]
    st.dataframe(pd.DataFrame(rows), hide_index=True)
    for r in trial.rows:
        if r.traceback:
            with st.expander(f"Traceback of row {r.row}"):
                st.code(r.traceback, language=None)
    st.caption("The first row's time includes starting the sandbox; the estimate uses the median.")
    if trial.estimated_seconds is not None:
        st.info(f"Estimated run time on the cluster: about {duration(trial.estimated_seconds)} "
                f"({trial.seconds_per_row * 1000:.1f} ms per row over {trial.cpus} CPUs, "
                f"before batching speeds it up).", icon=":material/timer:")


def cluster_health(health: dict) -> None:
    if health["status"] == "online":
        st.caption(f":material/cloud_done: Cluster online: {health['cpus']:g} CPUs")
    else:
        st.warning(errors.plain(f"Cluster {health['status']}: {health['message']}. "
                                f"Submitted projects wait until it is back."),
                   icon=":material/cloud_off:")


def project_panel(store, user, view: ProjectStatusView, cancel, rerun=None) -> None:
    """One project's live status: title, badge, progress, counts, per-node chart, actions."""
    from engine import rows_per_node

    top = st.columns([6, 2, 2, 2], vertical_alignment="center")
    top[0].markdown(f"**{errors.plain(view.title)}** · #{view.id}"
                    + (f" · {errors.plain(view.owner)}" if view.owner != user.name else ""))
    with top[1]:
        status_badge(view.status)
    top[2].page_link("app_pages/results.py", label="Results", icon=":material/table_view:",
                     query_params={"id": view.id})
    if view.status in ("submitted", "running"):
        top[3].button("Cancel", key=f"cancel_{view.id}", icon=":material/cancel:",
                      on_click=cancel, args=(view.id,))
    elif rerun is not None and view.status in ("complete", "failed") and view.rows_failed:
        top[3].button("Re-run failed rows", key=f"rerun_{view.id}", icon=":material/replay:",
                      on_click=rerun, args=(view.id,))
    failure = st.session_state.pop(f"_cancel_error_{view.id}", None)
    if failure is not None:
        errors.show(failure)
    progress(view)
    counts(view)
    verification_counts(view)
    if view.error:
        st.error(errors.plain(view.error), icon=":material/error:")
        if view.error_traceback:
            with st.expander("Traceback"):
                st.code(view.error_traceback, language=None)
    per_node = _nodes_of(store, user, view, rows_per_node)
    if per_node:
        st.vega_lite_chart(pd.DataFrame({"node": [(n or "unknown")[:12] for n in per_node],
                                         "rows": list(per_node.values())}),
                           _ROWS_PER_NODE_CHART, height=160)


# A fixed Vega-Lite spec, not st.bar_chart: that builds and validates an Altair chart on
# every 2-s refresh, 6-20 ms per project panel, most of the Projects page's time.
_ROWS_PER_NODE_CHART = {
    "mark": {"type": "bar", "tooltip": True},
    "encoding": {"y": {"field": "node", "type": "nominal"},
                 "x": {"field": "rows", "type": "quantitative"}},
}


def _nodes_of(store, user, view: ProjectStatusView, rows_per_node) -> dict:
    return per_view(view, "rows_per_node", lambda: rows_per_node(store, user, view.id))


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
    finished = view.status not in ("submitted", "running")
    if hit is None or (not finished and now - hit[0] > _REFRESH_RUNNING_SECONDS):
        hit = cache[key] = (now, compute())
    return hit[1]


def keyset_pager(container, key: str, fetch):
    """Previous/next paging by key: ``fetch(after)`` returns a page with ``next_after``.

    The buttons act in callbacks, before the next run renders, so both are drawn with
    the page they lead to already known.
    """
    stack = st.session_state.setdefault(key, [-1])
    page = fetch(stack[-1])
    with container:
        left, middle, right = st.columns([1, 2, 1], vertical_alignment="center")
        left.button("Previous", key=f"{key}_prev", disabled=len(stack) == 1,
                    icon=":material/chevron_left:", on_click=stack.pop)
        right.button("Next", key=f"{key}_next", disabled=page.next_after is None,
                     icon=":material/chevron_right:", on_click=stack.append,
                     args=(page.next_after,))
        middle.caption(f"Page {len(stack)} of the {page.total:,} failed rows")
    return page


def results_table(page) -> None:
    if not page.rows:
        st.info("No rows to show.", icon=":material/inbox:")
        return
    frame = pd.DataFrame([
        {"row": r.row, **{f"in: {c}": r.values.get(c) for c in page.columns}, "status": r.status,
         "output": None if r.output is None else json.dumps(r.output, ensure_ascii=False),
         "error": r.error, "verification": r.verification} for r in page.rows])
    st.dataframe(frame, hide_index=True)


def error_groups(groups) -> None:
    if not groups:
        st.caption("No failed rows.")
        return
    for group in groups:
        with st.expander(f"{errors.plain(group.kind)}: {group.count:,} rows"):
            st.caption(f"Example: row {group.example_row}")
            st.code(group.example_traceback or group.example_error, language=None)
