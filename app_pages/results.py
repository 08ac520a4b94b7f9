"""A project's results: a paged table, failed rows, errors by type, downloads."""

import streamlit as st

from engine import Role, list_projects, project_status
from engine.errors import NotFound
from engine.projects import one_line
from engine.results import error_groups, failed_page, full_output, results_page
from portal import auth, downloads, errors, panels, state, tables, widgets

user = auth.require(Role.RESEARCHER)
store, settings = state.store(), state.settings()
widgets.header("Results", ":material/table_view:")

selected = st.query_params.get("id")
if selected is None:
    with errors.shown():
        projects = list_projects(store, user)
    if not projects:
        st.info("No projects yet: submit one.", icon=":material/inbox:")
        st.page_link("app_pages/submit.py", label="Submit a project", icon=":material/upload:")
        st.stop()
    chosen = st.selectbox("Project", projects, format_func=lambda v: f"#{v.id} {one_line(v.title)}",
                          key="results_project")
    project_id = chosen.id
else:
    with errors.shown():
        if not selected.isdigit():
            raise NotFound(f"project {selected} not found")
        project_id = int(selected)

with errors.shown():
    view = project_status(store, user, project_id)
st.markdown(f"**{widgets.title(view.title)}** · #{view.id}")
widgets.status_badge(view.status)
widgets.progress(view)

controls = st.columns([2, 2, 2, 3], vertical_alignment="bottom")
failed_only = controls[0].toggle("Failed rows only", key="failed_only")
show_inputs = controls[1].toggle("Input columns", value=True, key="show_inputs",
                                 help="The dataset's columns, after the results.")
page_size = controls[2].selectbox("Rows per page", (50, 100, 500), index=1, key="page_size")
# One page control for both views: failed rows are counted the same way as all rows.
rows = view.rows_failed if failed_only else view.rows_total
pages = max(1, -(-rows // page_size))
what = "failed rows" if failed_only else "rows"
pager = f"page_{project_id}_{page_size}_{'failed' if failed_only else 'all'}"
number = controls[3].number_input(f"Page (of {pages:,}: {rows:,} {what})", min_value=1,
                                  max_value=pages, value=1, step=1, key=pager)
# Large outputs can end a page early: it is then shown in parts (tables.page_parts).
offset = tables.page_offset(pager, number)
with errors.shown():
    first = (number - 1) * page_size
    start, limit = first + offset, page_size - offset
    page = failed_page(store, user, project_id, start=start, limit=limit) if failed_only \
        else results_page(store, user, project_id, start=start, limit=limit)
tables.results_table(page, show_inputs=show_inputs)
tables.page_parts(page, pager, number, offset, first)
tables.whole_outputs(page, project_id, lambda row: full_output(store, user, project_id, row))

st.subheader("Errors by type")
with errors.shown():
    groups = widgets.per_view(view, "error_groups", lambda: error_groups(store, user, project_id)) \
        if view.rows_failed else []
panels.error_groups(groups)

st.subheader("Download")
st.caption("The whole project, every row, as a file; it is written as it downloads, however "
           "large the project. Each link works for your account only, for "
           f"{settings.download_link_minutes} minutes (this page renews them).")


@st.fragment(run_every=downloads.refresh_seconds(settings))
@errors.guarded
def download_links() -> None:
    # Links to the portal's download route (portal.downloads), signed for the account
    # looked up again now: a rerun after Sign out or disabling renders none.
    viewer = auth.require(Role.RESEARCHER)
    st.html(downloads.links_html(state.settings(), viewer, project_id))


download_links()
