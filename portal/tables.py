"""Tables: the list of projects, a page of results (with its parts and downloads of whole
outputs), and the node lists."""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st

from engine.nodes import short_id
from engine.projects import one_line
from engine.results import MAX_PAGE_CHARS, MAX_SHOWN_CHARS, PREVIEW_CHARS
from engine.status import ProjectStatus
from portal import errors
from portal.panels import node_machine


def projects_table(views, *, show_owner: bool, key: str = "projects_table") -> int | None:
    """A compact, sortable table of projects; returns the id of the one selected, if any.

    Each row links to the project's live panel (``?id=N``); selecting a row opens it here.
    """
    rows = []
    for v in views:
        done = v.rows_succeeded + v.rows_failed
        row = {"#": v.id, "title": one_line(v.title), "status": v.status,
               "progress": done / v.rows_total if v.rows_total else 1.0,
               "rows": f"{done:,} / {v.rows_total:,}", "failed": v.rows_failed,
               "rows/s": None if v.rows_per_second is None else round(v.rows_per_second, 2),
               "created": pd.Timestamp(v.created_at).tz_convert(None) if v.created_at else None,
               "link": f"projects?id={v.id}"}
        if show_owner:
            row["owner"] = v.owner
        rows.append(row)
    frame = pd.DataFrame(rows)
    config = {
        "#": st.column_config.NumberColumn(width="small", format="%d"),
        "title": st.column_config.TextColumn(width="medium"),
        "status": st.column_config.TextColumn(width="small"),
        "progress": st.column_config.ProgressColumn(min_value=0.0, max_value=1.0, format="percent"),
        "rows": st.column_config.TextColumn(width=130),
        "failed": st.column_config.NumberColumn(width="small"),
        "rows/s": st.column_config.NumberColumn(width="small"),
        "created": st.column_config.DatetimeColumn(format="YYYY-MM-DD HH:mm"),
        "link": st.column_config.LinkColumn("open", display_text="open", width="small",
                                            help="The project's live panel (in a new tab)"),
    }
    event = st.dataframe(frame, hide_index=True, column_config=config, key=key,
                         on_select="rerun", selection_mode="single-row",
                         height=min(38 + 35 * max(1, len(rows)), 38 + 35 * 15))
    selected = event.selection.rows if event is not None else []
    return int(frame.iloc[selected[0]]["#"]) if selected else None


def filter_projects(views, text: str, statuses: list[str]):
    """The projects whose title contains ``text`` and whose status is one of ``statuses``."""
    text = (text or "").strip().lower()
    return [v for v in views if (not statuses or v.status in statuses)
            and (not text or text in v.title.lower() or text == str(v.id))]


def status_choices() -> list[str]:
    return [s.value for s in ProjectStatus]


def results_table(page, *, show_inputs: bool = True) -> None:
    """A page of results: row, status, the output (one column per key when every output on
    the page is a dict, as in the CSV), error and verification, then the inputs."""
    if not page.rows:
        st.info("No rows to show.", icon=":material/inbox:")
        return
    expanded = page.output_columns()
    records = []
    for r in page.rows:
        record = {"row": r.row, "status": r.status}
        if r.truncated:  # never expanded: the text is cut, so it is no JSON value
            record["output"] = f"{r.output} … [cut short: {_mb(r.output_size)} in all; " \
                               f"download it below the table]"
        elif expanded is None:
            record["output"] = None if r.output is None else json.dumps(r.output, ensure_ascii=False)
        else:
            output = r.output if isinstance(r.output, dict) else {}
            for column, key in expanded.items():
                value = output.get(key)
                record[column] = json.dumps(value, ensure_ascii=False) \
                    if isinstance(value, (list, dict)) else value
        record["error"] = errors.readable(r.error)
        record["verification"] = r.verification
        if show_inputs:
            record.update({f"in: {c}": r.values.get(c) for c in page.columns})
        records.append(record)
    frame = pd.DataFrame(records)
    for column in frame.columns:
        # A column of mixed types (numbers here, text there) cannot become one Arrow column.
        kinds = {type(v) for v in frame[column] if v is not None and v == v}
        if len(kinds - {int, float}) > 1 or (kinds & {int, float} and kinds - {int, float}):
            frame[column] = frame[column].map(lambda v: None if v is None else str(v))
    st.dataframe(frame, hide_index=True,
                 column_config={"error": st.column_config.TextColumn(width="large")})


def page_offset(pager: str, number: int) -> int:
    """How many rows of page ``number`` come before the part shown (``page_parts``)."""
    part = st.session_state.get(f"{pager}_part")
    return part[1] if part is not None and part[0] == number else 0


def page_parts(page, pager: str, number: int, offset: int, first: int) -> None:
    """When large outputs ended the page early (``next_start``), say so and offer the rest
    of it; ``first`` is where the page's rows begin, counted as ``start`` counts them."""
    if page.next_start is None and not offset:
        return
    key = f"{pager}_part"
    shown = f"{offset + 1:,}-{offset + len(page.rows):,}"
    st.caption(f"Rows {shown} of this page are shown: their outputs are large, and a page "
               f"holds at most {MAX_PAGE_CHARS >> 20} MB of them.")
    left, right = st.columns(2)
    if offset:
        left.button("First rows of this page", key=f"{pager}_first", icon=":material/first_page:",
                    on_click=_show_part, args=(key, None))
    if page.next_start is not None:
        right.button("Next rows of this page", key=f"{pager}_next", icon=":material/navigate_next:",
                     on_click=_show_part, args=(key, (number, page.next_start - first)))


def _show_part(key: str, part: tuple[int, int] | None) -> None:
    st.session_state[key] = part


def whole_outputs(page, project_id: int, full_output) -> None:
    """A download of the whole output of a row whose output the table shows cut short;
    ``full_output(row)`` reads it (only when the button is clicked)."""
    sizes = {r.row: r.output_size for r in page.truncated_rows()}
    if not sizes:
        return
    st.caption(f"Outputs longer than {MAX_SHOWN_CHARS >> 20} MB are shown cut to their first "
               f"{PREVIEW_CHARS:,} characters. Choose a row to download its whole output.")
    left, right = st.columns([3, 2], vertical_alignment="bottom")
    row = left.selectbox("Row", list(sizes), key=f"whole_output_{project_id}",
                         format_func=lambda r: f"row {r} ({_mb(sizes[r])})")
    # on_click="ignore", as for the project's downloads (see app_pages/results.py).
    right.download_button("Download its output", data=lambda: full_output(row),
                          file_name=f"project-{project_id}-row-{row}.json",
                          mime="application/json", icon=":material/download:",
                          key="download_output", on_click="ignore")


def _mb(characters: int) -> str:
    return f"{characters / (1 << 20):.1f} MB"


def node_rows(registry, *, admin: bool) -> pd.DataFrame:
    """Node lists for people: whose machine and which one first; a short id only for admins
    (the CLI's ``trust-node`` takes it)."""
    records = []
    for n in registry:
        record = {"owner": n.attribution, "machine": node_machine(n), "status": str(n.status),
                  "health": str(n.health), "why": errors.readable(n.health_reason),
                  "trusted": n.trusted, "CPUs": n.cpus, "sandbox": n.sandbox,
                  "tasks": n.tasks_completed, "last active": n.last_activity,
                  "last seen": n.last_seen}
        if admin:
            record["id"] = short_id(n.node_id)
        records.append(record)
    return pd.DataFrame(records)
