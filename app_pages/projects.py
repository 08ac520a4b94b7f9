"""Projects and their live status (researchers: their own; admins: everyone's)."""

import streamlit as st

from engine import Role, cancel_project, list_projects, project_status, rerun_failed_rows
from engine.errors import ConstellationError, NotFound
from portal import auth, errors, state, widgets

user = auth.require(Role.RESEARCHER)
store = state.store()
widgets.header("Projects", ":material/monitoring:")

selected = st.query_params.get("id")
if selected is not None:
    st.page_link("app_pages/projects.py", label="All projects", icon=":material/arrow_back:")
    with errors.shown():
        if not selected.isdigit():
            raise NotFound(f"project {selected} not found")
        project_status(store, user, int(selected))  # not found -> message, page stops


@st.fragment(run_every=2)
def live() -> None:
    # A fragment rerun skips the entry point: look the account up again, so that a user
    # disabled meanwhile stops seeing updates at once.
    viewer = auth.require(Role.RESEARCHER)
    widgets.cluster_health(store.cluster_health())
    with errors.shown():
        views = [project_status(store, viewer, int(selected))] if selected is not None \
            else list_projects(store, viewer)
    if not views:
        st.info("No projects yet: submit one.", icon=":material/inbox:")
        st.page_link("app_pages/submit.py", label="Submit a project", icon=":material/upload:")
        return
    for view in views:
        with st.container(border=True, key=f"project_{view.id}"):
            widgets.project_panel(store, viewer, view, cancel=_cancel, rerun=_rerun)


def _cancel(project_id: int) -> None:
    # A button callback: it runs before the fragment renders, which then shows the result.
    try:
        cancel_project(store, auth.current_user(), project_id)
    except ConstellationError as exc:
        st.session_state[f"_cancel_error_{project_id}"] = exc



def _rerun(project_id: int) -> None:
    try:
        rerun_failed_rows(store, auth.current_user(), project_id)
    except ConstellationError as exc:
        st.session_state[f"_cancel_error_{project_id}"] = exc


live()
