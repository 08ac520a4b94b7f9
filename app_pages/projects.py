"""Projects (researchers: their own; admins: everyone's): a table of them all, and one
project's live panel at ``?id=N``."""

import streamlit as st

from engine import Role, cancel_project, list_projects, project_status, rerun_failed_rows
from engine.errors import NotFound
from engine.status import ProjectStatus
from portal import auth, errors, panels, state, tables, widgets

user = auth.require(Role.RESEARCHER)
store = state.store()
widgets.header("Projects", ":material/monitoring:")
selected = st.query_params.get("id")


def _cancel(project_id: int) -> str:
    cancel_project(store, auth.current_user(), project_id)
    return f"Project {project_id} is cancelled."


def _rerun(project_id: int) -> str:
    count = rerun_failed_rows(store, auth.current_user(), project_id)
    return f"Project {project_id}: {count:,} failed rows will run again."


@st.fragment(run_every=2)
@errors.guarded
def one_project() -> None:
    # A fragment rerun skips the entry point: look the account up again, so that a user
    # disabled meanwhile stops seeing updates at once.
    viewer = auth.require(Role.RESEARCHER)
    panels.cluster_health(store.cluster_health())
    widgets.outcome()
    with errors.shown():
        view = project_status(store, viewer, int(selected))
    with st.container(border=True, key=f"project_{view.id}"):
        panels.project_panel(store, viewer, view, cancel=_cancel, rerun=_rerun)


@st.fragment(run_every=2)
@errors.guarded
def all_projects(search: str, statuses: list[str]) -> None:
    viewer = auth.require(Role.RESEARCHER)
    panels.cluster_health(store.cluster_health())
    with errors.shown():
        views = list_projects(store, viewer)
    if not views:
        st.info("No projects yet: submit one.", icon=":material/inbox:")
        st.page_link("app_pages/submit.py", label="Submit a project", icon=":material/upload:")
        return
    shown = tables.filter_projects(views, search, statuses)
    active = sum(1 for v in views if not ProjectStatus(v.status).is_terminal())
    st.caption(f"{len(shown):,} of {len(views):,} projects shown; {active:,} submitted or running. "
               f"Select a row to follow that project; click a column's name to sort by it.")
    chosen = tables.projects_table(shown, show_owner=any(v.owner != viewer.name for v in views))
    if chosen is not None:
        st.query_params["id"] = str(chosen)
        st.rerun(scope="app")


if selected is not None:
    st.page_link("app_pages/projects.py", label="All projects", icon=":material/arrow_back:")
    with errors.shown():
        if not selected.isdigit():
            raise NotFound(f"project {selected} not found")
        project_status(store, user, int(selected))  # not found -> message, page stops
    one_project()
else:
    left, right = st.columns([3, 2])
    search = left.text_input("Search", key="project_search", placeholder="a title, or a project's #")
    statuses = right.multiselect("Status", tables.status_choices(), key="project_statuses",
                                 placeholder="any status")
    all_projects(search, statuses)
