"""Rate limiting of failed credentials per client address: sign-ins and bearer tokens.

Guarantees:

- Only **failures** are counted, never a successful request. After
  ``RATELIMIT_LOGIN_FAILURES`` failed sign-ins, or ``RATELIMIT_TOKEN_FAILURES`` failed API (or
  agent) tokens, from one client within ``RATELIMIT_WINDOW`` seconds of the first one, further
  attempts of that kind are refused **without checking the credentials** until the window ends
  (so a guess made while blocked cannot succeed, not even a right one). 0 disables a limit.
- Kinds are counted apart: ``login``, ``api_token`` and ``agent_token``. Agents of many
  workspaces reach us from the address of their worker host and users from their office's
  address; a burst of one kind must not lock out the other.
- A bearer token that we issued but that is no longer valid (a retired agent, a revoked API
  token) is not a guess: presenting it proves possession of a real secret and teaches nothing.
  It is answered 401 like any bad token but not counted, so a worker host retiring many agents
  at once never locks out its healthy ones.
- Counters live in Django's ``default`` cache: Redis shared by every web process when the
  broker is Redis (see ``config.settings._caches``), otherwise per process. A cache outage
  fails **open** (logged): the limiter must not turn a Redis blip into an outage of every
  authenticated endpoint.

The client is ``REMOTE_ADDR`` (IPv6 by /64, since one host usually owns a whole /64). Behind a
reverse proxy that is the proxy's address: have the ASGI server set the real client address
(``uvicorn --proxy-headers --forwarded-allow-ips=<proxy address>``). ``X-Forwarded-For`` is
never read here, because any client can send one.

Why not ``django-ratelimit``: it counts every request hitting a view (successes included) and
decides after the view ran, while we must count only failures, decide before the credentials
are checked, and hook Django's authentication (the admin login) rather than a view.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from django import forms
from django.conf import settings
from django.contrib.auth import views as auth_views
from django.contrib.auth.backends import BaseBackend
from django.contrib.auth.forms import AuthenticationForm
from django.contrib.auth.signals import user_login_failed
from django.core.cache import caches
from django.core.exceptions import PermissionDenied
from django.dispatch import receiver
from django.http import HttpRequest, HttpResponse

logger = logging.getLogger(__name__)

LOGIN = "login"
API_TOKEN = "api_token"
AGENT_TOKEN = "agent_token"
KINDS = (LOGIN, API_TOKEN, AGENT_TOKEN)

T = TypeVar("T")

# One client of the ``default`` cache for the whole process. ``django.core.cache.cache`` is
# context-local, and every request served through config.asgi runs in a fresh context, so it
# would open a new Redis connection per request (a fifth of the CPU of a claim request).
# redis-py's client and connection pool are thread-safe.
cache = caches.create_connection("default")


@dataclass(frozen=True)
class RateLimited(Exception):
    """The client reached the limit of ``kind``; it may try again in ``retry_after`` seconds."""

    kind: str
    retry_after: int

    def __str__(self) -> str:
        return f"{self.kind} rate limited for {self.retry_after}s"


def _limit(kind: str) -> int:
    if kind == LOGIN:
        return settings.RATELIMIT_LOGIN_FAILURES
    return settings.RATELIMIT_TOKEN_FAILURES


def client_address(request: HttpRequest) -> str:
    """The client ``REMOTE_ADDR`` names; IPv6 addresses by their /64 network."""
    return address_of(request.META.get("REMOTE_ADDR") or "")


def address_of(remote_addr: str) -> str:
    """The counted client of a ``REMOTE_ADDR`` value (``client_address`` without a request)."""
    try:
        address = ipaddress.ip_address(remote_addr.strip())
    except ValueError:
        # No usable address (e.g. served on a unix socket without proxy headers): every such
        # client shares one counter, which is the safe direction for a limiter.
        return "unknown"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def _keys(kind: str, address: str) -> tuple[str, str]:
    base = f"ratelimit:{kind}:{address}"
    return f"{base}:failures", f"{base}:since"


def retry_after(request: HttpRequest, kind: str) -> int | None:
    """Seconds until ``request``'s client may try ``kind`` again, or None when not blocked."""
    limit = _limit(kind)
    if limit <= 0:
        return None
    keys = _keys(kind, client_address(request))
    try:
        found = cache.get_many(keys)
    except Exception:
        logger.warning("rate limiter: cache unavailable, not limiting", exc_info=True)
        return None
    return _wait(found, keys, limit)


async def retry_after_async(address: str, kind: str) -> int | None:
    """``retry_after`` for the client ``address`` (as ``address_of`` gives), on the event loop.

    Unlike ``retry_after`` it does not fail open: an unreachable cache raises, and the caller
    (the claim's fast path) hands the request to the normal path, which decides.
    """
    limit = _limit(kind)
    if limit <= 0:
        return None
    keys = _keys(kind, address)
    return _wait(await cache.aget_many(keys), keys, limit)


def _wait(found: dict[str, Any], keys: tuple[str, str], limit: int) -> int | None:
    count_key, since_key = keys
    if found.get(count_key, 0) < limit:
        return None
    window = settings.RATELIMIT_WINDOW
    since = found.get(since_key, time.time())
    return max(1, math.ceil(since + window - time.time()))


def record_failure(request: HttpRequest, kind: str) -> None:
    """Count one failed attempt of ``kind`` for ``request``'s client.

    The window starts at the first failure and both keys expire with it. ``add`` + ``incr`` are
    atomic in Redis, so concurrent failures from several web processes are all counted.
    """
    if _limit(kind) <= 0:
        return
    window = settings.RATELIMIT_WINDOW
    count_key, since_key = _keys(kind, client_address(request))
    try:
        cache.add(since_key, time.time(), timeout=window)
        cache.add(count_key, 0, timeout=window)
        try:
            cache.incr(count_key)
        except ValueError:
            # The key expired between add and incr: this failure opens a new window.
            cache.add(count_key, 1, timeout=window)
    except Exception:
        logger.warning("rate limiter: cache unavailable, failure not counted", exc_info=True)


def reset(*, address: str, kind: str) -> None:
    """Forget the failures of ``address`` (as ``client_address`` returns it) for ``kind``."""
    cache.delete_many(list(_keys(kind, address)))


def token_attempt(
    request: HttpRequest,
    kind: str,
    check: Callable[[], T | None],
    *,
    issued: Callable[[], bool] = lambda: False,
) -> T | None:
    """Run the bearer-token ``check`` unless the client is blocked; count it if it fails.

    Requests without an ``Authorization`` header make no guess: ``check`` runs (it may accept
    a session) and nothing is counted or refused. With one: raises ``RateLimited`` without
    calling ``check`` while the client is blocked; a None answer counts as a failure unless
    ``issued()`` says the token was genuinely issued by us (retired/revoked: not a guess).
    """
    if "HTTP_AUTHORIZATION" not in request.META:
        return check()
    wait = retry_after(request, kind)
    if wait is not None:
        raise RateLimited(kind, wait)
    result = check()
    if result is None and not issued():
        record_failure(request, kind)
    return result


def retry_text(seconds: int) -> str:
    minutes = math.ceil(seconds / 60)
    return f"{minutes} minute{'s' if minutes != 1 else ''}"


# --- Sign-in: the login page and the admin login -----------------------------------------


class LoginRateLimitBackend(BaseBackend):
    """First in ``AUTHENTICATION_BACKENDS``: stops ``authenticate()`` for a blocked client.

    Raising ``PermissionDenied`` makes Django skip every later backend, so no password is
    checked on any sign-in path that passes the request (our login page, the admin login).
    It never authenticates anyone itself.
    """

    def authenticate(self, request: HttpRequest | None, **credentials: Any) -> None:
        if request is None:
            return None
        wait = retry_after(request, LOGIN)
        if wait is not None:
            request.ratelimit_blocked = True  # not counted again by the receiver below
            raise PermissionDenied(f"Too many failed sign-ins, try again in {retry_text(wait)}.")
        return None

    def get_user(self, user_id: Any):
        # ``login(user)`` without a backend (``Client.force_login``, scripts) records the first
        # backend in the session; resolve those sessions exactly like UserBackend does.
        from accounts.backends import UserBackend

        return UserBackend().get_user(user_id)


@receiver(user_login_failed, dispatch_uid="accounts.ratelimit.count_login_failure")
def count_login_failure(sender: Any, credentials: dict, request: HttpRequest | None = None, **kw):
    """Every failed ``authenticate(request, ...)`` counts, whichever page called it."""
    if request is not None and not getattr(request, "ratelimit_blocked", False):
        record_failure(request, LOGIN)


class RateLimitedAuthenticationForm(AuthenticationForm):
    """The sign-in form; a blocked client gets a clear error and its password is not checked."""

    def clean(self) -> dict[str, Any]:
        if self.request is not None:
            wait = retry_after(self.request, LOGIN)
            if wait is not None:
                self.retry_after = wait
                raise forms.ValidationError(
                    f"Too many failed sign-ins, try again in {retry_text(wait)}.",
                    code="rate_limited",
                )
        return super().clean()


class LoginView(auth_views.LoginView):
    """Django's login view with the rate-limited form; a blocked client is answered 429."""

    authentication_form = RateLimitedAuthenticationForm

    def form_invalid(self, form: RateLimitedAuthenticationForm) -> HttpResponse:
        response = super().form_invalid(form)
        wait = getattr(form, "retry_after", None)
        if wait is not None:
            response.status_code = 429
            response["Retry-After"] = str(wait)
        return response
