"""End to end in headless Chromium: the whole stack (`python -m engine serve`), a real
browser, a researcher's first project, an anonymous visitor, typed links, thirty
projects, dict outputs, and sign-in cookies after Sign out and after disabling.

Screenshots of each page go to test-artifacts/ (git-ignored).
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import subprocess

import pytest

from browser_pages import (CHROMIUM, PORTAL_START_SECONDS, STEP_MS, field, first_render, main_area,
                           nav_link, settled, shot, sign_in_here, signed_in_as)
from support import FIXTURES, ROOT, python, short_tempdir
from support.served_portal import served_portal

pytestmark = [pytest.mark.slow, pytest.mark.browser]

ROWS = 3000


@pytest.fixture(scope="module")
def stack():
    """`python -m engine serve` on free ports, stopped by its process group."""
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian chromium is not installed (make test installs it)")
    data_dir = short_tempdir("cr-web-")
    try:
        with served_portal(data_dir, startup_seconds=PORTAL_START_SECONDS) as served:
            yield served
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def outside_requests(page, stack) -> list[str]:
    return sorted({u for u in page.requested
                   if not u.startswith((stack.url, "data:", "blob:", "about:"))})


def cli(stack, *args, stdin: str = "") -> str:
    return subprocess.run([python(), "-m", "engine", *args], cwd=ROOT, env=stack.env, input=stdin,
                          capture_output=True, text=True, timeout=120, check=True).stdout


def add_user(stack, name: str, *roles: str) -> None:
    cli(stack, "user", "add", name, *[f"--role={r}" for r in roles], "--password-stdin",
        stdin="a long password\n")


def engine_store(stack):
    """The served stack's own database, for setting up many projects at once."""
    from engine.settings import Settings
    from engine.store import Store

    return Store(Settings(data_dir=str(stack.data_dir)))


def test_a_researcher_registers_submits_watches_and_downloads(page, stack, tmp_path):
    from playwright.sync_api import expect

    portal_url = stack.url
    page.goto(f"{portal_url}/register")
    main = main_area(page)
    first_render(main.get_by_role("heading", name="Register", level=1))
    field(main, "User name").fill("rita")
    field(main, "Email").fill("rita@example.org")
    field(main, "Password").fill("a long password")
    field(main, "Repeat password").fill("a long password")
    main.get_by_text("Researcher", exact=True).click()
    shot(page, "01-register")
    main.get_by_role("button", name="Register").click()
    # Signed in at once, and on her own page: no separate sign-in, no "Continue".
    expect(main.get_by_text("No projects yet: submit one.")).to_be_visible()
    expect(page).to_have_url(f"{portal_url}/projects")
    expect(signed_in_as(page, "rita")).to_be_visible()
    # A reload is a new session: the sign-in cookie keeps rita signed in.
    page.reload()
    first_render(signed_in_as(page, "rita"))
    expect(main.get_by_text("No projects yet: submit one.")).to_be_visible()
    shot(page, "03-projects-empty")

    settled(page)  # the cookie component's rerun after the reload can swallow the click
    nav_link(page, "Submit").click()
    expect(main.get_by_role("heading", name="Submit a project", level=1)).to_be_visible()
    field(main, "Title").fill("squares in the browser")
    dataset = tmp_path / "numbers.csv"
    dataset.write_text("x\n" + "".join(f"{i}\n" for i in range(ROWS)))
    uploads = main.locator('[data-testid="stFileUploaderDropzoneInput"]')
    uploads.nth(0).set_input_files(str(FIXTURES / "slow_square.py"))
    uploads.nth(1).set_input_files(str(dataset))
    expect(main.get_by_text(f"Preview: {ROWS:,} rows, 1 columns")).to_be_visible()
    main.get_by_role("button", name="Trial run on 5 rows").click()
    expect(main.get_by_text("Estimated computing time on the cluster")).to_be_visible(timeout=120_000)
    expect(main.get_by_text(re.compile(r"It assumes .* CPUs"))).to_be_visible()
    shot(page, "04-submit-trial")
    main.get_by_role("button", name="Run on the cluster").click()
    expect(main.get_by_text("Project 1 submitted.")).to_be_visible()
    main.get_by_role("link", name="Follow its progress").click()

    # The status panel refreshes itself: no reload from here on.
    expect(page).to_have_url(f"{portal_url}/projects?id=1")
    expect(main.get_by_text("squares in the browser")).to_be_visible()
    expect(main.get_by_text(re.compile(r"(Submitted|Running)$"))).to_be_visible()
    shot(page, "05-projects-running")
    expect(main.get_by_text(f"{ROWS:,} of {ROWS:,} rows (100%)")).to_be_visible(timeout=300_000)
    expect(main.get_by_text(re.compile(r"Complete$"))).to_be_visible()  # the status badge
    expect(main.locator('[data-testid="stVegaLiteChart"]')).to_be_visible()  # rows per node
    shot(page, "06-projects-complete")

    main.get_by_role("link", name="Results").click()
    expect(main.get_by_role("heading", name="Results", level=1)).to_be_visible()
    expect(main.locator('[data-testid="stDataFrame"]')).to_be_visible()
    shot(page, "07-results")
    settled(page)
    with page.expect_download() as download_info:
        main.get_by_role("button", name="Download CSV").click()
    download = download_info.value
    target = tmp_path / "results.csv"
    download.save_as(str(target))
    downloaded = target.read_text()
    # The same bytes as the command-line export of the same project.
    assert downloaded == cli(stack, "results", "1", "--format", "csv")
    table = list(csv.DictReader(io.StringIO(downloaded)))
    assert len(table) == ROWS
    assert [(r["x"], r["output"], r["error"]) for r in table[:3]] == \
        [("0", "0", ""), ("1", "1", ""), ("2", "4", "")]
    assert (table[-1]["x"], table[-1]["output"]) == (str(ROWS - 1), str((ROWS - 1) ** 2))
    assert outside_requests(page, stack) == []


def test_an_anonymous_visitor_learns_what_constellation_is(page, stack):
    from playwright.sync_api import expect

    portal_url = stack.url
    page.goto(portal_url)
    main = main_area(page)
    first_render(main.get_by_role("heading", name="Constellation", level=1))
    expect(page).to_have_url(f"{portal_url}/login")
    expect(main.get_by_text("runs a researcher's Python function over every row")).to_be_visible()
    expect(main.get_by_role("heading", name="Sign in")).to_be_visible()
    expect(nav_link(page, "Leaderboard")).to_be_visible()
    expect(nav_link(page, "Submit")).to_have_count(0)
    shot(page, "02-landing")
    nav_link(page, "Leaderboard").click()
    expect(main.get_by_role("heading", name="Leaderboard", level=1)).to_be_visible()
    expect(main.get_by_text("runs a researcher's Python function over every row")).to_be_visible()
    expect(main.get_by_text("How credit is earned")).to_be_visible()
    shot(page, "08-leaderboard-anonymous")

    page.goto(f"{portal_url}/submit")
    first_render(main.get_by_text("Sign in with a researcher account to use this page."))
    expect(main.locator('[data-testid="stFileUploader"]')).to_have_count(0)
    shot(page, "09-submit-refused")
    # The favicon and fonts come from the portal itself, not from fonts.gstatic.com.
    assert outside_requests(page, stack) == []


def test_typed_links_open_each_users_own_pages(page, stack):
    from playwright.sync_api import expect

    portal_url = stack.url
    add_user(stack, "tina", "researcher")
    add_user(stack, "vince", "volunteer")
    (stack.data_dir / "two.csv").write_text("x\n1\n2\n")
    project = cli(stack, "submit", str(FIXTURES / "square.py"), str(stack.data_dir / "two.csv"),
                  "--owner", "tina", "--title", "tina's link").strip()
    main = main_area(page)

    # A visitor follows a link to a project: signing in on that page leads to the project.
    page.goto(f"{portal_url}/projects?id={project}")
    first_render(main.get_by_text("Sign in with a researcher account to use this page."))
    sign_in_here(main, "tina")
    expect(main.get_by_text("tina's link")).to_be_visible()
    expect(main.get_by_role("link", name="All projects")).to_be_visible()
    expect(page).to_have_url(f"{portal_url}/projects?id={project}")
    shot(page, "10-link-after-sign-in")

    # Signed in (by the cookie, in new sessions): typed paths answer at their own path.
    for path in ("/projects", f"/projects?id={project}", "/submit", "/"):
        page.goto(f"{portal_url}{path}")
        first_render(signed_in_as(page, "tina"))
        expect(page.get_by_text("Page not found")).to_have_count(0)
        expect(page).to_have_url(f"{portal_url}{path if path != '/' else '/projects'}")
    expect(main.get_by_role("heading", name="Projects", level=1)).to_be_visible()

    # A researcher at a volunteer's page is told how to get the role.
    page.goto(f"{portal_url}/join")
    first_render(main.get_by_text(re.compile(r"This page is for volunteers.*ask an admin")))
    shot(page, "11-join-refused-researcher")

    page.context.clear_cookies()
    page.goto(f"{portal_url}/join")
    first_render(main.get_by_text("Sign in with a volunteer account to use this page."))
    sign_in_here(main, "vince")
    expect(main.get_by_role("heading", name="Join cluster", level=1)).to_be_visible()
    page.goto(f"{portal_url}/join")
    first_render(signed_in_as(page, "vince"))
    expect(page.get_by_text("Page not found")).to_have_count(0)
    expect(page).to_have_url(f"{portal_url}/join")


def test_thirty_projects_make_a_compact_table(page, stack):
    from playwright.sync_api import expect

    from engine import accounts, projects

    store = engine_store(stack)
    owner = accounts.add_user(store, "theo", {accounts.Role.RESEARCHER}, password="a long password")
    for i in range(30):
        projects.submit_project(store, store.settings, owner, title=f"batch {i:02d}",
                                script_name="square.py", script_bytes=(FIXTURES / "square.py").read_bytes(),
                                dataset_name="d.csv", dataset_bytes=b"x\n1\n2\n")
    main = main_area(page)
    page.goto(f"{stack.url}/login")
    first_render(main.get_by_role("heading", name="Sign in"))
    sign_in_here(main, "theo")
    grid = main.locator('[data-testid="stDataFrame"] table[role="grid"]')
    expect(grid).to_have_attribute("aria-rowcount", "31")  # 30 projects and the header row
    headers = grid.locator('th[role="columnheader"]').all_inner_texts()
    assert [h for h in ("#", "title", "status", "progress", "rows", "rows/s", "created")
            if h not in headers] == [], headers
    settled(page)
    shot(page, "12-thirty-projects")
    # One compact table, not a card per project (8 cards made a 4,476 px page).
    height = page.evaluate("document.querySelector('[data-testid=\"stMainBlockContainer\"]')"
                           ".getBoundingClientRect().height")
    assert height < 1600, height

    field(main, "Search").fill("batch 07")
    field(main, "Search").press("Enter")
    expect(grid).to_have_attribute("aria-rowcount", "2")
    # Selecting the row opens the project's live panel.
    box = main.locator('[data-testid="stDataFrame"]').bounding_box()
    page.mouse.click(box["x"] + 18, box["y"] + 35 + 17)
    expect(main.get_by_role("link", name="All projects")).to_be_visible()
    expect(page).to_have_url(re.compile(r"/projects\?id=\d+$"))
    settled(page)
    expect(main.get_by_role("strong").get_by_text("batch 07")).to_be_visible()
    expect(grid).to_have_count(0)
    shot(page, "13-project-from-the-table")


def test_the_results_table_expands_dict_outputs(page, stack):
    from playwright.sync_api import expect

    add_user(stack, "dora", "researcher")
    (stack.data_dir / "three.csv").write_text("x\n1\n2\n3\n")
    project = cli(stack, "submit", str(FIXTURES / "dict_output.py"),
                  str(stack.data_dir / "three.csv"), "--owner", "dora", "--replication", "1",
                  "--wait").strip()
    main = main_area(page)
    page.goto(f"{stack.url}/results?id={project}")
    first_render(main.get_by_text("Sign in with a researcher account to use this page."))
    sign_in_here(main, "dora")
    grid = main.locator('[data-testid="stDataFrame"] table[role="grid"]')
    expect(grid).to_have_attribute("aria-rowcount", "4")
    headers = grid.locator('th[role="columnheader"]').all_inner_texts()
    # One column per key of the output, as in the CSV, before the (long) input columns.
    assert headers == ["row", "status", "double", "label", "error", "verification", "in: x"], headers
    assert grid.locator('[data-testid="glide-cell-2-1"]').inner_text() == "4"
    assert grid.locator('[data-testid="glide-cell-3-2"]').inner_text() == "n3"
    shot(page, "14-results-dict-outputs")
    main.get_by_text("Input columns").click()
    expect(grid.locator('th[role="columnheader"]')).to_have_count(6)


def test_a_cookie_copied_before_sign_out_no_longer_signs_in(page, browser, stack):
    from playwright.sync_api import expect

    add_user(stack, "sam", "researcher")
    main = main_area(page)
    page.goto(f"{stack.url}/login")
    first_render(main.get_by_role("heading", name="Sign in"))
    sign_in_here(main, "sam")
    expect(signed_in_as(page, "sam")).to_be_visible()
    settled(page)
    saved = [c for c in page.context.cookies() if c["name"] == "constellation_auth"]
    assert saved, page.context.cookies()
    page.get_by_role("button", name="Sign out").click()
    expect(signed_in_as(page, "sam")).to_have_count(0)

    # Someone who copied the cookie before Sign out replays it in another browser.
    thief = browser.new_context(viewport={"width": 1400, "height": 2000})
    try:
        thief.add_cookies(saved)
        stolen = thief.new_page()
        stolen.set_default_timeout(STEP_MS)
        stolen.goto(f"{stack.url}/projects")
        first_render(main_area(stolen).get_by_text("Sign in with a researcher account to use this page."))
        expect(signed_in_as(stolen, "sam")).to_have_count(0)
        shot(stolen, "15-cookie-after-sign-out")
    finally:
        thief.close()
    # Signing in again works, with a new cookie.
    page.goto(f"{stack.url}/login")
    first_render(main.get_by_role("heading", name="Sign in"))
    sign_in_here(main, "sam")
    expect(signed_in_as(page, "sam")).to_be_visible()


def test_a_disabled_users_cookie_no_longer_signs_them_in(page, stack):
    from playwright.sync_api import expect

    add_user(stack, "dina", "volunteer")
    page.goto(stack.url)
    main = main_area(page)
    first_render(main.get_by_role("heading", name="Sign in"))
    sign_in_here(main, "dina")
    expect(main.get_by_role("heading", name="Join cluster", level=1)).to_be_visible()
    settled(page)
    page.reload()
    first_render(signed_in_as(page, "dina"))

    cli(stack, "user", "disable", "dina")
    page.reload()
    first_render(main.get_by_role("heading", name="Sign in"))
    expect(signed_in_as(page, "dina")).to_have_count(0)
    expect(nav_link(page, "Join cluster")).to_have_count(0)
