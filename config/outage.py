"""What the web answers while PostgreSQL or the broker (Redis) is unreachable.

Guarantees:

- A request that fails because the database cannot be reached is answered ``503`` with
  ``Retry-After``: under ``/api/`` in the API's error shape ``{"error": "unavailable",
  "detail": …}``, elsewhere as a small HTML page (rendered without the database). Never Django's
  HTML 500 page, whichever entry point served it (``config.asgi``: the WSGI threads, the async
  views, the claim's fast path, which hands such a request to Django).
- Fast: after one such failure the process answers ``503`` at once, without waiting for the
  pool, while a cheap probe (one connect, at most every ``PROBE_INTERVAL`` s, one at a time)
  fails. The first request after the database's return finds it back; it waits at most for the
  pool's next connect attempt (about a second, ``config.env.database``).
- Quiet: the log says ``outage kind=database`` (or ``kind=broker``) once per kind and
  ``LOG_INTERVAL`` seconds, with the count of failures since the last line, instead of a
  traceback per request; and the 503 answers are not logged one by one.

"Unreachable" means a connection-level failure (no server, connection refused or cut, a server
shutting down or starting up, a pool timeout), not a query's own error: a deadlock or a
serialization failure keeps its usual handling.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable

import psycopg
from asgiref.sync import sync_to_async
from django.db import utils as db_utils
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views import defaults

from config import env
from config.http import SyncAsyncMiddleware

logger = logging.getLogger(__name__)

PROBE_INTERVAL = 0.25  # seconds between two probes of a server that is down
PROBE_CONNECT_TIMEOUT = 1
LOG_INTERVAL = 30.0
RETRY_AFTER = 5  # seconds, what clients are told to wait
# SQLSTATEs of a server that is going away or not yet ready (admin/crash shutdown, starting up).
_UNAVAILABLE_STATES = {"57P01", "57P02", "57P03"}

HTML = (
    "<!doctype html><html><head><title>Warmstart is unavailable</title></head><body>"
    "<h1>Temporarily unavailable</h1><p>Warmstart cannot reach its database right now. "
    "It recovers by itself; try again in a few seconds.</p></body></html>"
)


class Outage:
    """One kind of outage as one process sees it: down or not, and its log line.

    ``failed`` marks it down. While down, ``available`` answers False at once, except that one
    caller at a time, at most every ``PROBE_INTERVAL`` seconds, runs ``probe`` (a cheap
    connect): when that succeeds the outage is over for everyone. So a request right after the
    server's return is served, not refused by a stale state.
    """

    def __init__(self, kind: str, probe: Callable[[], object] | None = None) -> None:
        self.kind = kind
        self.probe = probe
        self._lock = threading.Lock()
        self._probing = threading.Lock()
        self._down = False
        self._probed_at = float("-inf")
        self._logged_at = float("-inf")
        self._unlogged = 0

    def failed(self, exc: BaseException) -> None:
        """Record a failure: down until a probe succeeds; logged once per ``LOG_INTERVAL``."""
        now = time.monotonic()
        with self._lock:
            self._down = True
            self._unlogged += 1
            if now - self._logged_at < LOG_INTERVAL:
                return
            self._logged_at, count, self._unlogged = now, self._unlogged, 0
        logger.warning(
            "outage kind=%s failures=%d error=%s (logged at most once per %g s)",
            self.kind,
            count,
            _one_line(exc),
            LOG_INTERVAL,
        )

    def recovered(self) -> None:
        with self._lock:
            was_down, self._down = self._down, False
        if was_down:
            logger.warning("outage kind=%s over", self.kind)

    @property
    def down(self) -> bool:
        return self._down

    def available(self) -> bool:
        """False while down (at once, or after a failed probe); True when up again."""
        if not self._down:
            return True
        if self.probe is None or not self._probing.acquire(blocking=False):
            return False  # another request is probing right now
        try:
            now = time.monotonic()
            if now - self._probed_at < PROBE_INTERVAL:
                return False
            self._probed_at = now
            try:
                self.probe()
            except Exception as exc:
                self.failed(exc)
                return False
            self.recovered()
            return True
        finally:
            self._probing.release()


def _probe_database() -> None:
    """Connect to the default database and disconnect (a unix socket: ~ms, or fails at once)."""
    from django.db import DEFAULT_DB_ALIAS, connections

    params = env.psycopg_params_of(connections[DEFAULT_DB_ALIAS].settings_dict)
    params["connect_timeout"] = PROBE_CONNECT_TIMEOUT
    psycopg.connect(**params).close()


database = Outage("database", probe=_probe_database)
broker = Outage("broker")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:200]}"


def is_database_unavailable(exc: BaseException | None) -> bool:
    """Whether ``exc`` (Django's wrapper or psycopg's own) says the database cannot be reached."""
    if isinstance(exc, db_utils.OperationalError | db_utils.InterfaceError):
        exc = exc.__cause__ or exc
    if isinstance(exc, psycopg.InterfaceError):
        return True  # e.g. "the connection is closed"
    if not isinstance(exc, psycopg.OperationalError):
        return False
    state = exc.sqlstate  # None: a client-side failure (connect failed, connection lost, pool)
    return state is None or state.startswith("08") or state in _UNAVAILABLE_STATES


def unavailable_response(request: HttpRequest) -> HttpResponse:
    """The 503 answer: JSON under /api/, HTML elsewhere, with ``Retry-After``."""
    if request.path.startswith("/api/"):
        response: HttpResponse = JsonResponse(
            {
                "error": "unavailable",
                "detail": "The database is unreachable; Warmstart recovers by itself. "
                "Retry after the number of seconds in Retry-After.",
            },
            status=503,
        )
    else:
        response = HttpResponse(HTML, status=503, content_type="text/html; charset=utf-8")
    response["Retry-After"] = str(RETRY_AFTER)
    # Django logs every 5xx response; the outage is logged once per interval instead.
    response._has_been_logged = True
    return response


class UnavailableMiddleware(SyncAsyncMiddleware):
    """Early in ``MIDDLEWARE`` (before anything that reads the database): while the database
    is down, answer 503 at once."""

    def _call(self, request: HttpRequest) -> HttpResponse:
        if not database.available():
            return unavailable_response(request)
        return self.get_response(request)

    async def _acall(self, request: HttpRequest) -> HttpResponse:
        if database.down and not await sync_to_async(database.available, thread_sensitive=False)():
            return unavailable_response(request)
        return await self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception):
        """A view that could not reach the database: 503, also with ``DEBUG`` on (where Django
        would show its debug page instead of calling ``handler500``)."""
        if not is_database_unavailable(exception):
            return None
        database.failed(exception)
        return unavailable_response(request)


def server_error(request: HttpRequest, template_name: str = "500.html") -> HttpResponse:
    """``handler500``: the 503 answer when the exception being handled is a database outage
    (raised anywhere: a view, a middleware, a session save); else a 500, JSON under ``/api/``
    and Django's own page elsewhere.

    Django calls this inside its ``except`` block, so ``sys.exc_info()`` is that exception.
    """
    exc = sys.exc_info()[1]
    if is_database_unavailable(exc):
        database.failed(exc)
        return unavailable_response(request)
    if request.path.startswith("/api/"):
        # Clients of the API read JSON, whatever the status (DESIGN.md §7's error shape).
        return JsonResponse(
            {"error": "internal_error", "detail": "The server failed to answer this request."},
            status=500,
        )
    return defaults.server_error(request, template_name)
