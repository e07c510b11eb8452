"""The OpenAPI 3.1 document of the JSON API under ``/api/v2/`` (DESIGN.md §7), and where it is
served: ``GET /api/v2/openapi.json`` (public) and ``/api/docs/`` (a small viewer, no CDN).

Written by hand as Python data rather than generated from the views: the document is a
reviewed contract, like DESIGN.md. What the code already states is read from the code (limits,
enums, name rules, settings), so the two cannot drift there; everything else is kept true by
``tests/api/test_openapi.py``, which runs Schemathesis over the whole document against a real
server and fails on any 5xx, undocumented status or answer that does not match its schema.
"""

from __future__ import annotations

import copy
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_safe

from accounts.api import allowed_methods, method_not_allowed
from prebuilds.models import MissReason
from workspaces import listing
from workspaces.models import REPORTABLE_LIFECYCLE_STATES, AgentLifecycle, JobStatus, Transition
from workspaces.reinit_api import DEFAULT_WAIT, MAX_WAIT
from workspaces.services import WORKSPACE_NAME_RE

JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _object(properties: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A JSON object with exactly these keys, all present in every answer."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        **extra,
    }


UUID = {"type": "string", "format": "uuid"}
TIME = {"type": "string", "format": "date-time"}
COUNT = {"type": "integer", "minimum": 0}
STATE_COUNTS = (
    "actual",
    "desired",
    "eligible",
    "expired",
    "extraneous",
    "starting",
    "stopping",
    "deleting",
)

# Error answers: every one is the §7 shape. Descriptions say when each status happens.
ERRORS = {
    "400": "Bad input: the detail names the field or parameter.",
    "401": "Missing or invalid credentials. Carries `WWW-Authenticate: Bearer`.",
    "403": "Authenticated but not allowed (staff-only endpoint; a session request failing CSRF).",
    "404": "Unknown, malformed or not visible id (the same answer for all three).",
    "409": "Conflict with the current state (name taken, build in progress, version moved on).",
    "413": "Request body over `DATA_UPLOAD_MAX_MEMORY_SIZE`.",
    "415": "A request body whose `Content-Type` is not `application/json`.",
    "429": "Too many failed authentication attempts; `Retry-After` says how long to wait.",
    "503": "The database is unreachable; `Retry-After` says when to try again.",
}


def _error(status: str) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": ERRORS[status],
        "content": {JSON: {"schema": _ref("Error")}},
    }
    if status in ("429", "503"):
        response["headers"] = {"Retry-After": {"schema": {"type": "string"}}}
    if status == "401":
        response["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
    return response


def _operation(
    summary: str,
    *,
    tag: str,
    ok: dict[str, Any],
    errors: tuple[str, ...],
    security: list[dict[str, list]] | None = None,
    body: dict[str, Any] | None = None,
    parameters: list[dict[str, Any]] | None = None,
    description: str = "",
) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary, "tags": [tag], "responses": dict(ok)}
    if description:
        operation["description"] = description
    if security is not None:
        operation["security"] = security
    if parameters:
        operation["parameters"] = parameters
    if body is not None:
        operation["requestBody"] = {"required": True, "content": {JSON: {"schema": body}}}
        errors = (*errors, "413", "415")
    for status in sorted({*errors, "429", "503"}):
        operation["responses"][status] = _error(status)
    return operation


def _answer(description: str, schema: dict[str, Any], status: str = "200") -> dict[str, Any]:
    return {status: {"description": description, "content": {JSON: {"schema": schema}}}}


USER = [{"apiToken": []}, {"sessionCookie": []}]
AGENT = [{"agentToken": []}]


def _path_id(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string"},
    }


def _schemas() -> dict[str, Any]:
    owner = _object({"id": UUID, "username": {"type": "string"}})
    build = _object(
        {
            "id": UUID,
            "build_number": {"type": "integer", "minimum": 1},
            "transition": {"enum": list(Transition.values)},
            "status": {"enum": list(JobStatus.values)},
            "initiator": {"type": "string", "description": "The initiator's username."},
            "is_claim": {"type": "boolean"},
        }
    )
    agent = _object(
        {
            "id": UUID,
            "name": {"type": "string"},
            "lifecycle_state": {"enum": list(AgentLifecycle.values)},
            "initialized_owner_id": _nullable(UUID),
            "connection": {
                "enum": ["connected", "disconnected"],
                "description": "Disconnected: not heard from within AGENT_DISCONNECT_TIMEOUT.",
            },
            "last_seen_at": _nullable(TIME),
        }
    )
    workspace = _object(
        {
            "id": UUID,
            "name": {"type": "string", "pattern": WORKSPACE_NAME_RE.pattern},
            "owner": _ref("Owner"),
            "organization": {"type": "string", "description": "The organization's slug."},
            "template_id": UUID,
            "template_version_id": _nullable(UUID),
            "preset_id": _nullable(UUID),
            "claimed_prebuild": {
                "type": "boolean",
                "description": "True when this workspace came from a prebuild pool.",
            },
            "created_at": TIME,
            "latest_build": _nullable(_ref("Build")),
            "agents": {"type": "array", "items": _ref("Agent")},
        }
    )
    preset = _object(
        {"id": UUID, "name": {"type": "string"}, "desired_instances": _nullable(COUNT)}
    )
    template = _object(
        {
            "id": UUID,
            "name": {"type": "string"},
            "organization": {"type": "string"},
            "active_version_id": _nullable(UUID),
            "versions": {
                "type": "array",
                "items": _object(
                    {
                        "id": UUID,
                        "name": {"type": "string"},
                        "presets": {"type": "array", "items": _ref("Preset")},
                    }
                ),
            },
        }
    )
    state = _object(
        dict.fromkeys(STATE_COUNTS, COUNT),
        additionalProperties=COUNT,  # more counts may come (e.g. `unhealthy`, §7)
    )
    action = {
        "type": "object",
        "required": ["type"],
        "properties": {
            "type": {"enum": ["create", "delete", "backoff", "cancel_pending"]},
            "count": COUNT,
            "workspace_ids": {"type": "array", "items": UUID},
            "until": _nullable(TIME),
            "reason": {"type": "string"},
        },
    }
    status_preset = {
        "type": "object",
        "required": [
            "preset_id",
            "template_id",
            "template_version_id",
            "preset",
            "template",
            "template_version",
            "organization",
            "active",
            "status",
            "state",
            "actions",
            "claims",
        ],
        "properties": {
            "preset_id": UUID,
            "template_id": UUID,
            "template_version_id": UUID,
            "preset": {"type": "string"},
            "template": {"type": "string"},
            "template_version": {"type": "string"},
            "organization": {"type": "string"},
            "active": {"type": "boolean"},
            "status": {"enum": ["healthy", "hard_limited", "validation_failed"]},
            "state": _ref("PoolState"),
            "actions": {"type": "array", "items": action},
            "claims": _object(
                {
                    "window_seconds": COUNT,
                    "hits": COUNT,
                    "misses": _object(
                        dict.fromkeys(MissReason.values, COUNT),
                        description="Claim requests that found no prebuild, by reason.",
                    ),
                },
                description="The preset's claim requests of the last `window_seconds`.",
            ),
        },
    }
    return {
        "Error": _object(
            {
                "error": {"type": "string", "description": "A stable code, e.g. `not_found`."},
                "detail": {"type": "string", "description": "A message for people."},
            },
            additionalProperties=False,
        ),
        "Owner": owner,
        "Build": build,
        "Agent": agent,
        "Workspace": workspace,
        "WorkspaceList": _object(
            {
                "workspaces": {"type": "array", "items": _ref("Workspace")},
                "next_cursor": {
                    "type": ["string", "null"],
                    "description": "Pass as `cursor` for the next page; null on the last page.",
                },
            }
        ),
        "Preset": preset,
        "Template": template,
        "User": _object(
            {
                "id": UUID,
                "username": {"type": "string"},
                "is_staff": {"type": "boolean"},
                "organizations": {"type": "array", "items": {"type": "string"}},
            }
        ),
        "PoolState": state,
        "StatusDocument": _object(
            {
                "paused": {"type": "boolean"},
                "lock_acquired": {"type": "boolean"},
                "presets": {"type": "array", "items": status_preset},
            }
        ),
        "Settings": _object({"reconciliation_paused": {"type": "boolean"}}),
        "PresetPool": _object(
            {
                "preset_id": UUID,
                "preset": {"type": "string"},
                "template_id": UUID,
                "template": {"type": "string"},
                "template_version_id": UUID,
                "organization": {"type": "string"},
                "active": {"type": "boolean"},
                "desired_instances": _nullable(COUNT),
                "status": {"enum": ["healthy", "hard_limited", "validation_failed"]},
                "status_reason": {"type": "string"},
            }
        ),
        "Manifest": _object(
            {
                "agent_id": UUID,
                "agent_name": {"type": "string"},
                "workspace_id": UUID,
                "workspace_name": {"type": "string"},
                "owner": _ref("Owner"),
                "is_prebuild": {"type": "boolean"},
                "startup_script": {"type": "string"},
                "environment": {"type": "object", "additionalProperties": {"type": "string"}},
            }
        ),
        "ReinitEvent": _object(
            {"workspace_id": UUID, "owner_id": UUID, "reason": {"enum": ["prebuild_claimed"]}}
        ),
    }


def _paths() -> dict[str, Any]:
    name = {"type": "string", "pattern": WORKSPACE_NAME_RE.pattern}
    create_body = {
        "oneOf": [
            _object(
                {"name": name, "template_version_preset_id": UUID},
                additionalProperties=False,
            ),
            _object({"name": name, "template_id": UUID}, additionalProperties=False),
        ]
    }
    maximum = settings.PREBUILDS_MAX_INSTANCES_PER_PRESET
    query = [
        {
            "name": "limit",
            "in": "query",
            "description": f"Page size: default {listing.DEFAULT_LIMIT}, at most "
            f"{listing.MAX_LIMIT}.",
            "schema": {"type": "integer", "minimum": 1, "maximum": listing.MAX_LIMIT},
        },
        {
            "name": "cursor",
            "in": "query",
            "description": "Opaque: the `next_cursor` of the previous page (empty: the first "
            "page). Anything else is a 400.",
            "schema": {"type": "string"},
        },
        {"name": "template_id", "in": "query", "schema": UUID},
        {
            "name": "status",
            "in": "query",
            "description": "Coder's workspace status, from the latest build: `pending` (job "
            "pending), `starting`/`stopping`/`deleting` (running), `running`/`stopped`/"
            "`deleted` (succeeded start/stop/delete), `failed`, `canceling`, `canceled`. "
            "Deleted workspaces are listed only with `deleted`.",
            "schema": {"enum": list(listing.STATUSES)},
        },
        {
            "name": "owner",
            "in": "query",
            "description": "A username or a user id. Staff: any owner; prebuilds (the system "
            "user) are listed only with `owner=prebuilds`. Others see only their own "
            "workspaces, so any other owner gives an empty list.",
            "schema": {"type": "string", "minLength": 1},
        },
    ]
    wait = {
        "name": "wait",
        "in": "query",
        "description": f"Seconds to wait for a reinit (default {DEFAULT_WAIT}).",
        "schema": {"type": "integer", "minimum": 0, "maximum": MAX_WAIT},
    }
    return {
        "/api/v2/openapi.json": {
            "get": {
                "summary": "This document",
                "tags": ["meta"],
                "security": [],
                "responses": {
                    "200": {
                        "description": "The OpenAPI 3.1 document (people: `/api/docs/`).",
                        "content": {JSON: {"schema": {"type": "object"}}},
                    },
                    "503": _error("503"),
                },
            }
        },
        "/api/v2/users/me": {
            "get": _operation(
                "Who the credentials belong to",
                tag="users",
                security=USER,
                ok=_answer("The caller.", _ref("User")),
                errors=("401",),
            )
        },
        "/api/v2/templates": {
            "get": _operation(
                "Templates the caller may use",
                tag="workspaces",
                security=USER,
                ok=_answer(
                    "Templates with versions and presets.",
                    {
                        "type": "array",
                        "items": _ref("Template"),
                    },
                ),
                errors=("401",),
            )
        },
        "/api/v2/workspaces": {
            "get": _operation(
                "List workspaces",
                tag="workspaces",
                security=USER,
                parameters=query,
                description="The caller's workspaces (staff: every owner's), oldest first by "
                "(created_at, id). Keyset pagination: rows inserted while a client pages "
                "through never make it skip or repeat a row. Unknown parameters are a 400.",
                ok=_answer("One page.", _ref("WorkspaceList")),
                errors=("400", "401"),
            ),
            "post": _operation(
                "Create a workspace (claims a prebuild when one is ready)",
                tag="workspaces",
                security=USER,
                body=create_body,
                ok=_answer("The new workspace.", _ref("Workspace"), "201"),
                errors=("400", "401", "403", "404", "409"),
            ),
        },
        "/api/v2/workspaces/{workspace_id}": {
            "get": _operation(
                "One workspace",
                tag="workspaces",
                security=USER,
                parameters=[_path_id("workspace_id", "The workspace's id.")],
                ok=_answer("The workspace.", _ref("Workspace")),
                errors=("401", "404"),
            )
        },
        "/api/v2/workspaces/{workspace_id}/builds": {
            "post": _operation(
                "Queue a start, stop or delete build",
                tag="workspaces",
                security=USER,
                parameters=[_path_id("workspace_id", "The workspace's id.")],
                body=_object(
                    {"transition": {"enum": list(Transition.values)}},
                    additionalProperties=False,
                ),
                ok=_answer("The queued build.", _ref("Build"), "201"),
                errors=("400", "401", "403", "404", "409"),
            )
        },
        "/api/v2/prebuilds/status": {
            "get": _operation(
                "What a reconciliation pass would do now (staff)",
                tag="prebuilds",
                security=USER,
                description="The document of `reconcile_prebuilds --dry-run --json`.",
                ok=_answer("The status document.", _ref("StatusDocument")),
                errors=("401", "403"),
            )
        },
        "/api/v2/prebuilds/settings": {
            "get": _operation(
                "Reconciler settings (staff)",
                tag="prebuilds",
                security=USER,
                ok=_answer("The settings.", _ref("Settings")),
                errors=("401", "403"),
            ),
            "put": _operation(
                "Pause or resume the reconciler (staff; audited)",
                tag="prebuilds",
                security=USER,
                body=_object(
                    {"reconciliation_paused": {"type": "boolean"}}, additionalProperties=False
                ),
                ok=_answer("The settings after the change.", _ref("Settings")),
                errors=("400", "401", "403"),
            ),
        },
        "/api/v2/prebuilds/presets/{preset_id}": {
            "get": _operation(
                "One preset's pool (staff of its organization)",
                tag="prebuilds",
                security=USER,
                parameters=[_path_id("preset_id", "The preset's id.")],
                ok=_answer("The pool.", _ref("PresetPool")),
                errors=("401", "403", "404"),
            ),
            "put": _operation(
                "Set a preset's pool size (staff; audited)",
                tag="prebuilds",
                security=USER,
                parameters=[_path_id("preset_id", "The preset's id.")],
                description="Refused with a 400 above PREBUILDS_MAX_INSTANCES_PER_PRESET or "
                "when it would raise the organization's total above "
                "PREBUILDS_MAX_INSTANCES_PER_ORGANIZATION.",
                body=_object(
                    {"desired_instances": {"type": "integer", "minimum": 0, "maximum": maximum}},
                    additionalProperties=False,
                ),
                ok=_answer("The pool after the change.", _ref("PresetPool")),
                errors=("400", "401", "403", "404"),
            ),
        },
        "/api/v2/workspaceagents/me/manifest": {
            "get": _operation(
                "The agent's manifest",
                tag="agents",
                security=AGENT,
                description="Fetching it records the agent as initialised for the current owner.",
                ok=_answer("The manifest.", _ref("Manifest")),
                errors=("401",),
            )
        },
        "/api/v2/workspaceagents/me/lifecycle": {
            "post": _operation(
                "Report a lifecycle state",
                tag="agents",
                security=AGENT,
                body=_object(
                    {"state": {"enum": [str(s) for s in REPORTABLE_LIFECYCLE_STATES]}},
                    additionalProperties=False,
                ),
                ok={"204": {"description": "Recorded (no body, no Content-Type)."}},
                errors=("400", "401"),
            )
        },
        "/api/v2/workspaceagents/me/heartbeat": {
            "post": _operation(
                "The agent is alive",
                tag="agents",
                security=AGENT,
                description="No body. Keeps the agent `connected` while it holds no reinit "
                "wait open.",
                ok=_answer(
                    "How often to send the next heartbeats.",
                    _object({"heartbeat_interval": {"type": "number", "exclusiveMinimum": 0}}),
                ),
                errors=("401",),
            )
        },
        "/api/v2/workspaceagents/me/reinit": {
            "get": _operation(
                "Wait for a reinit (long-poll or SSE)",
                tag="agents",
                security=AGENT,
                parameters=[wait],
                description=(
                    "Answers at once when the workspace's owner differs from the owner the "
                    "agent last initialised for (level-triggered), else waits up to `wait` "
                    "seconds.\n\nWith `Accept: text/event-stream` the answer is a server-sent "
                    "event stream: `event: ping` heartbeats (data `{}`) every "
                    "REINIT_PING_INTERVAL seconds, then one event named **`data`** (as in "
                    "Coder) whose data is the ReinitEvent JSON, after which the stream ends. "
                    "A browser's `EventSource.onmessage` does not fire for a named event: use "
                    '`addEventListener("data", …)`.'
                ),
                ok={
                    "200": {
                        "description": "The agent must re-initialise (or, with SSE, the stream).",
                        "content": {
                            JSON: {"schema": _ref("ReinitEvent")},
                            "text/event-stream": {
                                "schema": {"type": "string"},
                                "example": 'event: data\ndata: {"workspace_id": "…", '
                                '"owner_id": "…", "reason": "prebuild_claimed"}\n\n',
                            },
                        },
                    },
                    "204": {"description": "`wait` passed without a reinit (no body)."},
                },
                errors=("400", "401"),
            )
        },
    }


# Stable names for code generators and for the links below.
OPERATION_IDS = {
    ("/api/v2/openapi.json", "get"): "getOpenApiDocument",
    ("/api/v2/users/me", "get"): "getCurrentUser",
    ("/api/v2/templates", "get"): "listTemplates",
    ("/api/v2/workspaces", "get"): "listWorkspaces",
    ("/api/v2/workspaces", "post"): "createWorkspace",
    ("/api/v2/workspaces/{workspace_id}", "get"): "getWorkspace",
    ("/api/v2/workspaces/{workspace_id}/builds", "post"): "createWorkspaceBuild",
    ("/api/v2/prebuilds/status", "get"): "getPrebuildsStatus",
    ("/api/v2/prebuilds/settings", "get"): "getPrebuildsSettings",
    ("/api/v2/prebuilds/settings", "put"): "setPrebuildsSettings",
    ("/api/v2/prebuilds/presets/{preset_id}", "get"): "getPresetPool",
    ("/api/v2/prebuilds/presets/{preset_id}", "put"): "setPresetPool",
    ("/api/v2/workspaceagents/me/manifest", "get"): "getAgentManifest",
    ("/api/v2/workspaceagents/me/lifecycle", "post"): "reportAgentLifecycle",
    ("/api/v2/workspaceagents/me/heartbeat", "post"): "sendAgentHeartbeat",
    ("/api/v2/workspaceagents/me/reinit", "get"): "waitForAgentReinit",
}

# How one answer leads to the next request (OpenAPI links; Schemathesis follows them too).
LINKS = {
    ("/api/v2/workspaces", "post", "201"): {
        "GetWorkspace": {
            "operationId": "getWorkspace",
            "parameters": {"workspace_id": "$response.body#/id"},
        },
        "CreateWorkspaceBuild": {
            "operationId": "createWorkspaceBuild",
            "parameters": {"workspace_id": "$response.body#/id"},
        },
    },
    ("/api/v2/workspaces/{workspace_id}", "get", "200"): {
        "CreateWorkspaceBuild": {
            "operationId": "createWorkspaceBuild",
            "parameters": {"workspace_id": "$response.body#/id"},
        },
    },
    ("/api/v2/templates", "get", "200"): {
        "CreateWorkspaceFromTemplate": {
            "operationId": "createWorkspace",
            "requestBody": {"name": "from-link", "template_id": "$response.body#/0/id"},
        },
        "ListWorkspacesOfTemplate": {
            "operationId": "listWorkspaces",
            "parameters": {"query.template_id": "$response.body#/0/id"},
        },
    },
}


def _named(paths: dict[str, Any]) -> dict[str, Any]:
    for (path, method), operation_id in OPERATION_IDS.items():
        paths[path][method]["operationId"] = operation_id
    for (path, method, status), links in LINKS.items():
        paths[path][method]["responses"][status]["links"] = links
    return paths


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document (a fresh copy: callers may change theirs)."""
    return copy.deepcopy(
        {
            "openapi": "3.1.0",
            "info": {
                "title": "Warmstart API",
                "version": "2",
                "description": (
                    "Warm pools of prebuilt development workspaces. Errors are JSON "
                    '`{"error": "<code>", "detail": "<message>"}`. Every GET also answers '
                    "HEAD. Request bodies must be `application/json` (else 415)."
                ),
            },
            "servers": [{"url": "/"}],
            "tags": [
                {"name": "workspaces"},
                {"name": "prebuilds", "description": "Prebuild pools; staff only."},
                {"name": "agents", "description": "For the agent inside a workspace."},
                {"name": "users"},
                {"name": "meta"},
            ],
            "paths": _named(_paths()),
            "components": {
                "schemas": _schemas(),
                "securitySchemes": {
                    "apiToken": {
                        "type": "http",
                        "scheme": "bearer",
                        "description": "An API token (`python manage.py create_api_token "
                        "USERNAME`).",
                    },
                    "agentToken": {
                        "type": "http",
                        "scheme": "bearer",
                        "description": "The workspace agent's token (`WORKSPACE_AGENT_TOKEN`).",
                    },
                    "sessionCookie": {
                        "type": "apiKey",
                        "in": "cookie",
                        "name": settings.SESSION_COOKIE_NAME,
                        "description": "A signed-in browser session; writes also need the "
                        "`X-CSRFToken` header.",
                    },
                },
            },
        }
    )


@csrf_exempt  # public and read-only: a POST is the JSON 405, not a CSRF refusal
def openapi_json(request: HttpRequest) -> HttpResponse:
    """``GET /api/v2/openapi.json``: public, no credentials."""
    methods = allowed_methods(("GET",))
    if request.method not in methods:
        return method_not_allowed(methods)
    return JsonResponse(document())


@require_safe
def docs(request: HttpRequest) -> HttpResponse:
    """``/api/docs/``: the document rendered for people by a small local script."""
    return render(request, "api/docs.html")
