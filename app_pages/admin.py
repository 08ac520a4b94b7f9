"""Administration: users, all projects, nodes (admins only)."""

import pandas as pd
import streamlit as st

from engine import Role, accounts, cancel_project, list_projects, nodes, verification
from engine.status import NodeHealth
from portal import auth, errors, state, widgets

user = auth.require(Role.ADMIN)
store = state.store()
widgets.header("Admin", ":material/admin_panel_settings:")
users_tab, projects_tab, nodes_tab, trust_tab = st.tabs(["Users", "Projects", "Nodes", "Trust"])

with users_tab:
    with errors.shown():
        users = accounts.list_users(store, user)
    st.dataframe(pd.DataFrame([u.to_dict() for u in users]), hide_index=True)
    enabled = [u.name for u in users if not u.disabled and u.name != user.name]
    if enabled:
        with st.form("disable_user"):
            name = st.selectbox("Disable an account", enabled, key="disable_name")
            if st.form_submit_button("Disable", icon=":material/block:"):
                with errors.shown():
                    accounts.disable_user(store, user, name)
                st.success(f"User {name} is disabled.", icon=":material/check_circle:")

with projects_tab:
    with errors.shown():
        projects = list_projects(store, user)
    if not projects:
        st.info("No projects yet.", icon=":material/inbox:")
    else:
        st.dataframe(pd.DataFrame([{
            "id": p.id, "title": p.title, "owner": p.owner, "status": p.status,
            "rows": p.rows_total, "succeeded": p.rows_succeeded, "failed": p.rows_failed,
            "created": p.created_at} for p in projects]), hide_index=True)
        active = [p for p in projects if p.status in ("submitted", "running")]
        if active:
            with st.form("cancel_project"):
                chosen = st.selectbox("Cancel a project", active, key="cancel_choice",
                                      format_func=lambda p: f"#{p.id} {p.title} ({p.owner})")
                if st.form_submit_button("Cancel project", icon=":material/cancel:"):
                    with errors.shown():
                        cancel_project(store, user, chosen.id)
                    st.success(f"Project {chosen.id} is cancelled.", icon=":material/check_circle:")

with nodes_tab:
    with errors.shown():
        registry = nodes.list_nodes(store, user)
    if not registry:
        st.info("No node has joined yet.", icon=":material/inbox:")
    else:
        for n in registry:
            if n.status == "online" and n.health == NodeHealth.QUARANTINED:
                widgets.node_health(n)
        st.dataframe(pd.DataFrame([{
            "node": n.node_id, "owner": n.attribution, "status": n.status, "host": n.hostname,
            "health": n.health, "why": n.health_reason, "trusted": n.trusted,
            "CPUs": n.cpus, "sandbox": n.sandbox, "tasks": n.tasks_completed,
            "last seen": n.last_seen} for n in registry]), hide_index=True)
        volunteers_nodes = [n for n in registry if n.attribution not in ("head", "unclaimed")]
        if volunteers_nodes:
            with st.form("trust_node"):
                chosen = st.selectbox(
                    "Trust a node: one of your own machines, whose results need no replication "
                    "(they earn no credit)", volunteers_nodes, key="trust_choice",
                    format_func=lambda n: f"{n.attribution} on {n.hostname} ({n.node_id[:12]})"
                                          + (" - trusted" if n.trusted else ""))
                if st.form_submit_button("Trust / stop trusting", icon=":material/verified_user:"):
                    with errors.shown():
                        nodes.set_trusted(store, chosen.node_id, not chosen.trusted, actor=user)
                    st.rerun()

with trust_tab:
    st.caption(f"A volunteer whose last {verification.TRUST_STREAK} results for a script all agreed "
               f"with the quorum is trusted: their rows are replicated only as spot checks.")
    with errors.shown():
        levels = verification.trust_for(store, user)
    if not levels:
        st.info("No verified results yet.", icon=":material/inbox:")
    else:
        st.dataframe(pd.DataFrame(levels), hide_index=True)
