"""Rate limiting of failed credentials, scoped so that nobody can spend someone else's budget.

A valid credential is never refused because of other clients' failures. Every counter is keyed
by what the failing client *presented*, not only by where it came from:

- **Bearer tokens** (API tokens ``wst_…`` and agent tokens ``wsa_…``, counted apart as kinds
  ``api_token`` and ``agent_token``) are ``<prefix>_<key id>_<secret>`` (``accounts.tokens``).
  A known key id presented with a wrong secret counts against **that key id**: after
  ``RATELIMIT_TOKEN_FAILURES`` such failures within ``RATELIMIT_WINDOW`` seconds of the first,
  every request presenting that key id is refused (429) **without its secret being checked**
  until the window ends, so a guess made meanwhile cannot succeed, not even a right one.
  The key id appears only inside the token itself (and to staff in the admin): someone who
  can present it has seen the token, so this is a targeted guess at one credential, and it
  blocks that credential only. Every other token, from the same address included, passes.
- **Malformed tokens** (no parsable key id for that kind) and **unknown key ids** teach an
  attacker nothing about any real credential; they count against the client **address**, with
  the far larger budget ``RATELIMIT_MALFORMED_FAILURES``. Once it is spent, malformed tokens
  and unknown key ids from that address are answered 429 — and still no well-formed token with
  a known key id is ever refused by it. This is what keeps a process on a worker host (any
  workspace's startup script) from locking out that host's agents, and one user of an office
  address from locking out the others.
- **Sign-ins** (our login page and the admin login) count per **(user name, address)**:
  ``RATELIMIT_LOGIN_FAILURES`` failures refuse further sign-ins *as that user from that
  address*, unchecked. A per-user-name-only lock would let anyone lock any user out with ten
  wrong passwords; a per-address-only lock lets one person lock out a whole office. Guessing one
  user's password from many addresses is bounded by a second, much larger budget per **user
  name** from all addresses, ``RATELIMIT_LOGIN_USER_FAILURES``: spending it *does* lock that
  user out of password sign-in (not out of API tokens or existing sessions) for the window; that
  costs an attacker many addresses and many guesses, and it is the price of capping distributed
  guessing (0 turns it off). User names are compared case-insensitively here, so varying the
  case buys no fresh budget. Unknown user names are counted exactly like known ones: the answers
  never tell whether a user exists.

Further guarantees:

- Only **failures** are counted, never a successful request, and requests without an
  ``Authorization`` header are neither counted nor refused. 0 disables a limit.
- A bearer token that we issued but that is no longer valid (a retired agent, a revoked API
  token) is not a guess: presenting it proves possession of a real secret. It is answered 401
  like any bad token but not counted.
- Counters live in Django's ``default`` cache: Redis shared by every web process when the
  broker is Redis (see ``config.settings._caches``), otherwise per process. While the cache is
  unreachable the limiter fails **open** (allows, counts nothing): a Redis outage must not
  become an outage of every authenticated endpoint. It logs ONE warning when an outage starts
  (``ratelimit_cache_unavailable``, no traceback), a reminder every ``OUTAGE_REMINDER``
  seconds while it lasts, and ``ratelimit_cache_back`` when it ends; during the outage it tries
  the cache again at most once per ``OUTAGE_PROBE_INTERVAL`` (other requests skip it at once),
  so it recovers by itself within that interval of Redis's return.

The client address is ``REMOTE_ADDR`` (IPv6 by /64, since one host usually owns a whole /64).
Behind a reverse proxy that is the proxy's address: have the ASGI server set the real client
address (``uvicorn --proxy-headers --forwarded-allow-ips=<proxy address>``). ``X-Forwarded-For``
is never read here, because any client can send one.

Why not ``django-ratelimit``: it counts every request hitting a view (successes included) and
decides after the view ran, while we must count only failures, decide before the credentials
are checked, and hook Django's authentication (the admin login) rather than a view.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
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

from accounts import tokens

logger = logging.getLogger(__name__)

LOGIN = "login"
API_TOKEN = "api_token"
AGENT_TOKEN = "agent_token"
KINDS = (LOGIN, API_TOKEN, AGENT_TOKEN)

# While the cache is unreachable: seconds between two attempts to use it again (every other
# request fails open at once, without waiting for a connection), and between two log lines.
OUTAGE_PROBE_INTERVAL = 1.0
OUTAGE_REMINDER = 60.0

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


class CacheUnavailable(Exception):
    """The limiter's cache cannot be used right now (already logged by the limiter)."""


# --- Scopes: what one counter counts -----------------------------------------------------


@dataclass(frozen=True)
class Scope:
    """One failure counter: its cache key and the setting holding its limit (read per call,
    so a changed setting applies at once)."""

    kind: str
    key: str
    setting: str

    @property
    def limit(self) -> int:
        return getattr(settings, self.setting)

    @property
    def keys(self) -> tuple[str, str]:
        return f"{self.key}:failures", f"{self.key}:since"


def _digest(value: str) -> str:
    # Key ids and user names come from the client: hashed, they make short cache keys of safe
    # characters whatever was sent.
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def key_scope(kind: str, key_id: str) -> Scope:
    """Wrong secrets presented with the known key id ``key_id`` of a ``kind`` token."""
    return Scope(kind, f"ratelimit:{kind}:key:{_digest(key_id)}", "RATELIMIT_TOKEN_FAILURES")


def address_scope(kind: str, address: str) -> Scope:
    """Malformed ``kind`` tokens and unknown key ids from ``address`` (``address_of``)."""
    return Scope(kind, f"ratelimit:{kind}:address:{address}", "RATELIMIT_MALFORMED_FAILURES")


def login_scopes(username: str, address: str) -> tuple[Scope, Scope]:
    """Failed sign-ins as ``username``: from ``address``, and from everywhere."""
    user = _digest(username.casefold())
    return (
        Scope(LOGIN, f"ratelimit:login:user:{user}:address:{address}", "RATELIMIT_LOGIN_FAILURES"),
        Scope(LOGIN, f"ratelimit:login:user:{user}", "RATELIMIT_LOGIN_USER_FAILURES"),
    )


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


# --- The cache, and what happens when it is gone ----------------------------------------


class _CacheHealth:
    """Whether the cache answered last time; logs an outage once, not once per request.

    Shared by every thread of the process (sync views run in a thread pool) and by the event
    loop; the lock only guards the transitions and the log lines.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.down_since: float | None = None
        self._next_probe = 0.0
        self._last_log = 0.0
        self._skipped = 0

    def usable(self) -> bool:
        """False while down, except for one caller per ``OUTAGE_PROBE_INTERVAL`` (the probe)."""
        if self.down_since is None:
            return True
        with self._lock:
            now = time.monotonic()
            if self.down_since is None or now >= self._next_probe:
                self._next_probe = now + OUTAGE_PROBE_INTERVAL
                return True
            self._skipped += 1
            return False

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            now = time.monotonic()
            self._next_probe = now + OUTAGE_PROBE_INTERVAL
            if self.down_since is None:
                self.down_since = self._last_log = now
                self._skipped = 0
                logger.warning(
                    "ratelimit_cache_unavailable error=%s: %s; not limiting until it is back",
                    type(exc).__name__,
                    exc,
                )
            elif now - self._last_log >= OUTAGE_REMINDER:
                self._last_log = now
                logger.warning(
                    "ratelimit_cache_unavailable for=%.0fs requests_not_limited=%d error=%s: %s",
                    now - self.down_since,
                    self._skipped,
                    type(exc).__name__,
                    exc,
                )

    def succeeded(self) -> None:
        if self.down_since is None:
            return
        with self._lock:
            if self.down_since is not None:
                logger.warning(
                    "ratelimit_cache_back after=%.1fs requests_not_limited=%d",
                    time.monotonic() - self.down_since,
                    self._skipped,
                )
                self.down_since = None


_health = _CacheHealth()


def _use_cache(operation: Callable[[], T], default: T) -> T:
    """``operation()`` on the cache, or ``default`` (fail open) while the cache is down."""
    if not _health.usable():
        return default
    try:
        result = operation()
    except Exception as exc:  # redis-py's errors, a timeout, a refused socket...
        _health.failed(exc)
        return default
    _health.succeeded()
    return result


def _wait(found: dict[str, Any], scopes: Iterable[Scope]) -> int | None:
    """Seconds until every blocked scope among ``scopes`` is open again, or None."""
    now = time.time()
    window = settings.RATELIMIT_WINDOW
    waits = []
    for scope in scopes:
        count_key, since_key = scope.keys
        if found.get(count_key, 0) >= scope.limit:
            since = found.get(since_key, now)
            waits.append(max(1, math.ceil(since + window - now)))
    return max(waits) if waits else None


def _limited(scopes: Iterable[Scope]) -> list[Scope]:
    return [scope for scope in scopes if scope.limit > 0]


def retry_after(*scopes: Scope) -> int | None:
    """Seconds until a client blocked in any of ``scopes`` may try again; None when not
    blocked, when those limits are off, or when the cache is unreachable (fail open)."""
    active = _limited(scopes)
    if not active:
        return None
    keys = [key for scope in active for key in scope.keys]
    found = _use_cache(lambda: cache.get_many(keys), {})
    return _wait(found, active)


async def retry_after_async(*scopes: Scope) -> int | None:
    """``retry_after`` on the event loop, for the claim's fast path.

    Unlike ``retry_after`` it does not fail open: it raises ``CacheUnavailable`` (the outage
    is logged here, once), and the caller hands the request to the Django view, which decides.
    """
    active = _limited(scopes)
    if not active:
        return None
    if not _health.usable():
        raise CacheUnavailable
    try:
        found = await cache.aget_many([key for scope in active for key in scope.keys])
    except Exception as exc:
        _health.failed(exc)
        raise CacheUnavailable from exc
    _health.succeeded()
    return _wait(found, active)


def record_failure(*scopes: Scope) -> None:
    """Count one failure in each of ``scopes`` (nothing while the cache is down).

    A scope's window starts at its first failure and both its keys expire with it. ``add`` +
    ``incr`` are atomic in Redis, so concurrent failures from several web processes all count.
    """
    active = _limited(scopes)
    if not active:
        return
    window = settings.RATELIMIT_WINDOW

    def count() -> None:
        for scope in active:
            count_key, since_key = scope.keys
            cache.add(since_key, time.time(), timeout=window)
            cache.add(count_key, 0, timeout=window)
            try:
                cache.incr(count_key)
            except ValueError:
                # The key expired between add and incr: this failure opens a new window.
                cache.add(count_key, 1, timeout=window)

    _use_cache(count, None)


def reset(*scopes: Scope) -> None:
    """Forget the failures counted in ``scopes``."""
    cache.delete_many([key for scope in scopes for key in scope.keys])


def _refuse_if_blocked(*scopes: Scope) -> None:
    wait = retry_after(*scopes)
    if wait is not None:
        raise RateLimited(scopes[0].kind, wait)


# --- Bearer tokens -----------------------------------------------------------------------


def token_attempt(
    request: HttpRequest,
    kind: str,
    parts: tuple[str, str] | None,
    check: Callable[[], T | None],
    *,
    hashes: Callable[[str], Iterable[str]],
) -> T | None:
    """Run the bearer-token ``check`` unless the presented key id is blocked; count a failure.

    ``parts`` is the presented token's ``(key id, secret)`` when it is well formed for ``kind``
    (``tokens.split``), else None. ``hashes(key_id)`` gives the secret hashes stored under a key
    id in any state (revoked, retired): none for an unknown key id; it is only called after
    ``check`` failed.

    Requests without an ``Authorization`` header make no guess: ``check`` runs (it may accept
    a session) and nothing is counted or refused. With one, ``RateLimited`` is raised without
    calling ``check`` while the key id (or, for a malformed token, the address) is blocked; a
    failed unknown key id is refused once the address's budget is spent. A valid token of a key
    id that is not blocked is never refused, whatever else came from its address.
    """
    if "HTTP_AUTHORIZATION" not in request.META:
        return check()
    address = address_scope(kind, client_address(request))
    if parts is None:
        _refuse_if_blocked(address)
        result = check()
        if result is None:
            record_failure(address)
        return result
    key_id, secret = parts
    key = key_scope(kind, key_id)
    _refuse_if_blocked(key)
    result = check()
    if result is not None:
        return result
    stored = list(hashes(key_id))
    if not stored:
        _refuse_if_blocked(address)
        record_failure(address)
    elif not any(tokens.secret_matches(secret, secret_hash) for secret_hash in stored):
        record_failure(key)
    # else: a token we issued, since revoked or retired: not a guess, not counted.
    return None


def retry_text(seconds: int) -> str:
    minutes = math.ceil(seconds / 60)
    return f"{minutes} minute{'s' if minutes != 1 else ''}"


# --- Sign-in: the login page and the admin login -----------------------------------------


def login_retry_after(request: HttpRequest, username: str) -> int | None:
    """Seconds until the request's client may try to sign in as ``username`` again, or None."""
    return retry_after(*login_scopes(username, client_address(request)))


class LoginRateLimitBackend(BaseBackend):
    """First in ``AUTHENTICATION_BACKENDS``: stops ``authenticate()`` for a blocked sign-in.

    Raising ``PermissionDenied`` makes Django skip every later backend, so no password is
    checked on any sign-in path that passes the request (our login page, the admin login).
    It never authenticates anyone itself.
    """

    def authenticate(self, request: HttpRequest | None, **credentials: Any) -> None:
        username = credentials.get("username")
        if request is None or not isinstance(username, str):
            return None
        wait = login_retry_after(request, username)
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
    """Every failed ``authenticate(request, username=...)`` counts, whichever page called it."""
    username = credentials.get("username")
    if request is None or not isinstance(username, str):
        return
    if not getattr(request, "ratelimit_blocked", False):
        record_failure(*login_scopes(username, client_address(request)))


class RateLimitedAuthenticationForm(AuthenticationForm):
    """The sign-in form; a blocked sign-in gets a clear error and its password is not checked."""

    def clean(self) -> dict[str, Any]:
        username = self.cleaned_data.get("username")
        if self.request is not None and isinstance(username, str):
            wait = login_retry_after(self.request, username)
            if wait is not None:
                self.retry_after = wait
                raise forms.ValidationError(
                    f"Too many failed sign-ins, try again in {retry_text(wait)}.",
                    code="rate_limited",
                )
        return super().clean()


class LoginView(auth_views.LoginView):
    """Django's login view with the rate-limited form; a blocked sign-in is answered 429."""

    authentication_form = RateLimitedAuthenticationForm

    def form_invalid(self, form: RateLimitedAuthenticationForm) -> HttpResponse:
        response = super().form_invalid(form)
        wait = getattr(form, "retry_after", None)
        if wait is not None:
            response.status_code = 429
            response["Retry-After"] = str(wait)
        return response
