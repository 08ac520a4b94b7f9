"""Join the cluster with your machine (volunteers and admins)."""

import pandas as pd
import streamlit as st

from engine import Role, nodes
from portal import auth, errors, state, widgets

user = auth.require(Role.VOLUNTEER)
store, settings = state.store(), state.settings()
widgets.header("Join cluster", ":material/add_link:",
               "Lend your machine's spare CPUs: run one command, and it joins the cluster.")
with errors.shown():
    command = nodes.join_command(store, settings, user.name)
    mine = nodes.list_nodes(store, user)
# Engine-written instructions (no user content), rendered as Markdown.
st.markdown(nodes.install_instructions(settings))
st.warning("This command contains the cluster token. Do not share it.", icon=":material/key:")
st.code(command, language="bash")
st.subheader("Your machines")
if not mine:
    st.info("No machine of yours has joined yet.", icon=":material/inbox:")
else:
    st.dataframe(pd.DataFrame([{"node": n.node_id[:12], "host": n.hostname, "status": n.status,
                                "CPUs": n.cpus, "tasks": n.tasks_completed,
                                "last active": n.last_activity} for n in mine]), hide_index=True)
