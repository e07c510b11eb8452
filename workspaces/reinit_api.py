"""``GET /api/v2/workspaceagents/me/reinit``: long-poll (JSON) or SSE, for workspace agents.

Async views: under ASGI a waiting agent costs one coroutine, not a thread or a database
connection. See ``workspaces.reinit`` for the delivery guarantees.

The SSE stream follows the HTML standard's event-stream format: every event carries a
``retry:`` hint; ``event: ping`` heartbeats have no ``id:`` (so they leave the client's last
event id alone); then one ``event: data`` carries ``id: <build number>:<owner id>`` and the
same JSON as the long-poll, and the stream ends. The event is named ``data`` as in Coder
(DESIGN.md section 7); a browser's ``EventSource.onmessage`` only sees unnamed events, so
listen with ``addEventListener("data", ...)``. A client that reconnects with ``Last-Event-ID``
set to the id of the reinit it was sent is not sent it again; a later claim has another id and
is sent.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from uuid import UUID

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from accounts import ratelimit, tokens
from accounts.api import (
    allowed_methods,
    error_response,
    method_not_allowed,
    rate_limited_response,
)
from workspaces import liveness
from workspaces.agent_api import agent_token_attempt
from workspaces.models import WorkspaceAgent
from workspaces.reinit import db_call, wait_for_reinit

DEFAULT_WAIT = 30
MAX_WAIT = 300
# Reconnection delay the SSE stream asks of clients (``retry:``, milliseconds): short, so a
# dropped stream costs little, yet a thousand clients of a restarted web process do not all
# reconnect within the same few milliseconds (browsers add their own back-off on errors).
SSE_RETRY_MS = 1000
METHODS = allowed_methods(("GET",))


def _sse(event: str, data: dict, *, event_id: str | None = None) -> str:
    """One server-sent event. JSON never contains a raw newline, so one ``data:`` line is safe."""
    id_line = f"id: {event_id}\n" if event_id is not None else ""
    # ``retry:`` on every event, not only once: clients that surface fields per event (for
    # example sseclient-py) see it, and it costs a few bytes per ping.
    return f"event: {event}\n{id_line}retry: {SSE_RETRY_MS}\ndata: {json.dumps(data)}\n\n"


def _last_event_id(request: HttpRequest) -> str | None:
    """The id an SSE client presents on reconnect; ids we send are short ASCII."""
    value = request.headers.get("Last-Event-ID", "").strip()
    return value[:200] or None


def _parse_wait(raw: str | None) -> int | None:
    if raw is None:
        return DEFAULT_WAIT
    try:
        wait = int(raw)
    except ValueError:
        return None
    return wait if 0 <= wait <= MAX_WAIT else None


def _authenticated(request: HttpRequest, token: str | None) -> WorkspaceAgent | None:
    """The agent holding ``token`` (``agent_token_attempt``), recorded as heard from now."""
    agent = agent_token_attempt(request, token)
    if agent is not None:
        liveness.agent_seen(agent)
    return agent


async def _stream(agent_id: UUID, workspace_id: UUID, seen: str | None) -> AsyncIterator[str]:
    """Pings every ``REINIT_PING_INTERVAL`` seconds until a reinit is due, then the event.

    A reinit whose id is ``seen`` (the client's ``Last-Event-ID``) is not sent again. The agent
    counts as connected while the stream is open (``liveness.WaitingAgents``).
    """
    yield f": reinit stream open\nretry: {SSE_RETRY_MS}\n\n"  # headers out at once
    interval = settings.REINIT_PING_INTERVAL
    with liveness.waiting_agents().holding(agent_id):
        while True:
            due = await wait_for_reinit(agent_id, workspace_id, interval, seen=seen)
            if due is not None:
                yield _sse("data", dict(due.event), event_id=due.event_id)
                return
            yield _sse("ping", {})


# Agents hold no session: a POST here is a JSON 405, never Django's HTML CSRF 403.
@csrf_exempt
async def reinit(request: HttpRequest) -> HttpResponse:
    """200 with the event when the agent must re-initialise, 204 when ``wait`` passed without.

    With ``Accept: text/event-stream``: an SSE stream (``event: ping`` heartbeats, then one
    ``event: data`` with an ``id:`` and the same JSON, after which the stream ends).
    """
    if request.method not in METHODS:
        return method_not_allowed(METHODS)
    token = tokens.bearer(request.headers.get("Authorization"))
    try:
        agent = await db_call(_authenticated)(request, token)
    except ratelimit.RateLimited as exc:
        return rate_limited_response(exc)
    if agent is None:
        return error_response(401, "unauthorized", "Missing or invalid agent token.")
    wait = _parse_wait(request.GET.get("wait"))
    if wait is None:
        return error_response(
            400, "invalid_wait", f"wait: a whole number of seconds from 0 to {MAX_WAIT}."
        )
    if "text/event-stream" in request.headers.get("Accept", ""):
        response = StreamingHttpResponse(
            _stream(agent.id, agent.workspace_id, _last_event_id(request)),
            content_type="text/event-stream",
        )
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"  # proxies must not buffer the stream
        return response
    # The agent counts as connected while it waits (``liveness.WaitingAgents``).
    with liveness.waiting_agents().holding(agent.id):
        due = await wait_for_reinit(agent.id, agent.workspace_id, wait)
    if due is None:
        return HttpResponse(status=204)
    return JsonResponse(due.event)
