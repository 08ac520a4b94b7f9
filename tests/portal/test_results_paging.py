"""Results pages are bounded by size as well as by rows (issue #13): opening the Results
page of 60 rows of 9 MB grew the portal to 6.2 GB, and Streamlit refused the 540 MB message.

A page now carries at most ``MAX_PAGE_CHARS`` of output and error text and says where the
rest begins; an output longer than ``MAX_SHOWN_CHARS`` comes back cut, with its full
size, and downloads whole on its own. Engine tests run on real SQLite and PostgreSQL;
the page is tested under AppTest with the real entry point and sign-in.
"""

from __future__ import annotations

import json

import pytest

from engine import accounts, results
from engine.errors import NotFound
from engine.results import MAX_PAGE_CHARS, MAX_SHOWN_CHARS, PREVIEW_CHARS, full_output
from engine.ledger import record_results
from engine.node.result import RowResult
from engine.status import ProjectStatus, transition_project
from engine.store import Store
from portal_pages import open_page, signed_in, submit

NODE = "a" * 56
MB = 1_000_000  # an output of 1 MB: below MAX_SHOWN_CHARS (1 MiB), so shown whole


@pytest.fixture(params=["sqlite", "postgresql"])
def any_store(request, settings):
    if request.param == "postgresql":
        settings = settings.replace(db_url=request.getfixturevalue("postgres_server").create_database())
    store = Store(settings)
    accounts.add_user(store, "ada", {accounts.Role.RESEARCHER}, password="long enough")
    accounts.add_user(store, "bob", {accounts.Role.RESEARCHER}, password="long enough")
    yield store
    store.engine.dispose()


def text_of(size: int, mark: str = "x") -> str:
    """JSON text of ``size`` characters: a string."""
    return json.dumps(mark * (size - 2))


def project_with(store, owner: str, outcomes: list[RowResult]) -> int:
    pid = submit(store, owner, rows=len(outcomes))
    with store.session() as session:
        transition_project(session, pid, ProjectStatus.RUNNING)
        record_results(session, pid, outcomes, NODE)
    return pid


def shown_size(page) -> int:
    return sum(len(r.output if r.truncated else json.dumps(r.output)) if r.output is not None else 0
               for r in page.rows) + sum(len(r.error or "") for r in page.rows)


def test_a_page_of_large_outputs_holds_fewer_rows_and_says_where_the_rest_begin(any_store):
    store = any_store
    ada = accounts.get_user(store, "ada")
    pid = project_with(store, "ada", [RowResult(i, True, text_of(MB), None, None, 0.1)
                                      for i in range(20)])
    page = results.results_page(store, ada, pid, start=0, limit=100)
    assert 0 < len(page.rows) < 20
    assert page.size == shown_size(page) == len(page.rows) * MB <= MAX_PAGE_CHARS
    assert not page.truncated_rows()
    assert page.next_start == len(page.rows)
    seen, start = [], 0
    while start is not None:  # the rest of the rows asked for, part by part
        part = results.results_page(store, ada, pid, start=start, limit=100 - start)
        assert part.size <= MAX_PAGE_CHARS
        seen += [r.row for r in part.rows]
        start = part.next_start
    assert seen == list(range(20))
    # Small outputs: every row asked for, as before.
    small = project_with(store, "ada", [RowResult(i, True, str(i), None, None, 0.1) for i in range(20)])
    page = results.results_page(store, ada, small, start=0, limit=100)
    assert (len(page.rows), page.next_start) == (20, None)


def test_failed_rows_with_large_errors_are_paged_by_size_too(any_store):
    store = any_store
    ada = accounts.get_user(store, "ada")
    error = "ValueError: " + "e" * (MB - 12)
    pid = project_with(store, "ada", [RowResult(i, False, None, error, None, 0.1) for i in range(20)])
    page = results.failed_page(store, ada, pid, start=0, limit=100)
    assert 0 < len(page.rows) < 20 and page.size <= MAX_PAGE_CHARS
    assert page.rows[0].error == error
    assert (page.next_start, page.next_after) == (len(page.rows), page.rows[-1].row)
    rest = results.failed_page(store, ada, pid, after=page.next_after, limit=100)
    assert rest.rows[0].row == len(page.rows)


def test_a_huge_output_comes_back_cut_with_its_size_and_downloads_whole(any_store):
    store = any_store
    ada, bob = accounts.get_user(store, "ada"), accounts.get_user(store, "bob")
    huge = text_of(5 * MB, "y")
    long_error = "ValueError: " + "z" * (2 * MB)
    pid = project_with(store, "ada", [RowResult(0, True, "1", None, None, 0.1),
                                      RowResult(1, True, huge, None, None, 0.1),
                                      RowResult(2, False, None, long_error, None, 0.1)])
    page = results.results_page(store, ada, pid, start=0, limit=100)
    small, cut, failed = page.rows
    assert (small.output, small.truncated, small.output_size) == (1, False, 1)
    assert cut.truncated and cut.output_size == len(huge) > MAX_SHOWN_CHARS
    assert cut.output == huge[:PREVIEW_CHARS]
    assert failed.error.startswith(long_error[:PREVIEW_CHARS])
    assert failed.error.endswith(f"… (cut short: {len(long_error):,} characters in all)")
    assert page.truncated_rows() == [cut]
    assert page.size == 1 + 2 * PREVIEW_CHARS
    assert page.output_columns() is None
    assert full_output(store, ada, pid, 1) == huge
    with pytest.raises(NotFound):
        full_output(store, bob, pid, 1)  # another researcher's project
    with pytest.raises(NotFound):
        full_output(store, ada, pid, 2)  # a failed row has no output


# -- the Results page ----------------------------------------------------------------------


def complete_with(store, pid: int, outputs: list[str]) -> None:
    with store.session() as session:
        transition_project(session, pid, ProjectStatus.RUNNING)
        record_results(session, pid, [RowResult(i, True, o, None, None, 0.1)
                                      for i, o in enumerate(outputs)], NODE)


def test_the_results_page_shows_a_huge_output_cut_and_downloads_it_whole(portal, monkeypatch):
    from streamlit.runtime.media_file_manager import MediaFileManager

    deferred = {}  # file id -> what the download button will send when clicked
    add_deferred = MediaFileManager.add_deferred

    def spy(self, data_callable, *args, **kwargs):
        file_id = add_deferred(self, data_callable, *args, **kwargs)
        deferred[file_id] = data_callable
        return file_id

    monkeypatch.setattr(MediaFileManager, "add_deferred", spy)
    huge = text_of(5 * MB, "y")
    pid = submit(portal, "ada", rows=3)
    complete_with(portal, pid, ["1", huge, "9"])
    at = open_page(signed_in("ada"), "app_pages/results.py", id=pid)
    table = at.dataframe[0].value
    assert list(table["output"][[0, 2]]) == ["1", "9"]
    cell = table["output"][1]
    assert cell.startswith(huge[:PREVIEW_CHARS]) and len(cell) < PREVIEW_CHARS + 100
    assert cell.endswith("… [cut short: 4.8 MB in all; download it below the table]")
    assert at.selectbox(key=f"whole_output_{pid}").options == ["row 1 (4.8 MB)"]
    download = next(b for b in at.get("download_button") if b.label == "Download its output")
    assert download.proto.ignore_rerun  # on_click="ignore": a rerun would drop the file
    assert deferred[download.proto.deferred_file_id]() == huge


def test_the_results_page_shows_a_page_of_large_outputs_in_parts(portal):
    pid = submit(portal, "ada", rows=20)
    complete_with(portal, pid, [text_of(MB, str(i % 10)) for i in range(20)])
    at = open_page(signed_in("ada"), "app_pages/results.py", id=pid)
    per_part = MAX_PAGE_CHARS // MB
    assert list(at.dataframe[0].value["row"]) == list(range(per_part))
    assert any(f"Rows 1-{per_part} of this page are shown" in c.value for c in at.caption)
    at.button(key=f"page_{pid}_100_all_next").click()
    at.run()
    assert list(at.dataframe[0].value["row"]) == list(range(per_part, 2 * per_part))
    at.button(key=f"page_{pid}_100_all_first").click()
    at.run()
    assert list(at.dataframe[0].value["row"]) == list(range(per_part))
