"""Headless Chromium through Playwright, against pytest-django's live server.

The distribution's Chromium (`make browser`) is used because `playwright install` cannot
download browsers here. One browser per test module (starting it costs about a second); one fresh
context (cookies, storage) per test.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# Playwright's sync API runs an event loop in the test thread; Django would then refuse the
# ORM calls the tests make between browser steps ("SynchronousOnlyOperation"). They are plain
# synchronous calls on the test's own connection, so this is safe here.
os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PASSWORD = "correct horse battery staple"  # the UserFactory password
# Chosen so the page's local times visibly differ from the server's UTC.
VIEWER_TIME_ZONE = "Europe/Berlin"


# Module scope, not session: Playwright's sync API keeps an event loop marked as running in
# this thread while it is started, which would make `asyncio.run` in later test modules fail.
@pytest.fixture(scope="module")
def browser() -> Iterator:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: run `make browser`")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser, live_server) -> Iterator:
    context = browser.new_context(
        base_url=live_server.url,
        viewport={"width": 1280, "height": 800},
        timezone_id=VIEWER_TIME_ZONE,
        locale="en-GB",
    )
    context.set_default_timeout(10_000)
    page = context.new_page()
    yield page
    page.goto("about:blank")  # stops the page's HTMX polling
    context.close()
    wait_for_live_server_requests_to_finish()


def wait_for_live_server_requests_to_finish(timeout: float = 10.0) -> None:
    """Wait until no other session works in the test database.

    Closing the browser does not stop a request the live server is already answering. If one
    is still reading (inside a transaction, such as the dashboard's snapshot) when the test's
    teardown truncates every table, PostgreSQL sees a deadlock and fails the teardown.
    """
    from django.db import connection

    deadline = time.monotonic() + timeout
    with connection.cursor() as cursor:
        while True:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid() AND backend_type = 'client backend' "
                "AND state <> 'idle'"
            )
            if cursor.fetchone()[0] == 0 or time.monotonic() > deadline:
                return
            time.sleep(0.05)


def sign_in(page, username: str, password: str = PASSWORD, *, next_path: str = "/") -> None:
    """Sign in through the real login form."""
    page.goto(f"/login/?next={next_path}")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_load_state("domcontentloaded")
