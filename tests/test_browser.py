"""End to end in headless Chromium: the whole stack (`python -m engine serve`), a real
browser, a researcher's first project, and an anonymous visitor.

Screenshots of each page go to test-artifacts/ (git-ignored).
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import subprocess
import time

import pytest

from conftest import FIXTURES, ROOT, python, short_tempdir
from served_portal import served_portal

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"
ROWS = 3000
# Waits sized for a loaded 2-core machine, where the app's scripts, Ray, the dispatcher and
# Chromium share the cores. A new session (a first visit, a reload) waits longest: Streamlit
# starts the script for it, and its first render there has taken many seconds.
FIRST_RENDER_MS = 180_000
STEP_MS = 60_000            # anything else: a rerun, a page switch, a click's effect
PORTAL_START_SECONDS = 240


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


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import expect, sync_playwright

    # expect() waits only 5 s unless told otherwise (the page's default timeout does not
    # apply to it): too short here, even for a rerun.
    expect.set_options(timeout=STEP_MS)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, request, stack):
    # Streamlit scrolls inside its main container, so a "full page" screenshot holds only
    # the viewport: make the viewport tall instead.
    context = browser.new_context(accept_downloads=True, viewport={"width": 1400, "height": 2000})
    page = context.new_page()
    page.set_default_timeout(STEP_MS)
    page.set_default_navigation_timeout(FIRST_RENDER_MS)
    yield page
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        # What the browser showed and what the portal logged, for a failure seen only in CI.
        shot(page, f"failed-{request.node.name}")
        print(f"--- the portal's log ({stack.log}), last lines:\n{stack.log.read_text()[-4000:]}")
    context.close()


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def main_area(page):
    return page.locator('[data-testid="stMain"]')


def field(main, label: str):
    return main.locator(f'input[aria-label="{label}"], textarea[aria-label="{label}"]')


def first_render(locator) -> None:
    """Wait for what a new session shows first (after goto or reload), as long as it takes
    Streamlit to start the session and run its script on a loaded machine."""
    from playwright.sync_api import expect

    expect(locator).to_be_visible(timeout=FIRST_RENDER_MS)


def nav_link(page, label: str):
    return page.locator('[data-testid="stSidebarNav"]').get_by_role("link", name=label)


def settled(page, quiet_seconds: float = 1.0) -> None:
    """Wait until the app's script has stopped running and stays stopped a moment.

    A click that lands while a rerun is under way can be lost: after signing in, the cookie
    component's own rerun can follow the first run by a second or so on a loaded machine
    (CI lost a "Continue" click that way), and a rerun also invalidates a deferred
    download's id. Streamlit marks the app element with the script's state.
    """
    idle = '[data-testid="stApp"][data-test-script-state="notRunning"]'
    deadline = time.monotonic() + 2 * STEP_MS / 1000
    while True:
        page.wait_for_selector(idle, timeout=STEP_MS)
        time.sleep(quiet_seconds)
        if page.locator(idle).count():
            return
        assert time.monotonic() < deadline, "the app never settled"


def test_a_researcher_registers_submits_watches_and_downloads(page, stack, tmp_path):
    from playwright.sync_api import expect

    portal_url, env = stack.url, stack.env
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
    expect(main.get_by_text("Account rita created")).to_be_visible()

    nav_link(page, "Sign in").click()
    expect(main.get_by_role("heading", name="Sign in", level=1)).to_be_visible()
    field(main, "User name").fill("rita")
    field(main, "Password").fill("a long password")
    shot(page, "02-sign-in")
    main.get_by_role("button", name="Sign in").click()
    expect(main.get_by_text("Welcome, rita.")).to_be_visible()
    settled(page)
    main.get_by_role("button", name="Continue").click()
    expect(main.get_by_text("No projects yet: submit one.")).to_be_visible()
    # A reload is a new session: the sign-in cookie keeps rita signed in.
    page.reload()
    first_render(page.get_by_text("Signed in as rita"))
    expect(main.get_by_text("No projects yet: submit one.")).to_be_visible()
    shot(page, "03-projects-empty")

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
    expect(main.get_by_text("Estimated run time on the cluster")).to_be_visible(timeout=120_000)
    shot(page, "04-submit-trial")
    main.get_by_role("button", name="Run on the cluster").click()
    expect(main.get_by_text("Project 1 submitted.")).to_be_visible()
    main.get_by_role("link", name="Follow its progress").click()

    # The status panel refreshes itself: no reload from here on.
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
    cli = subprocess.run([python(), "-m", "engine", "results", "1", "--format", "csv"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120, check=True)
    assert downloaded == cli.stdout
    table = list(csv.DictReader(io.StringIO(downloaded)))
    assert len(table) == ROWS
    assert [(r["x"], r["output"], r["error"]) for r in table[:3]] == \
        [("0", "0", ""), ("1", "1", ""), ("2", "4", "")]
    assert (table[-1]["x"], table[-1]["output"]) == (str(ROWS - 1), str((ROWS - 1) ** 2))


def test_an_anonymous_visitor_sees_the_leaderboard_and_is_refused_submit(page, stack):
    from playwright.sync_api import expect

    portal_url = stack.url
    page.goto(portal_url)
    main = main_area(page)
    first_render(main.get_by_role("heading", name="Sign in", level=1))
    expect(nav_link(page, "Leaderboard")).to_be_visible()
    expect(nav_link(page, "Submit")).to_have_count(0)
    nav_link(page, "Leaderboard").click()
    expect(main.get_by_role("heading", name="Leaderboard", level=1)).to_be_visible()
    expect(main.get_by_text("How credit is earned")).to_be_visible()
    shot(page, "08-leaderboard-anonymous")

    page.goto(f"{portal_url}/submit")
    first_render(main.get_by_text("Sign in with a researcher account to use this page."))
    expect(main.locator('[data-testid="stFileUploader"]')).to_have_count(0)
    shot(page, "09-submit-refused")


def test_a_disabled_users_cookie_no_longer_signs_them_in(page, stack):
    from playwright.sync_api import expect

    portal_url, env = stack.url, stack.env

    def cli(*args, stdin=""):
        subprocess.run([python(), "-m", "engine", *args], cwd=ROOT, env=env, input=stdin,
                       capture_output=True, text=True, timeout=120, check=True)

    cli("user", "add", "dora", "--role", "volunteer", "--password-stdin", stdin="a long password\n")
    page.goto(portal_url)
    main = main_area(page)
    first_render(main.get_by_role("heading", name="Sign in", level=1))
    field(main, "User name").fill("dora")
    field(main, "Password").fill("a long password")
    main.get_by_role("button", name="Sign in").click()
    expect(main.get_by_text("Welcome, dora.")).to_be_visible()
    settled(page)
    main.get_by_role("button", name="Continue").click()
    expect(main.get_by_role("heading", name="Join cluster", level=1)).to_be_visible()
    page.reload()
    first_render(page.get_by_text("Signed in as dora"))

    cli("user", "disable", "dora")
    page.reload()
    first_render(main.get_by_role("heading", name="Sign in", level=1))
    expect(page.get_by_text("Signed in as dora")).to_have_count(0)
    expect(nav_link(page, "Join cluster")).to_have_count(0)
