"""Fixtures and hooks of the e2e layer: one headless Chromium per module and a fresh page
per test, which leaves its last screen and the portal's log when the test failed. Each test
module gives the ``stack`` (``support.served_portal``) its pages open."""

from __future__ import annotations

import pytest

from browser_pages import CHROMIUM, FIRST_RENDER_MS, STEP_MS, shot


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
    # Every URL the page asked for: the portal must not make the browser fetch anything
    # from another host (fonts, icons).
    page.requested = []
    context.on("request", lambda r: page.requested.append(r.url))
    yield page
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        # What the browser showed and what the portal logged, for a failure seen only in CI.
        shot(page, f"failed-{request.node.name}")
        print(f"--- the portal's log ({stack.log}), last lines:\n{stack.log.read_text()[-4000:]}")
    context.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item (``item.rep_call``), for fixtures that
    gather evidence when the test failed."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
