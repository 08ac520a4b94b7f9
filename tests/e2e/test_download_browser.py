"""A whole project downloaded from the Results page in real Chromium, through the portal's
download route (issue #13 item 6), on the whole stack (``python -m engine serve``).

The project has 2,000 small rows and three rows of 9 MB. The click on "Download CSV" (and
"Download JSON") must give the complete file, byte for byte the engine's export; the link
it followed must stop working once its owner signs out.
"""

from __future__ import annotations

import io
import json
import os
import shutil

import pytest

from browser_pages import (CHROMIUM, PORTAL_START_SECONDS, first_render, main_area, settled, shot,
                           sign_in_here, signed_in_as)
from support import short_tempdir
from support.served_portal import served_portal
from support.downloads import add_people, big_output, exported, fetch, project_of

pytestmark = [pytest.mark.slow, pytest.mark.browser]

SMALL_ROWS = 2000
BIG_ROWS = 3


@pytest.fixture(scope="module")
def stack():
    """The stack, on a data directory that already holds ada's project (made before the
    dispatcher starts, so that it never runs it)."""
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian chromium is not installed (make test installs it)")
    from engine.settings import Settings
    from engine.store import Store

    data_dir = short_tempdir("cr-dlw-")
    try:
        store = Store(Settings(data_dir=str(data_dir)))
        add_people(store)
        outputs = [{"n": i, "text": f"=row {i}, \"quoted\""} for i in range(SMALL_ROWS)]
        outputs += [{"n": SMALL_ROWS + i, "text": big_output(SMALL_ROWS + i)} for i in range(BIG_ROWS)]
        project_of(store, "ada", outputs)
        store.engine.dispose()
        with served_portal(data_dir, startup_seconds=PORTAL_START_SECONDS) as served:
            yield served
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def test_the_results_pages_download_link_gives_the_whole_project(page, stack, tmp_path):
    import pandas
    from playwright.sync_api import expect

    from engine.settings import Settings
    from engine.store import Store

    store = Store(Settings(data_dir=str(stack.data_dir)))
    rows = SMALL_ROWS + BIG_ROWS
    main = main_area(page)
    page.goto(f"{stack.url}/results?id=1")
    first_render(main.get_by_text("Sign in with a researcher account to use this page."))
    sign_in_here(main, "ada", "long enough")
    expect(main.get_by_role("heading", name="Results", level=1)).to_be_visible()
    csv_link = main.get_by_role("button", name="Download CSV")
    expect(csv_link).to_be_visible()
    settled(page)
    shot(page, "download-01-results")

    files = {}
    for fmt in ("csv", "json"):
        with page.expect_download(timeout=600_000) as started:
            main.get_by_role("button", name=f"Download {fmt.upper()}").click()
        download = started.value
        assert download.url.startswith(f"{stack.url}/download/1.{fmt}?token=")
        assert download.suggested_filename == f"project-1.{fmt}"
        target = tmp_path / download.suggested_filename
        download.save_as(str(target))
        assert download.failure() is None
        files[fmt] = target.read_text(encoding="utf-8")
        assert files[fmt] == exported(store, 1, fmt)  # every byte of the engine's export

    table = pandas.read_csv(io.StringIO(files["csv"]), dtype=str, keep_default_na=False)
    assert len(table) == rows and table["n"].iloc[-1] == str(rows - 1)
    assert table["text"].iloc[0] == "'=row 0, \"quoted\""  # escaped for spreadsheets
    assert table["text"].iloc[-1] == big_output(rows - 1)
    records = json.loads(files["json"])
    assert [r["row"] for r in records] == list(range(rows))
    assert records[-1]["output"]["text"] == big_output(rows - 1)

    # The link the page showed stops working once its owner signs out.
    href = csv_link.get_attribute("href")
    page.get_by_role("button", name="Sign out").click()
    expect(signed_in_as(page, "ada")).to_have_count(0)
    status, _, body = fetch(stack.url + href)
    assert status == 403 and b"row 1" not in body, (status, body)
    shot(page, "download-02-signed-out")
