"""ASGI entry point (uvicorn): async views on the event loop, sync views as WSGI in threads.

Django under ASGI serves a *sync* view by hopping between the event loop and a worker thread
for every hook of every sync-style middleware (``MiddlewareMixin.__acall__`` wraps each
``process_request``/``process_response`` in ``sync_to_async``): about thirty thread hops per
request with our middleware stack. That made a trivial 401 answer cost ~5 ms of CPU; with 20
concurrent clients one web process managed ~190 requests/s. So this application routes by the
resolved view:

- **async views** (the agents' reinit long-poll/SSE, which must hold a thousand waiters
  without a thread each) go to Django's ASGI handler, as before;
- **everything else** (websocket scopes aside, every sync view, static files, 404s) goes to
  Django's WSGI handler run by ``a2wsgi`` on a bounded pool of ``DATABASE_POOL_SIZE`` threads:
  the whole middleware chain and view run in one thread, one hop per request (~550
  requests/s for the same 401 on the same machine). The pool size matches the database
  connection pool, since a sync request holds at most one connection.

One request shape comes before both: the claim (``POST /api/v2/workspaces``) goes to
``workspaces.fast_claim``, which answers the common case on the event loop and hands every other
request of that shape to the WSGI handler unchanged.

A database outage is answered the same way on every path (``config.outage``: 503, JSON under
``/api/``): the fast path hands such a request to Django, whose first middleware and
``handler500`` answer it.

Both handlers share settings, URLs, middleware and signals; a request's behaviour does not
depend on which one serves it (``request_finished`` still returns the thread's database
connection to the pool when the response is closed).
"""

from __future__ import annotations

import functools
import gc
import os
from typing import Any

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

from a2wsgi import WSGIMiddleware  # noqa: E402
from asgiref.sync import iscoroutinefunction  # noqa: E402
from django.conf import settings  # noqa: E402
from django.core.asgi import get_asgi_application  # noqa: E402
from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.urls import Resolver404, resolve  # noqa: E402

from config.http_metrics import HttpMetrics  # noqa: E402


# Resolving costs about as much as a small view's own work and most requests repeat a few
# paths (the claim is always ``POST /api/v2/workspaces``); the URLconf does not change while a
# process runs. Bounded, because paths carry ids.
@functools.lru_cache(maxsize=4096)
def is_async_view(path: str) -> bool:
    """Whether ``path`` resolves to an async view (unknown paths are not: their 404 is sync)."""
    try:
        match = resolve(path)
    except Resolver404:
        return False
    return iscoroutinefunction(match.func)


class Application:
    """The ASGI callable: dispatch each HTTP request to the handler its view needs."""

    def __init__(self) -> None:
        self.asgi = get_asgi_application()  # sets Django up
        self.wsgi = WSGIMiddleware(get_wsgi_application(), workers=settings.DATABASE_POOL_SIZE)
        from workspaces import fast_claim  # models: only once Django is set up

        self.handles_claim = fast_claim.handles
        self.claim = fast_claim.FastClaim(fallback=self.wsgi)
        # Counted at the very entry, so every handler's requests are (config/http_metrics.py).
        self.counted = HttpMetrics(self.dispatch)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await self.counted(scope, receive, send)

    async def dispatch(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Hand the request to the fast claim, the WSGI handler or the ASGI handler."""
        if self.handles_claim(scope):
            await self.claim(scope, receive, send)
        elif scope["type"] == "http" and not is_async_view(scope["path"]):
            await self.wsgi(scope, receive, send)
        else:
            await self.asgi(scope, receive, send)


application = Application()
# Everything loaded so far lives as long as the process: keep it out of the cyclic garbage
# collector's way, so a full collection walks only what requests allocate (tail latency).
gc.freeze()
