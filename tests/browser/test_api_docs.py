"""The API reference page (/api/docs/) in headless Chromium: it renders the OpenAPI document
with the local script alone (no request leaves the server)."""

from __future__ import annotations

import pytest

from config.openapi import document

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def test_it_renders_every_operation_from_local_files(page, live_server):
    elsewhere: list[str] = []
    page.on(
        "request",
        lambda request: (
            None if request.url.startswith(live_server.url) else elsewhere.append(request.url)
        ),
    )

    page.goto("/api/docs/")

    page.locator("section.op").first.wait_for()
    operations = sum(len(item) for item in document()["paths"].values())
    assert page.locator("section.op").count() == operations
    reinit = page.locator("#get-api-v2-workspaceagents-me-reinit")
    assert "text/event-stream" in reinit.inner_text()
    assert 'addEventListener("data"' in reinit.inner_text()
    assert page.locator("#schema-Workspace").is_visible()
    assert elsewhere == []
