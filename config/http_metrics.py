"""HTTP request and process metrics of one web process, for `/metrics` (prebuilds.metrics).

Requests are counted by an ASGI middleware around the whole application (``config.asgi``), so
every way a request is served is counted the same: the claim's fast path on the event loop,
Django's WSGI handler on the thread pool, and Django's ASGI handler (the agents' reinit
long-poll and SSE). A Django middleware would miss the fast path.

Labels stay few on purpose: ``route`` is the resolved URL pattern (``/api/v2/workspaces/
<str:workspace_id>``, never the path with its ids), ``/static/`` for static files,
``unmatched`` for every path that resolves to nothing (scanners cannot add series); ``method``
is one of the usual verbs or ``other``; ``status`` is the answered code. Durations run from the
request's arrival to the end of its response body, so the reinit route's are the long-poll's
wait or the SSE stream's life (they land in the ``+Inf`` bucket), not its cost.

These figures are this process's alone (``instance`` in Prometheus tells them apart): scrape
every web process, not the load balancer, to see them all. The pool figures of
``prebuilds.metrics`` come from the database and are the same whichever process answers.
"""

from __future__ import annotations

import functools
import time
from typing import Any

from django.conf import settings
from django.urls import Resolver404, resolve
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
)

registry = CollectorRegistry(auto_describe=True)
# CPU, memory, open files and start time of this process (Linux /proc), the Python version and
# its garbage collector: prometheus-client's standard collectors.
for _collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
    registry.register(_collector)

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"
# The default buckets of prometheus-client, to 10 s: the API answers in milliseconds.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

REQUESTS = Counter(
    "warmstart_http_requests",
    "HTTP requests answered by this web process, by route, method and status.",
    ("route", "method", "status"),
    registry=registry,
)
DURATION = Histogram(
    "warmstart_http_request_duration_seconds",
    "Time from an HTTP request's arrival to the end of its response, by route and method.",
    ("route", "method"),
    buckets=DURATION_BUCKETS,
    registry=registry,
)


# The URLconf does not change while a process runs; bounded, because paths carry ids.
@functools.lru_cache(maxsize=4096)
def route_of(path: str) -> str:
    """The URL pattern ``path`` resolves to, as ``/pattern``; ``/static/`` or ``unmatched``."""
    static = "/" + settings.STATIC_URL.lstrip("/")
    if path.startswith(static):
        return static
    try:
        match = resolve(path)
    except Resolver404:
        return UNMATCHED
    return "/" + match.route


Receive = Any
Send = Any


class HttpMetrics:
    """ASGI middleware: counts and times every HTTP request of the wrapped application."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        # What the server answers when the application fails before starting a response.
        status = 500

        async def send_counted(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            method = scope["method"] if scope["method"] in METHODS else "other"
            route = route_of(scope["path"])
            REQUESTS.labels(route, method, str(status)).inc()
            DURATION.labels(route, method).observe(time.perf_counter() - started)
