"""Headless Chromium on the served portal, as the e2e tests drive it: Debian's chromium
through Python Playwright, waits sized for a loaded machine, screenshots in test-artifacts/,
and the steps every browser test takes (sign in, wait for the app to settle)."""

from __future__ import annotations

import time

from support import ROOT

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"
# Waits sized for a loaded 2-core machine, where the app's scripts, Ray, the dispatcher and
# Chromium share the cores. A new session (a first visit, a reload) waits longest: Streamlit
# starts the script for it, and its first render there has taken many seconds.
FIRST_RENDER_MS = 180_000
STEP_MS = 60_000            # anything else: a rerun, a page switch, a click's effect
PORTAL_START_SECONDS = 240


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


def signed_in_as(page, name: str):
    """The sidebar's "Signed in as NAME" (not the message of the run that signed in)."""
    return page.locator('[data-testid="stSidebar"]').get_by_text(f"Signed in as {name}")


def sign_in_here(main, name: str, password: str = "a long password") -> None:
    """Fill the sign-in form on the page (the Sign in page, or a page refused to visitors),
    once the app has settled, and click until the sidebar says NAME is signed in: a click
    during the cookie component's rerun is lost (CI lost one: the form stayed filled,
    nobody signed in)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    button, marker = main.get_by_role("button", name="Sign in"), signed_in_as(main.page, name)
    deadline = time.monotonic() + STEP_MS / 1000
    while True:
        settled(main.page)
        field(main, "User name").fill(name)
        field(main, "Password").fill(password)
        button.click()
        try:
            marker.wait_for(state="visible", timeout=15_000)
            return
        except PlaywrightTimeout:
            # Under two busy loops CI lost a click even after the app had settled: the
            # form stayed filled and the portal's log shows no sign-in. Every caller signs
            # in with the right password, so a second click cannot count as a wrong guess.
            assert time.monotonic() < deadline, f"{name} was never signed in"
            if not button.is_visible():
                marker.wait_for(state="visible", timeout=STEP_MS)
                return
