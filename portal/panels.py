"""Larger pieces of pages: one project's live panel, node health, security alerts and
volunteer approval, the cluster line, error groups, and the trial run with its estimate."""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from engine import ProjectStatusView, accounts
from engine.errors import Forbidden
from engine.nodes import short_id
from engine.projects import Estimate, Outlook, machine_label, node_label
from engine.status import ClusterStatus, NodeHealth, NodeRole, ProjectStatus, TaskStatus
from portal import errors
from portal.widgets import (act, ask, ask_later, asking, duration, per_view, progress, rate,
                            status_badge, title)

_ACTIVE = (ProjectStatus.SUBMITTED.value, ProjectStatus.RUNNING.value)
_ENDED_UNFINISHED = (ProjectStatus.FAILED.value, ProjectStatus.CANCELLED.value)


def counts(view: ProjectStatusView) -> None:
    cols = st.columns(6)
    cols[0].metric("Succeeded", f"{view.rows_succeeded:,}")
    cols[1].metric("Failed", f"{view.rows_failed:,}")
    if view.status in _ENDED_UNFINISHED:
        cols[2].metric("Not run", f"{view.rows_pending:,}",
                       help=f"The project is {view.status}: these rows will not run.")
    else:
        cols[2].metric("Pending", f"{view.rows_pending:,}")
    cols[3].metric("Rows/s", rate(view.rows_per_second))
    cols[4].metric("Elapsed", duration(view.elapsed_seconds))
    cols[5].metric("ETA", duration(view.eta_seconds) if view.eta_seconds is not None
                   else ("done" if view.status == ProjectStatus.COMPLETE else "–"))


def node_health(node) -> None:
    """One node's health in words: checking, ready, or quarantined and why."""
    where = f"{errors.plain(node.attribution)}'s machine {errors.plain(node_machine(node))}" \
        if node.volunteer_owned else \
        f"{errors.plain(node_machine(node))} ({node.attribution})"
    if node.health == NodeHealth.QUARANTINED:
        until = f" It will be checked again after {node.quarantined_until}." \
            if node.quarantined_until else ""
        reason = errors.readable(node.health_reason) or "it failed its check"
        st.error(f"**{where}** gets no work: {errors.plain(reason)}.{until}", icon=":material/block:")
    elif node.health == NodeHealth.CHECKING:
        st.info(f"**{where}** is being checked (Constellation's code, the sandbox, one test row).",
                icon=":material/hourglass_top:")
    else:
        st.success(f"**{where}** is ready and takes work.", icon=":material/check_circle:")


def node_machine(node) -> str:
    """A node's short machine name for people (its host name), never a bare hex id."""
    return machine_label(node.hostname, node.host, node.node_id)


def security_alerts(alerts, registry) -> None:
    """The Admin page's alerts (``engine.drivers.alerts``), first on the page; nothing at all
    when there are none. ``registry`` (``nodes.list_nodes``) names each alert's node."""
    if not alerts:
        return
    count = f"{len(alerts)} security alert" + ("s" if len(alerts) != 1 else "")
    with st.container(border=True, key="security_alerts"):
        st.error(f"**{count}**: a Ray driver that is not Constellation's connected to the "
                 f"cluster. The node it came through was removed from the cluster and is "
                 f"refused work from now on (unless it was the head's own machine), and its "
                 f"volunteer, where known, was disabled pending your review. After reviewing, "
                 f"re-enable the volunteer on the **Users** tab (choose the account, then "
                 f"**Enable**); a removed node stays removed, so they join again with a new "
                 f"machine or after `ray stop`. If the cluster token may have leaked, rotate it "
                 f"(`python -m engine rotate-cluster-token`).", icon=":material/gpp_maybe:")
        by_id = {n.node_id: n for n in registry}
        st.dataframe(pd.DataFrame([{
            "when": a.raised_at, "kind": a.kind, "node": _alert_node(a.node_id, by_id.get(a.node_id)),
            "volunteer": a.volunteer or "unknown", "detail": a.detail} for a in alerts]),
            hide_index=True, key="security_alerts_table",
            column_config={"detail": st.column_config.TextColumn(width="large")})


def _alert_node(node_id: str | None, node) -> str:
    if not node_id:
        return "unknown"
    if node is None:
        return f"unknown node {short_id(node_id)}"
    if node.attribution == NodeRole.HEAD:
        return f"{node_label(NodeRole.HEAD.value, node.hostname, node.host, node_id)} ({short_id(node_id)})"
    return f"{node_machine(node)} ({short_id(node_id)})"


def waiting_for_approval(store, settings, name: str) -> bool:
    """Whether ``name`` waits for an admin's approval before seeing the join command
    (``volunteer_approval``); if so, says so where the command would be."""
    try:
        accounts.require_may_join(store, settings, name)
    except Forbidden as exc:
        st.info(f"**Waiting for an admin's approval.** {errors.sentence(exc)} Once an admin has "
                f"approved you, your command appears here (reload the page); meanwhile you "
                f"can install what step 1 lists.", icon=":material/hourglass_top:")
        return True
    return False


def verification_counts(view: ProjectStatusView) -> None:
    """Replicated projects: verified, inconclusive and pending rows, and executions per row."""
    if view.notice:
        st.warning(errors.plain(errors.readable(view.notice)), icon=":material/group_add:")
    if view.replication <= 1:
        st.caption("Replication 1: results are unverified.")
        return
    cols = st.columns(4)
    cols[0].metric("Verified", f"{view.rows_verified:,}",
                   help=(f"{view.rows_trusted:,} of them trusted: computed on the operator's own "
                         f"nodes, accepted without replication." if view.rows_trusted else None))
    cols[1].metric("Inconclusive", f"{view.rows_inconclusive:,}")
    cols[2].metric("Not run" if view.status in _ENDED_UNFINISHED else "Awaiting quorum",
                   f"{view.rows_pending:,}")
    cols[3].metric("Executions per row",
                   "–" if view.executions_per_task is None else f"{view.executions_per_task:.2f}",
                   help=f"Replication {view.replication}: the overhead of verification.")


def cluster_health(health: dict) -> None:
    if health["status"] == ClusterStatus.ONLINE:
        st.caption(f":material/cloud_done: Cluster online: {health['cpus']:g} CPUs")
    elif health["status"] == ClusterStatus.NO_DISPATCHER:
        st.warning("No dispatcher is running: submitted projects wait until one runs again "
                   "(`make run` starts it with the portal).", icon=":material/cloud_off:")
    else:
        st.warning(errors.plain(f"Cluster {health['status']}: {errors.readable(health['message'])}. "
                                f"Submitted projects wait until it is back."),
                   icon=":material/cloud_off:")


def project_panel(store, user, view: ProjectStatusView, cancel, rerun=None) -> None:
    """One project's live status: title, badge, progress, counts, per-node chart, actions."""
    from engine import rows_per_node

    top = st.columns([6, 2, 2, 2], vertical_alignment="center")
    top[0].markdown(f"**{title(view.title)}** · #{view.id}"
                    + (f" · {errors.plain(view.owner)}" if view.owner != user.name else ""))
    with top[1]:
        status_badge(view.status)
    top[2].page_link("app_pages/results.py", label="Results", icon=":material/table_view:",
                     query_params={"id": view.id})
    key = f"cancel_{view.id}"
    if view.status in _ACTIVE:
        top[3].button("Cancel", key=key, icon=":material/cancel:", on_click=ask_later,
                      args=(key, view.id), disabled=asking(key) is not None)
    elif rerun is not None and view.status in (ProjectStatus.COMPLETE, ProjectStatus.FAILED) \
            and view.rows_failed:
        top[3].button("Re-run failed rows", key=f"rerun_{view.id}", icon=":material/replay:",
                      on_click=act, args=(rerun, view.id))
    if asking(key) is not None and view.status in _ACTIVE:
        ask(key, f"Cancel project #{view.id}? Its remaining rows will not run; the results "
                 f"stored so far stay.", "Yes, cancel it", cancel, view.id)
    progress(view)
    counts(view)
    verification_counts(view)
    if view.error:
        st.error(errors.plain(errors.readable(view.error)), icon=":material/error:")
        if view.error_traceback:
            with st.expander("Traceback"):
                st.code(errors.readable(view.error_traceback), language=None)
    per_node = per_view(view, "rows_per_node", lambda: rows_per_node(store, user, view.id))
    if per_node:
        st.vega_lite_chart(pd.DataFrame({"node": list(per_node), "rows": list(per_node.values())}),
                           _ROWS_PER_NODE_CHART)


# A fixed Vega-Lite spec, not st.bar_chart: that builds and validates an Altair chart on
# every 2-s refresh, 6-20 ms per project panel, most of the Projects page's time.
_ROWS_PER_NODE_CHART = {
    "mark": {"type": "bar", "tooltip": True},
    "height": {"step": 28},  # one band per node, whatever their number
    "encoding": {"y": {"field": "node", "type": "nominal", "title": "node (volunteer · machine)",
                       "sort": "-x", "axis": {"labelLimit": 320}},
                 "x": {"field": "rows", "type": "quantitative", "title": "rows run"}},
}


def error_groups(groups) -> None:
    if not groups:
        st.caption("No failed rows.")
        return
    for group in groups:
        with st.expander(f"{errors.plain(group.kind)}: {group.count:,} rows"):
            st.caption(f"Example: row {group.example_row}")
            st.code(errors.readable(group.example_traceback or group.example_error), language=None)


# -- the trial run ---------------------------------------------------------------------------


def trial_table(trial) -> None:
    rows = [{"row": r.row, "status": (TaskStatus.SUCCEEDED if r.succeeded else TaskStatus.FAILED).value,
             "output": json.dumps(r.output) if r.succeeded else None,
             "error": errors.readable(r.error), "time": f"{r.seconds * 1000:.1f} ms"}
            for r in trial.rows]
    st.dataframe(pd.DataFrame(rows), hide_index=True)
    for r in trial.rows:
        if r.traceback:
            with st.expander(f"Traceback of row {r.row}"):
                st.code(errors.readable(r.traceback), language=None)


def trial_errors(trial) -> None:
    """Every trial row's error, again (before a run whose trial rows all failed)."""
    for r in trial.rows:
        st.code(f"row {r.row}: {errors.readable(r.error)}", language=None)


def run_estimate(guess: Estimate | None, where: Outlook, replication: int) -> None:
    """The estimated run time, and what it assumes."""
    if guess is None:
        return
    runs = ("once" if guess.runs_per_row == 1 else f"{guess.runs_per_row} times (replication "
            f"{replication}: on {guess.runs_per_row} different volunteers' machines)")
    if replication > 1 and guess.runs_per_row == 1:
        runs += f" (replication {replication}, but the operator's trusted nodes settle rows alone)"
    cpus = f"{guess.cpus:g} CPUs online" if where.nodes else \
        f"{guess.cpus:g} CPUs, when the cluster has them"
    st.info(f"Estimated computing time on the cluster: about {duration(guess.seconds)}. "
            f"It assumes {guess.seconds_per_row * 1000:.1f} ms per row (the median of the trial's "
            f"rows after the first, which also started the sandbox), {guess.rows:,} rows each "
            f"run {runs}, spread over {cpus}. That is the computing alone: starting Ray's "
            f"workers and the sandboxes, and checking nodes that have just joined, add to it"
            + (f" (the last {guess.startup_projects} project"
               f"{'s' if guess.startup_projects > 1 else ''} here took a median of "
               f"{duration(guess.startup_seconds)} from their start to their first results), "
               f"so expect about {duration(guess.seconds + guess.startup_seconds)} in all."
               if guess.startup_seconds is not None else
               " several seconds, so a short project takes noticeably longer."),
            icon=":material/timer:")


def waits_for(where: Outlook) -> None:
    """What a project submitted now would wait for, if anything."""
    if where.waits_for:
        st.warning(errors.plain(f"Submitted now, this project would wait for "
                                f"{errors.readable(where.waits_for)}."), icon=":material/hourglass_top:")
    else:
        st.caption(f":material/check_circle: Submitted now, it starts at once on "
                   f"{where.nodes} node{'s' if where.nodes != 1 else ''} ({where.cpus:g} CPUs).")
