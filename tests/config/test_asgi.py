"""The ASGI entry point sends async views to Django's ASGI handler and the rest to WSGI."""

from __future__ import annotations

import pytest

from config.asgi import is_async_view


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        # The agents' reinit long-poll/SSE: must stay on the event loop (a thousand waiters).
        ("/api/v2/workspaceagents/me/reinit", True),
        # Sync views: served through WSGI in the thread pool.
        ("/api/v2/workspaces", False),
        ("/prebuilds/", False),
        ("/login/", False),
        ("/admin/", False),
        # Unknown paths get Django's (sync) 404 handling.
        ("/no/such/page", False),
    ],
)
def test_it_routes_by_the_resolved_view(path, expected):
    assert is_async_view(path) is expected
