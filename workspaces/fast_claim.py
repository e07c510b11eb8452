"""The claim's fast path: ``POST /api/v2/workspaces`` answered on the event loop.

Why it exists. A claim is the request users wait on, and it comes in bursts (everyone starts
work at nine). Served by the Django view, one claim costs a 2-vCPU machine ~8 ms of web-process
CPU: Django's request cycle and middleware, the hand-over to a WSGI thread and back, ORM model
plumbing, and Celery's publisher (a millisecond alone). One process tops out near 100 claims a
second, and twenty clients claiming back to back wait ~200 ms each. Here the same claim is ~2 ms
of CPU on the event loop: async psycopg with prepared statements (4 round trips), one Redis read
for the rate limiter and one ``LPUSH`` for the build's job. After the answer is sent, one Redis
``SET NX`` asks for the pool's refill (``prebuilds.refill``, coalesced).

What it serves: only a request it can answer completely, and exactly as the Django view would
(same rows written, same JSON, same headers) — a bearer API token of an active user who is a
member of the template's organization, the body ``{"name", "template_version_preset_id"}``, a
preset that keeps prebuilds on its template's active version, and an eligible prebuild. Every
other request is handed, body and all, to Django, which answers it as it always has: any error
(401, 404, 409, 429, 400, 413, 415), a miss (cold build, recorded as a miss), a session, a token due
for its ``last_used_at`` refresh, a host not in ``ALLOWED_HOSTS``, plain HTTP when HTTPS is
enforced, or a database or cache failure before the claim. So the fast path adds no behaviour of
its own; ``CLAIM_FAST_PATH=false`` turns it off. An error *during* the claim's transaction is a
500, as in the view (nothing is handed on: the claim might have committed).

It calls what the view calls: ``accounts.ratelimit.retry_after_async`` (the limiter's check
of the presented key id before any credential is looked at; a malformed token or an unknown key
id is never served here, so the per-address budget is the view's to apply), the token and
preset rows loaded as models (``config.sql``), ``prebuilds.claims.claim_prebuild_async`` (the
claim service's async twin: same statements, same guarantees),
``job_publisher.job_enqueue_async`` and ``serializers.workspace_json``; the response headers
are those Django's security and clickjacking middleware add, computed by that middleware
once per process.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any
from uuid import UUID

import psycopg_pool
from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.core.signals import setting_changed
from django.db import DEFAULT_DB_ALIAS, connections
from django.dispatch import receiver
from django.http import HttpRequest, JsonResponse
from django.http.request import split_domain_port, validate_host
from django.middleware.clickjacking import XFrameOptionsMiddleware
from django.middleware.security import SecurityMiddleware
from django.utils import timezone

from accounts import ratelimit, tokens
from accounts.api import is_json_media_type
from accounts.models import ApiToken, Membership, Organization, User
from accounts.services import API_TOKEN_PREFIX, api_token_touch_due, api_token_user
from config import env, outage
from config.loops import PerLoop
from config.sql import columns, load_row
from prebuilds.claims import claim_prebuild_async
from prebuilds.refill import refill_request_async
from workspaces import job_publisher, selectors, serializers
from workspaces.models import Template, TemplateVersion, TemplateVersionPreset
from workspaces.services import WorkspaceError

logger = logging.getLogger(__name__)

PATH = "/api/v2/workspaces"
FIELDS = {"name", "template_version_preset_id"}
# Connections of the fast path's own pool, per web process (beside DATABASE_POOL_SIZE). Claims
# are a few short statements; on the 2-vCPU benchmark machine four connections kept the
# database busy with the best tail latency (ten made its backends contend: p99 135 vs 70 ms).
POOL_SIZE = 4
# Seconds to wait for one of the pool's connections before handing the request to Django (a
# database outage: Django then answers 503, config.outage).
CONNECTION_TIMEOUT = env.POOL_TIMEOUT

USER_DEFERRED = ("password", "last_login", "first_name", "last_name", "email", "date_joined")

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[dict[str, Any], Receive, Send], Awaitable[None]]


def handles(scope: dict[str, Any]) -> bool:
    """Whether a request is the claim request's shape (then ``FastClaim`` sees it first)."""
    return (
        scope["type"] == "http"
        and scope["method"] == "POST"
        and scope["path"] == PATH
        and settings.CLAIM_FAST_PATH
        # A NUL in the query string is Django's to refuse (config.nul_guard), as for any request.
        and b"%00" not in scope.get("query_string", b"")
    )


@functools.cache
def _read_sql():
    """Token with its user, preset with version, template and organization, and membership."""
    groups = (
        columns(ApiToken, ("name", "created_at", "revoked_at")),
        # What the claim and the answer read of the user; the rest is deferred, as .only() does.
        columns(User, USER_DEFERRED),
        columns(TemplateVersionPreset),
        columns(TemplateVersion, ("source",)),  # the template file: large, never read here
        columns(Template),
        columns(Organization),
    )
    token, user, preset, version, template, organization = groups
    sql = f"""
    SELECT {token.select("t")}, {user.select("u")}, {preset.select("p")},
           {version.select("v")}, {template.select("tp")}, {organization.select("o")},
           EXISTS (SELECT 1 FROM {Membership._meta.db_table} m
                   WHERE m.user_id = u.id AND m.organization_id = tp.organization_id)
    FROM {ApiToken._meta.db_table} t
    JOIN {User._meta.db_table} u ON u.id = t.user_id
    CROSS JOIN {TemplateVersionPreset._meta.db_table} p
    JOIN {TemplateVersion._meta.db_table} v ON v.id = p.template_version_id
    JOIN {Template._meta.db_table} tp ON tp.id = v.template_id
    JOIN {Organization._meta.db_table} o ON o.id = tp.organization_id
    WHERE t.key_id = %s AND t.revoked_at IS NULL AND p.id = %s
    """
    return sql, groups


class _Probe(HttpRequest):
    """A request that is only secure or not: what the response middleware asks of one."""

    def __init__(self, secure: bool) -> None:
        super().__init__()
        self._secure = secure

    def is_secure(self) -> bool:
        return self._secure


@functools.cache
def _response_headers(secure: bool) -> tuple[tuple[bytes, bytes], ...]:
    """The headers Django's middleware adds to a JSON answer (HSTS only over HTTPS)."""
    response = JsonResponse({})
    request = _Probe(secure)
    # In the order Django runs them: the response goes back up MIDDLEWARE.
    XFrameOptionsMiddleware(lambda r: response).process_response(request, response)
    SecurityMiddleware(lambda r: response).process_response(request, response)
    return tuple(
        (name.lower().encode("latin-1"), value.encode("latin-1"))
        for name, value in response.headers.items()
        if name.lower() != "content-length"
    )


@receiver(setting_changed)
def _forget_response_headers(**kwargs: Any) -> None:
    """Settings change only in tests; the headers follow them there too."""
    _response_headers.cache_clear()


def _is_secure(scope: dict[str, Any], headers: dict[bytes, bytes]) -> bool:
    """``HttpRequest.is_secure()`` for this scope (``SECURE_PROXY_SSL_HEADER`` first)."""
    if settings.SECURE_PROXY_SSL_HEADER:
        meta_name, secure_value = settings.SECURE_PROXY_SSL_HEADER
        name = meta_name.removeprefix("HTTP_").lower().replace("_", "-").encode("latin-1")
        value = headers.get(name)
        if value is not None:
            return value.decode("latin-1").split(",", 1)[0].strip() == secure_value
    return scope.get("scheme") == "https"


class FastClaim:
    """ASGI handler of claim requests; hands everything it does not serve to ``fallback``."""

    def __init__(self, fallback: ASGIApp) -> None:
        self.fallback = fallback
        self._pools = PerLoop(_new_pool)

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        body, more, gone = await _read_body(receive, settings.DATA_UPLOAD_MAX_MEMORY_SIZE)
        if gone:
            return
        claimed = None if more else await self._claim(scope, body)
        if claimed is None:
            await self.fallback(scope, _replay(body, more, receive), send)
            return
        workspace, job, secure = claimed
        await job_publisher.job_enqueue_async(job.id, job.queue)
        answer = json.dumps(serializers.workspace_json(workspace), cls=DjangoJSONEncoder)
        payload = answer.encode()
        headers = [*_response_headers(secure), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": 201, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
        # After the answer: the claim committed in ``_claim``; its pool refills at once.
        build = selectors.latest_build(workspace)
        await refill_request_async(reason="claim", preset_id=build.preset_id if build else None)

    async def _claim(self, scope: dict[str, Any], body: bytes):
        """(workspace, job, secure) after a committed claim; None to hand the request to Django.

        Raises only from inside the claim's transaction (then the answer is a 500).
        """
        headers: dict[bytes, bytes] = {}
        for name, value in scope["headers"]:
            if name in headers and name in (b"authorization", b"host"):
                return None  # ambiguous: Django decides
            headers[name] = value
        host = headers.get(b"host", b"").decode("latin-1")
        domain, _port = split_domain_port(host)
        if not domain or not validate_host(domain, settings.ALLOWED_HOSTS):
            return None
        secure = _is_secure(scope, headers)
        if settings.SECURE_SSL_REDIRECT and not secure:
            return None
        if not is_json_media_type(headers.get(b"content-type", b"").decode("latin-1")):
            return None  # the view answers 415
        token = tokens.bearer(headers.get(b"authorization", b"").decode("latin-1") or None)
        parts = tokens.split(token, API_TOKEN_PREFIX) if token else None
        request = _parse(body)
        if parts is None or request is None:
            return None
        name, preset_id = request
        if outage.database.down:
            return None  # Django answers the 503 at once
        try:
            key = ratelimit.key_scope(ratelimit.API_TOKEN, parts[0])
            if await ratelimit.retry_after_async(key) is not None:
                return None  # blocked: the view answers 429
            pool = await self._pool()
            conn = await pool.getconn(timeout=CONNECTION_TIMEOUT)
        except ratelimit.CacheUnavailable:
            return None  # the limiter logged the outage once; the view decides (fails open)
        except Exception as exc:
            _handed_over(exc)
            return None
        try:
            try:
                loaded = await _read(conn, parts, preset_id)
            except Exception as exc:  # e.g. a connection broken by a database restart
                _handed_over(exc)
                return None
            if loaded is None:
                return None
            user, preset = loaded
            try:
                claimed = await claim_prebuild_async(conn, user, preset, name)
            except WorkspaceError:
                return None  # a bad or taken name, rolled back: the view answers it
        finally:
            await pool.putconn(conn)  # a broken connection is discarded by the pool
        if claimed is None:
            return None  # a miss: the view records it and builds cold
        workspace, job = claimed
        return workspace, job, secure

    async def _pool(self) -> psycopg_pool.AsyncConnectionPool:
        """This event loop's connection pool, opened on first use (opening it again is a no-op,
        so requests racing the first one wait for it too)."""
        pool = self._pools.get()
        if pool.closed:
            await pool.open()
        return pool

    async def aclose(self) -> None:
        """Close what this event loop holds: pool, broker and cache clients (tests run a loop
        per test; a web process keeps its one loop until it exits)."""
        pool = self._pools.pop()
        if pool is not None:
            await pool.close()
        await job_publisher.aclose()
        close = getattr(ratelimit.cache, "aclose_async", None)
        if close is not None:
            await close()


def _handed_over(exc: Exception) -> None:
    """A failure before the claim: an outage is logged (once per interval) and tripped, so
    Django answers this request and the next ones 503 without waiting; anything else is logged
    here and Django answers as usual."""
    if outage.is_database_unavailable(exc):
        outage.database.failed(exc)
    else:
        logger.warning("fast_claim_handed_over", exc_info=True)


def _new_pool() -> psycopg_pool.AsyncConnectionPool:
    """A pool (not open yet) with Django's own connection parameters: its adapters (JSON as
    text for the model converters, timestamps in UTC) and its prepared-statement threshold."""
    params = connections[DEFAULT_DB_ALIAS].get_connection_params()
    params.pop("cursor_factory", None)  # Django's sync cursor class
    return psycopg_pool.AsyncConnectionPool(
        kwargs={**params, "autocommit": True},
        min_size=POOL_SIZE,
        max_size=POOL_SIZE,
        open=False,
        name="fast-claim",
        # As Django's pool (config.env.database): retry connecting ~1 s apart after an outage.
        reconnect_timeout=env.POOL_RECONNECT_TIMEOUT,
    )


def _parse(body: bytes) -> tuple[str, UUID] | None:
    """(name, preset id) from a body of exactly the claim's two string fields, else None."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(document, dict) or set(document) != FIELDS:
        return None
    name, preset = document["name"], document["template_version_preset_id"]
    if not isinstance(name, str) or not isinstance(preset, str):
        return None
    preset_id = selectors.parse_uuid(preset)
    return None if preset_id is None else (name, preset_id)


async def _read(conn, parts: tuple[str, str], preset_id: UUID):
    """(user, preset) when the token is valid and fresh and the preset is the user's to claim
    from (member, template live, preset on the active version, keeping prebuilds); else None.

    The token checks are ``api_token_authenticate``'s own; the preset checks are the ones
    ``workspaces.creation.workspace_request`` raises errors for (keep them in step): here any
    failure only means "not ours", and the view then gives the error.
    """
    key_id, secret = parts
    sql, groups = _read_sql()
    cursor = await conn.execute(sql, [key_id, preset_id], prepare=True)
    row = await cursor.fetchone()
    if row is None:
        return None
    api_token, user, preset, version, template, organization = load_row(row[:-1], *groups)
    member = row[-1]
    api_token.user = user
    if api_token_user(api_token, secret) is None:
        return None
    if api_token_touch_due(api_token, timezone.now()):
        return None  # the view writes last_used_at
    if not member or template.deleted or preset.desired_instances is None:
        return None
    if template.active_version_id != preset.template_version_id:
        return None
    template.organization = organization
    version.template = template
    preset.template_version = version
    return user, preset


async def _read_body(receive: Receive, limit: int | None) -> tuple[bytes, bool, bool]:
    """(body so far, more to come, client gone). Stops reading past ``limit`` bytes."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"", False, True
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        more = message.get("more_body", False)
        if not more or (limit is not None and size > limit):
            return b"".join(chunks), more, False


def _replay(body: bytes, more: bool, receive: Receive) -> Receive:
    """A ``receive`` that gives the body read so far first, then the rest of the stream."""
    pending = [{"type": "http.request", "body": body, "more_body": more}]

    async def replay() -> dict[str, Any]:
        if pending:
            return pending.pop()
        return await receive()

    return replay
