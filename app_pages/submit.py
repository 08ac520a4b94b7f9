"""Submit a project: upload, check, preview, trial run, then run on the cluster."""

import pandas as pd
import streamlit as st

from engine import Role, projects, submit_project
from engine.dataset import parse_dataset
from engine.script import check_script
from engine.trial import TRIAL_ROWS
from engine.verification import MAX_REPLICATION, Comparison
from portal import auth, errors, panels, state, trials, widgets

user = auth.require(Role.RESEARCHER)
settings, store = state.settings(), state.store()
widgets.header("Submit a project", ":material/upload:",
               "A script that defines main(row), and a CSV, JSON or JSON Lines dataset.")

title = st.text_input("Title", key="title", max_chars=200)
description = st.text_area("Description", key="description", height=80)
script_file = st.file_uploader("Script", type=["py"], key="script",
                               help="Python that defines main(row); row is a dict of column to value.")
script = widgets.checked("script", script_file, lambda f: check_script(
    f.name, f.getvalue(), max_bytes=settings.max_script_bytes))
dataset_file = st.file_uploader("Dataset", type=["csv", "json", "jsonl", "ndjson"], key="dataset")
dataset = widgets.checked("dataset", dataset_file, lambda f: parse_dataset(
    f.name, f.getvalue(), max_bytes=settings.max_upload_bytes))
with st.expander("Advanced settings"):
    batch_size = st.number_input(
        "Batch size (rows per Ray call)", min_value=1, max_value=1_000_000, value=None, step=100,
        key="batch_size", placeholder="adaptive",
        help="Empty: batches are sized from the measured time of the rows (about "
             f"{settings.batch_seconds:g} s of work each). A number fixes every batch at that size.")
    row_timeout = st.number_input("Row timeout (seconds)", min_value=1.0,
                                  max_value=float(settings.max_row_timeout),
                                  value=float(settings.row_timeout), step=10.0, key="row_timeout")
    replication = st.number_input(
        "Replication (volunteers who must agree on each row)", min_value=1, max_value=MAX_REPLICATION,
        value=settings.replication, step=1, key="replication",
        help="Each row runs on this many different volunteers' machines and is verified when "
             "their outputs agree. 1 turns verification off.")
    comparison = st.radio("Outputs agree when they are", [c.value for c in Comparison], key="comparison",
                          horizontal=True, captions=("identical", "numbers within a relative tolerance"))
    tolerance = st.number_input("Relative tolerance", min_value=0.0, max_value=0.99, value=1e-9,
                                format="%g", key="tolerance", disabled=comparison != Comparison.NUMERIC)

if dataset is not None:
    st.subheader(f"Preview: {len(dataset):,} rows, {len(dataset.columns)} columns")
    st.dataframe(pd.DataFrame(dataset.rows[:20], columns=dataset.columns), hide_index=False)

if script is None or dataset is None:
    st.stop()

upload_key = (script_file.file_id, dataset_file.file_id, float(row_timeout))
st.subheader("Trial run")
st.caption(f"main runs on the first {TRIAL_ROWS} rows in the same sandbox the cluster uses.")
if st.button(f"Trial run on {min(TRIAL_ROWS, len(dataset))} rows", key="trial_button",
             icon=":material/science:"):
    with st.spinner("Running main in the sandbox…"), errors.shown():
        st.session_state["trial"] = (upload_key, trials.run(store, settings, user, script, dataset,
                                                            row_timeout=row_timeout))
trial = st.session_state.get("trial")
if trial is None or trial[0] != upload_key:
    st.info("Run the trial first: it shows what main returns before the whole dataset runs.",
            icon=":material/info:")
    st.stop()
trial = trial[1]
if trial.script_error:
    st.error(errors.plain(f"The script fails while it is imported: "
                          f"{errors.readable(trial.script_error)}"), icon=":material/error:")
    if trial.script_traceback:
        st.code(errors.readable(trial.script_traceback), language=None)
    st.stop()
panels.trial_table(trial)
where = projects.outlook(store, settings, int(replication))
panels.run_estimate(projects.estimate([r.seconds for r in trial.rows], len(dataset), where,
                                     projects.startup_seconds(store)),
                    where, int(replication))
panels.waits_for(where)

all_failed = bool(trial.rows) and not any(r.succeeded for r in trial.rows)
submitted = st.session_state.get("submitted_projects", {})
confirmed = False
if upload_key in submitted:
    project_id = submitted[upload_key]
    st.success(f"Project {project_id} submitted.", icon=":material/check_circle:")
    st.page_link("app_pages/projects.py", label="Follow its progress", icon=":material/monitoring:",
                 query_params={"id": project_id})
    st.stop()
if widgets.asking("run") == upload_key:
    st.warning(f"All {len(trial.rows)} trial rows failed. Run all {len(dataset):,} rows anyway? "
               f"They will probably fail the same way:", icon=":material/warning:")
    panels.trial_errors(trial)
    left, right = st.columns(2)
    confirmed = left.button("Run anyway", type="primary", key="run_anyway",
                            icon=":material/rocket_launch:")
    right.button("Back", key="run_back", on_click=widgets.forget, args=("run",))
    if not confirmed:
        st.stop()
    widgets.forget("run")
elif st.button("Run on the cluster", type="primary", key="run_button", icon=":material/rocket_launch:"):
    if all_failed:
        widgets.ask_later("run", upload_key)
        st.rerun()
    confirmed = True
if confirmed:
    with errors.shown():
        project_id = submit_project(
            store, settings, user, title=title or script.name, description=description,
            script_name=script.name, script_bytes=script_file.getvalue(),
            dataset_name=dataset.name, dataset_bytes=dataset_file.getvalue(),
            batch_size=None if batch_size is None else int(batch_size), row_timeout=float(row_timeout),
            replication=int(replication), comparison=comparison, tolerance=float(tolerance))
    st.session_state["submitted_projects"] = {**submitted, upload_key: project_id}
    st.success(f"Project {project_id} submitted.", icon=":material/check_circle:")
    st.page_link("app_pages/projects.py", label="Follow its progress", icon=":material/monitoring:",
                 query_params={"id": project_id})
