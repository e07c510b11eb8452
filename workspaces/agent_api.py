"""Agent endpoints of the JSON API (DESIGN.md §7): manifest, lifecycle and heartbeat.

Agents authenticate with ``Authorization: Bearer <agent token>`` only; there is no session and
therefore no CSRF to check. A missing or invalid token — including the token of a retired agent
or of an agent whose workspace was deleted — is a 401, which the agent program takes as final.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from django.db.models import Case, F, Q, Value, When
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt

from accounts import ratelimit, tokens
from accounts.api import (
    ApiError,
    allowed_methods,
    call_answering_errors,
    error_response,
    method_not_allowed,
    rate_limited_response,
    read_json,
)
from workspaces import liveness, serializers
from workspaces.models import (
    REPORTABLE_LIFECYCLE_STATES,
    AgentLifecycle,
    WorkspaceAgent,
    WorkspaceBuild,
)
from workspaces.services import AGENT_TOKEN_PREFIX, agent_authenticate

UNAUTHORIZED_DETAIL = "Missing or invalid agent token (Authorization: Bearer <agent token>)."


def agent_view(
    methods: tuple[str, ...],
) -> Callable[[Callable[..., HttpResponse]], Callable[..., HttpResponse]]:
    """Decorate an agent endpoint: method check, agent-token authentication, ``ApiError``.

    The view receives ``request.agent`` (with ``workspace`` and ``workspace.owner`` loaded).
    ``HEAD`` is allowed wherever ``GET`` is. Exempt from CSRF: agents hold no session (an agent
    POSTing to a GET endpoint gets a JSON 405, not Django's HTML CSRF page).
    """
    methods = allowed_methods(methods)

    def decorator(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        @functools.wraps(view)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if request.method not in methods:
                return method_not_allowed(methods)
            token = tokens.bearer(request.headers.get("Authorization"))
            try:
                agent = agent_token_attempt(request, token)
            except ratelimit.RateLimited as exc:
                return rate_limited_response(exc)
            if agent is None:
                return error_response(401, "unauthorized", UNAUTHORIZED_DETAIL)
            request.agent = agent
            return call_answering_errors(view, request, *args, **kwargs)

        return csrf_exempt(wrapper)

    return decorator


def agent_token_hashes(key_id: str) -> list[str]:
    """Secret hashes of the agents created under ``key_id``, retired ones included (for the
    rate limiter: none means an unknown key id, a match a real token that is not a guess)."""
    return list(
        WorkspaceAgent.objects.filter(token_key_id=key_id).values_list(
            "token_secret_hash", flat=True
        )
    )


def agent_token_attempt(request: HttpRequest, token: str | None) -> WorkspaceAgent | None:
    """``agent_authenticate`` behind the failure limits of agent tokens (accounts.ratelimit):
    counted per key id, so other processes on the agent's host cannot block it."""
    return ratelimit.token_attempt(
        request,
        ratelimit.AGENT_TOKEN,
        tokens.split(token, AGENT_TOKEN_PREFIX) if token else None,
        lambda: agent_authenticate(token) if token else None,
        hashes=agent_token_hashes,
    )


def _current_agent(agent: WorkspaceAgent):
    # Conditional on "still current": a start build may retire the agent between
    # authentication and this write; its token is then dead and the answer is a 401.
    return WorkspaceAgent.objects.filter(id=agent.id, retired_at__isnull=True)


@agent_view(("GET",))
def manifest(request: HttpRequest) -> JsonResponse:
    """The agent's manifest; records the agent as initialised for the owner it names.

    Race with a claim: the owner is read once (at authentication) and that same owner is both
    written to ``initialized_owner`` and put in the manifest. If a claim changes the owner in
    between, the agent is recorded as initialised for the *previous* owner, which is exactly
    what it was told — so the reinit endpoint sees the mismatch and re-initialises it. The
    recorded owner never claims more than the agent knows.
    """
    agent: WorkspaceAgent = request.agent
    owner = agent.workspace.owner
    parameters = (
        WorkspaceBuild.objects.filter(workspace_id=agent.workspace_id)
        .order_by("-build_number")
        .values_list("parameters", flat=True)
        .first()
    ) or {}
    now = timezone.now()
    # Re-initialising for another owner (after a claim): the agent is no longer ready *for the
    # owner it serves* until it reports so again. Without this, a stale "ready" would be visible
    # between this fetch and the agent's "starting" report, and claim-to-ready would be early.
    reinit = Q(initialized_owner__isnull=False) & ~Q(initialized_owner_id=owner.id)
    if not _current_agent(agent).update(
        initialized_owner_id=owner.id,
        initialized_at=now,
        last_seen_at=now,
        lifecycle_state=Case(
            When(reinit, then=Value(AgentLifecycle.STARTING)), default=F("lifecycle_state")
        ),
        lifecycle_changed_at=Case(When(reinit, then=Value(now)), default=F("lifecycle_changed_at")),
    ):
        raise ApiError(401, "unauthorized", UNAUTHORIZED_DETAIL)
    return JsonResponse(serializers.manifest_json(agent=agent, owner=owner, parameters=parameters))


@agent_view(("POST",))
def lifecycle(request: HttpRequest) -> HttpResponse:
    """Record a lifecycle state the agent reports; 204.

    One UPDATE. ``lifecycle_changed_at`` (and ``ready_at`` for ``ready``) move only when the
    state actually changes, so a report the agent retries after a lost answer does not shift
    the timestamps the dashboards and the claim logic read.
    """
    body = read_json(request)
    unknown = sorted(set(body) - {"state"})
    if unknown:
        raise ApiError(400, "unknown_fields", f"Unknown field(s): {', '.join(unknown)}.")
    state = body.get("state")
    if not isinstance(state, str) or state not in REPORTABLE_LIFECYCLE_STATES:
        allowed = ", ".join(REPORTABLE_LIFECYCLE_STATES)
        raise ApiError(400, "invalid_state", f"state: use one of {allowed}.")
    now = timezone.now()
    unchanged = When(lifecycle_state=state, then=F("lifecycle_changed_at"))
    changes: dict[str, Any] = {
        "lifecycle_state": state,
        "lifecycle_changed_at": Case(unchanged, default=Value(now)),
        "last_seen_at": now,
    }
    if state == AgentLifecycle.READY:
        changes["ready_at"] = Case(
            When(lifecycle_state=state, ready_at__isnull=False, then=F("ready_at")),
            default=Value(now),
        )
    if not _current_agent(request.agent).update(**changes):
        raise ApiError(401, "unauthorized", UNAUTHORIZED_DETAIL)
    if state == AgentLifecycle.READY and request.agent.workspace.claimed_at is not None:
        from prebuilds.claims import claims_mark_ready

        claims_mark_ready(workspace_id=request.agent.workspace_id)
    return HttpResponse(status=204)


@agent_view(("POST",))
def heartbeat(request: HttpRequest) -> JsonResponse:
    """``POST /api/v2/workspaceagents/me/heartbeat``: the agent is alive; 200
    ``{"heartbeat_interval": seconds}``, how often to send the next ones.

    An addition to DESIGN.md §7 (issue 12): what keeps an agent *connected* while it runs a long
    startup script and holds no reinit wait open. Writes ``last_seen_at`` only when it is older
    than ``liveness.write_interval()``, so a heartbeat is usually no write at all.
    """
    liveness.agent_seen(request.agent)
    return JsonResponse({"heartbeat_interval": liveness.heartbeat_interval()})
