"""A project's results: a paged table, failed rows, errors by type, downloads."""

import io

import streamlit as st

from engine import Role, export_results, list_projects, project_status
from engine.errors import NotFound
from engine.results import error_groups, failed_page, results_page
from portal import auth, errors, state, widgets

user = auth.require(Role.RESEARCHER)
store = state.store()
widgets.header("Results", ":material/table_view:")

selected = st.query_params.get("id")
if selected is None:
    with errors.shown():
        projects = list_projects(store, user)
    if not projects:
        st.info("No projects yet: submit one.", icon=":material/inbox:")
        st.page_link("app_pages/submit.py", label="Submit a project", icon=":material/upload:")
        st.stop()
    chosen = st.selectbox("Project", projects, format_func=lambda v: f"#{v.id} {v.title}",
                          key="results_project")
    project_id = chosen.id
else:
    with errors.shown():
        if not selected.isdigit():
            raise NotFound(f"project {selected} not found")
        project_id = int(selected)

with errors.shown():
    view = project_status(store, user, project_id)
st.markdown(f"**{errors.plain(view.title)}** · #{view.id}")
widgets.status_badge(view.status)
widgets.progress(view)

controls = st.columns([2, 2, 3], vertical_alignment="bottom")
failed_only = controls[0].toggle("Failed rows only", key="failed_only")
page_size = controls[1].selectbox("Rows per page", (50, 100, 500), index=1, key="page_size")
with errors.shown():
    if failed_only:
        page = widgets.keyset_pager(
            controls[2], f"failed_{project_id}_{page_size}",
            lambda after: failed_page(store, user, project_id, after=after, limit=page_size))
    else:
        pages = max(1, -(-view.rows_total // page_size))
        number = controls[2].number_input(f"Page (of {pages:,})", min_value=1, max_value=pages,
                                          value=1, step=1, key=f"page_{project_id}_{page_size}")
        page = results_page(store, user, project_id, start=(number - 1) * page_size, limit=page_size)
widgets.results_table(page)

st.subheader("Errors by type")
with errors.shown():
    groups = widgets.per_view(view, "error_groups", lambda: error_groups(store, user, project_id)) \
        if view.rows_failed else []
widgets.error_groups(groups)

st.subheader("Download")


def _export(fmt: str):
    def generate() -> str:
        out = io.StringIO()
        export_results(store, user, project_id, fmt, out)
        return out.getvalue()
    return generate


# on_click="ignore": a download needs no rerun, and a rerun that ends before the browser
# fetches the generated file prunes that file (Streamlit keeps a deferred download only
# while a run references it), so the click would download nothing.
left, right = st.columns(2)
left.download_button("Download CSV", data=_export("csv"), file_name=f"project-{project_id}.csv",
                     mime="text/csv", icon=":material/download:", key="download_csv",
                     on_click="ignore")
right.download_button("Download JSON", data=_export("json"), file_name=f"project-{project_id}.json",
                      mime="application/json", icon=":material/download:", key="download_json",
                      on_click="ignore")
