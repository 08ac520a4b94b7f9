"""Administration: security alerts, users, all projects, nodes (admins only).

Security alerts, when there are any, come first, above the tabs. Every action runs in a button's callback, before the page is drawn, so the tables below
it already show its effect; destructive ones (disable, cancel) ask first.
"""

import pandas as pd
import streamlit as st

from engine import Role, accounts, cancel_project, drivers, list_projects, nodes, verification
from engine.projects import one_line
from engine.status import NodeHealth, NodeStatus, ProjectStatus
from portal import auth, errors, panels, state, tables, widgets

user = auth.require(Role.ADMIN)
store, settings = state.store(), state.settings()
widgets.header("Admin", ":material/admin_panel_settings:")
widgets.outcome()
with errors.shown():
    alerts = drivers.alerts(store, user)
    registry = nodes.list_nodes(store, user)
panels.security_alerts(alerts, registry)
users_tab, projects_tab, nodes_tab, trust_tab = st.tabs(["Users", "Projects", "Nodes", "Trust"])


def _disable(name: str) -> str:
    accounts.disable_user(store, auth.current_user(), name)
    return f"User {name} is disabled; their sessions have ended."


def _enable() -> str:
    name = st.session_state["user_choice"]
    accounts.enable_user(store, auth.current_user(), name)
    return f"User {name} is enabled again; they sign in anew."


def _approve() -> str:
    name = st.session_state["approve_choice"]
    accounts.approve_volunteer(store, auth.current_user(), name)
    return f"Volunteer {name} is approved: their Join page shows them the join command."


def _grant() -> str:
    name, role = st.session_state["user_choice"], st.session_state["grant_role"]
    accounts.grant_role(store, auth.current_user(), name, Role(role))
    return f"User {name} now has the {role} role."


def _cancel(project_id: int) -> str:
    cancel_project(store, auth.current_user(), project_id)
    return f"Project {project_id} is cancelled."


def _trust() -> str:
    # The choice as it is now (a callback's arguments are the run's that drew the button).
    node_id = st.session_state["trust_choice"]
    trusted = not next(n.trusted for n in nodes.list_nodes(store, auth.current_user())
                       if n.node_id == node_id)
    nodes.set_trusted(store, node_id, trusted, actor=auth.current_user())
    return f"Node {nodes.short_id(node_id)} is {'trusted' if trusted else 'no longer trusted'}."


def _chosen(key: str):
    """A callback's way to read a choice as it is now, for ``ask_later``."""
    widgets.ask_later(key, st.session_state[f"{key}_choice"])


with users_tab:
    with errors.shown():
        waiting = accounts.awaiting_approval(store, settings, user)
        users = accounts.list_users(store, user)
    if waiting:
        st.info(f"**{len(waiting)} volunteer{'s' if len(waiting) != 1 else ''} waiting for your "
                f"approval.** `volunteer_approval` is on: they see the join command, and the "
                f"cluster token in it, only once you approve them.", icon=":material/how_to_reg:")
        st.dataframe(pd.DataFrame([{"name": u.name, "email": u.email, "registered": u.created_at}
                                   for u in waiting]), hide_index=True, key="awaiting_table")
        left, right = st.columns([3, 2], vertical_alignment="bottom")
        left.selectbox("Volunteer to approve", [u.name for u in waiting], key="approve_choice")
        right.button("Approve", key="approve_volunteer", icon=":material/how_to_reg:",
                     on_click=widgets.act, args=(_approve,))
    st.dataframe(pd.DataFrame([{
        "name": u.name, "email": u.email, "roles": ", ".join(u.roles),
        "status": "disabled" if u.disabled else "active", "created": u.created_at,
        "note": u.note} for u in users]), hide_index=True,
        column_config={"note": st.column_config.TextColumn(width="large")})
    local = next((u for u in users if u.name == accounts.LOCAL_ADMIN and u.note), None)
    if local is not None:
        st.caption(f"**{accounts.LOCAL_ADMIN}** is {local.note}.")
    others = [u for u in users if u.name != user.name and not u.note]
    if others:
        by_name = {u.name: u for u in others}
        left, middle, right = st.columns([3, 2, 2], vertical_alignment="bottom")
        name = left.selectbox("Account", list(by_name), key="user_choice")
        chosen = by_name[name]
        if chosen.disabled:
            middle.button("Enable", key="enable_user", icon=":material/check_circle:",
                          on_click=widgets.act, args=(_enable,))
        else:
            middle.button("Disable", key="disable_user", icon=":material/block:",
                          on_click=_chosen, args=("user",))
        missing = [r.value for r in Role if r.value not in chosen.roles]
        if missing:
            role = right.selectbox("Add a role", missing, key="grant_role")
            right.button(f"Add {role}", key="grant_button", icon=":material/add:",
                         on_click=widgets.act, args=(_grant,))
        pending = widgets.asking("user")
        if pending is not None:
            widgets.ask("user", f"Disable {pending}? They can no longer sign in, their open "
                                   f"sessions end, and their nodes stop earning. You can enable "
                                   f"the account again later.", f"Yes, disable {pending}",
                        _disable, pending)

with projects_tab:
    with errors.shown():
        projects = list_projects(store, user)
    if not projects:
        st.info("No projects yet.", icon=":material/inbox:")
    else:
        st.dataframe(pd.DataFrame([{
            "id": p.id, "title": one_line(p.title), "owner": p.owner, "status": p.status,
            "rows": p.rows_total, "succeeded": p.rows_succeeded, "failed": p.rows_failed,
            "created": p.created_at} for p in projects]), hide_index=True)
        active = [p for p in projects if not ProjectStatus(p.status).is_terminal()]
        if active:
            left, right = st.columns([3, 2], vertical_alignment="bottom")
            by_id = {p.id: p for p in active}
            chosen = left.selectbox("Cancel a project", list(by_id), key="cancel_choice",
                                    format_func=lambda i: f"#{i} {one_line(by_id[i].title)} "
                                                          f"({by_id[i].owner})")
            right.button("Cancel project", key="cancel_project", icon=":material/cancel:",
                         on_click=_chosen, args=("cancel",))
        pending = widgets.asking("cancel")
        if pending is not None:
            widgets.ask("cancel", f"Cancel project #{pending}? Its remaining rows will not run; "
                                  f"the results stored so far stay.", "Yes, cancel it",
                        _cancel, pending)

with nodes_tab:
    if not registry:
        st.info("No node has joined yet.", icon=":material/inbox:")
    else:
        for n in registry:
            if n.status == NodeStatus.ONLINE and n.health == NodeHealth.QUARANTINED:
                panels.node_health(n)
        st.dataframe(tables.node_rows(registry, admin=True), hide_index=True)
        volunteers_nodes = [n for n in registry if n.volunteer_owned]
        if volunteers_nodes:
            left, right = st.columns([3, 2], vertical_alignment="bottom")
            by_id = {n.node_id: n for n in volunteers_nodes}
            chosen = left.selectbox(
                "Trust a node: one of your own machines, whose results need no replication "
                "(they earn no credit)", list(by_id), key="trust_choice",
                format_func=lambda i: f"{by_id[i].attribution} on {panels.node_machine(by_id[i])} "
                                      f"({nodes.short_id(i)})" + (" - trusted" if by_id[i].trusted else ""))
            right.button("Trust / stop trusting", key="trust_button", icon=":material/verified_user:",
                         on_click=widgets.act, args=(_trust,))

with trust_tab:
    st.caption(f"A volunteer whose last {verification.TRUST_STREAK} results for a script all agreed "
               f"with the quorum is trusted: their rows are replicated only as spot checks.")
    with errors.shown():
        levels = verification.trust_for(store, user)
    if not levels:
        st.info("No verified results yet.", icon=":material/inbox:")
    else:
        st.dataframe(pd.DataFrame(levels), hide_index=True)
