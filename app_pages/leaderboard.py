"""The contribution leaderboard (everyone, signed in or not)."""

import pandas as pd
import streamlit as st

from engine import credit
from portal import auth, state, widgets

widgets.header("Leaderboard", ":material/leaderboard:", "Volunteers ranked by credit.")
if auth.current_user() is None:
    widgets.about()
WINDOWS = {"Last 24 h": "24h", "Last 7 days": "7d", "All time": "all"}
window = st.segmented_control("Window", list(WINDOWS), default="All time", key="window")
board = credit.leaderboard(state.store(), WINDOWS[window or "All time"])
if not board:
    st.info("No credit earned in this window yet. Volunteers earn it by joining the cluster.",
            icon=":material/inbox:")
else:
    frame = pd.DataFrame([{
        "rank": row.rank, "volunteer": row.volunteer, "credit": row.credit,
        "verified tasks": row.tasks, "CPU seconds": row.cpu_seconds,
        "nodes": row.nodes, "last active": row.last_active} for row in board])
    # One credit is one CPU second of verified work, kept to the microsecond: light rows
    # earn microseconds, which whole seconds would show as 0.
    st.dataframe(frame, hide_index=True, column_config={
        "credit": st.column_config.NumberColumn("credit (CPU s)", format="%.6f"),
        "CPU seconds": st.column_config.NumberColumn(format="%.6f")})
    st.bar_chart(frame, x="volunteer", y="credit", horizontal=True, height=240,
                 y_label="credit (CPU seconds)")
with st.expander("How credit is earned", expanded=not board):
    st.write(credit.CREDIT_RULE)
