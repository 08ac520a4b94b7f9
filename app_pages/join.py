"""Join the cluster with your machine (volunteers and admins)."""

import pandas as pd
import streamlit as st

from engine import Role, nodes, verification
from engine.status import NodeStatus
from portal import auth, errors, panels, state, tables, widgets

user = auth.require(Role.VOLUNTEER)
store, settings = state.store(), state.settings()
widgets.header("Join cluster", ":material/add_link:",
               "Lend your machine's spare CPUs: run one command, and it joins the cluster.")


def _rotate() -> None:
    with errors.shown():
        nodes.rotate_signature(store, user.name, actor=user)
        st.session_state["_rotated"] = True


# Engine-written instructions (no user content), rendered as Markdown.
st.markdown(nodes.install_instructions(settings))
with errors.shown():
    # volunteer_approval: until an admin approves them, a volunteer is told so instead.
    waiting = panels.waiting_for_approval(store, settings, user.name)
    command = None if waiting else nodes.join_command(store, settings, user.name)
if command is not None:
    st.warning("This command contains the cluster token. Do not share it.", icon=":material/key:")
    st.code(command, language="bash")
    if st.session_state.pop("_rotated", False):
        st.success("Signature rotated: your machines stop earning until they re-join with the "
                   "command above.", icon=":material/autorenew:")
    st.button("Rotate my signature", icon=":material/autorenew:", on_click=_rotate,
              help="If the command leaked: the old signature stops earning at once.")


@st.fragment(run_every=2)
@errors.guarded
def _my_machines() -> None:
    st.subheader("Your machines")
    with errors.shown():
        mine = nodes.list_nodes(store, user)
        if not mine:
            st.info("No machine of yours has joined yet.", icon=":material/inbox:")
            return
        for n in mine:
            if n.status == NodeStatus.ONLINE:
                panels.node_health(n)
        st.dataframe(tables.node_rows(mine, admin=False), hide_index=True)


_my_machines()

st.subheader("Your trust")
with errors.shown():
    levels = verification.trust_for(store, user)
if levels:
    st.dataframe(pd.DataFrame(levels), hide_index=True)
else:
    st.caption("No verified results of yours yet.")
