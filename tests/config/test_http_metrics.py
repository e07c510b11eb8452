"""The HTTP request metrics middleware (``config.http_metrics``) around small ASGI apps."""

from __future__ import annotations

import asyncio

import pytest

from config.http_metrics import REQUESTS, UNMATCHED, HttpMetrics, route_of


def _count(route: str, method: str, status: str) -> float:
    return REQUESTS.labels(route, method, status)._value.get()


def _call(app, scope: dict) -> None:
    async def receive() -> dict:
        return {"type": "http.request", "body": b""}

    async def send(message: dict) -> None:
        pass

    asyncio.run(HttpMetrics(app)(scope, receive, send))


def _scope(method: str = "GET", path: str = "/login/") -> dict:
    return {"type": "http", "method": method, "path": path}


async def _answer_204(scope, receive, send) -> None:
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def test_it_labels_by_url_pattern_not_by_path():
    assert route_of("/api/v2/workspaces/0b0e1c8e-5a4e-4f3b-9a51-2f1f0e1d2c3b") == (
        "/api/v2/workspaces/<str:workspace_id>"
    )
    assert route_of("/static/css/app.css") == "/static/"
    assert route_of("/wp-login.php") == UNMATCHED


def test_it_counts_the_status_the_application_answered():
    before = _count("/login/", "GET", "204")

    _call(_answer_204, _scope())

    assert _count("/login/", "GET", "204") == before + 1


def test_an_application_that_fails_before_answering_counts_as_500_and_still_raises():
    async def broken(scope, receive, send) -> None:
        raise RuntimeError("boom")

    before = _count("/login/", "POST", "500")

    with pytest.raises(RuntimeError):
        _call(broken, _scope("POST"))

    assert _count("/login/", "POST", "500") == before + 1


def test_unusual_methods_share_one_label():
    before = _count("/login/", "other", "204")

    _call(_answer_204, _scope("PROPFIND"))

    assert _count("/login/", "other", "204") == before + 1
    methods = {s.labels["method"] for metric in REQUESTS.collect() for s in metric.samples}
    assert "PROPFIND" not in methods


def test_lifespan_and_websocket_scopes_pass_through_uncounted():
    seen = []

    async def app(scope, receive, send) -> None:
        seen.append(scope["type"])

    _call(app, {"type": "lifespan"})

    assert seen == ["lifespan"]
