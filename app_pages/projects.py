"""Projects and their live status (researchers: their own; admins: everyone's)."""

import streamlit as st

from engine import Role, cancel_project, list_projects, project_status
from engine.errors import ConstellationError, NotFound
from portal import auth, errors, state, widgets

user = auth.require(Role.RESEARCHER)
store = state.store()
widgets.header("Projects", ":material/monitoring:")
widgets.cluster_health(store.cluster_health())

selected = st.query_params.get("id")
if selected is not None:
    st.page_link("app_pages/projects.py", label="All projects", icon=":material/arrow_back:")
    with errors.shown():
        if not selected.isdigit():
            raise NotFound(f"project {selected} not found")
        project_status(store, user, int(selected))  # not found -> message, page stops


@st.fragment(run_every=2)
def live() -> None:
    if selected is not None:
        views = [project_status(store, user, int(selected))]
    else:
        views = list_projects(store, user)
    if not views:
        st.info("No projects yet: submit one.", icon=":material/inbox:")
        st.page_link("app_pages/submit.py", label="Submit a project", icon=":material/upload:")
        return
    for view in views:
        with st.container(border=True, key=f"project_{view.id}"):
            widgets.project_panel(store, user, view, cancel=_cancel)


def _cancel(project_id: int) -> None:
    # A button callback: it runs before the fragment renders, which then shows the result.
    try:
        cancel_project(store, user, project_id)
    except ConstellationError as exc:
        st.session_state[f"_cancel_error_{project_id}"] = exc


live()
