"""Who may do what: every page and endpoint × every kind of caller, as one table.

Callers:

- ``anonymous`` — no credentials;
- ``member`` — a member of the default organization, owner of the workspace in the table;
- ``other_org`` — a member of another organization only;
- ``staff`` — an operator (``is_staff``, no superuser);
- ``agent`` — the workspace's agent token, sent on every request (it has nothing else);
- ``system`` — the system user: a forged session on pages and an API token written straight
  into the database on the API. It can never authenticate, so it gets the anonymous answer.

Pages use the caller's session, ``/api/v2/`` the caller's bearer token. ``L`` is a redirect to
the sign-in page, ``AL`` to the admin's. Plus: CSRF on every form and HTMX post.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest
from django.conf import settings
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
from django.db import transaction
from django.test import Client
from django.urls import URLPattern, get_resolver

from accounts import tokens
from accounts.models import SYSTEM_USER_ID, ApiToken, Membership, User
from accounts.services import api_token_create, organization_default
from tests.accounts.factories import OrganizationFactory, UserFactory
from tests.processes import asgi_server
from tests.workspaces.factories import (
    AgentFactory,
    BuildFactory,
    PresetFactory,
    WorkspaceFactory,
    prebuild,
)

pytestmark = pytest.mark.django_db

CALLERS = ("anonymous", "member", "other_org", "staff", "agent", "system")
L = "→ /login/"  # redirect to the sign-in page
AL = "→ /admin/login/"  # redirect to the admin's sign-in page
UNKNOWN = "00000000-0000-4000-8000-000000000000"

# Request bodies (form fields for pages, JSON for /api/v2/), by row.
BODIES: dict[str, Any] = {
    "POST /workspaces/{ws}/builds": {"transition": "stop"},
    "POST /workspaces/{unknown}/builds": {"transition": "stop"},
    "POST /prebuilds/pause": {"paused": "true"},
    "POST /prebuilds/presets/{preset}/desired-instances": {"instances": "2"},
    "POST /api/v2/workspaces": {"name": "fresh", "template_id": "{template}"},
    "POST /api/v2/workspaces (unknown template)": {"name": "fresh", "template_id": "{unknown}"},
    "POST /api/v2/workspaces/{ws}/builds": {"transition": "stop"},
    "POST /api/v2/workspaces/{unknown}/builds": {"transition": "stop"},
    "PUT /api/v2/prebuilds/settings": {"reconciliation_paused": True},
    "PUT /api/v2/prebuilds/presets/{preset}": {"desired_instances": 2},
    "PUT /api/v2/prebuilds/presets/{unknown}": {"desired_instances": 2},
    "POST /api/v2/workspaceagents/me/lifecycle": {"state": "ready"},
}

# fmt: off
MATRIX: list[tuple[Any, ...]] = [
    # request                                              anon member other staff agent system
    # --- pages ----------------------------------------------------------------------------
    ("GET /",                                                 L, 302, 302, 302,   L,   L),
    ("GET /login/",                                         200, 302, 302, 302, 200, 200),
    ("GET /workspaces/",                                      L, 200, 200, 200,   L,   L),
    ("GET /workspaces/new",                                   L, 200, 200, 200,   L,   L),
    ("GET /workspaces/{ws}/",                                 L, 200, 404, 200,   L,   L),
    ("GET /workspaces/{ws}/ (htmx)",                          L, 286, 404, 286,   L,   L),
    ("POST /workspaces/{ws}/builds",                          L, 302, 404, 302,   L,   L),
    ("GET /workspaces/{ws}/delete",                           L, 200, 404, 200,   L,   L),
    ("GET /workspaces/{unknown}/",                            L, 404, 404, 404,   L,   L),
    ("POST /workspaces/{unknown}/builds",                     L, 404, 404, 404,   L,   L),
    ("GET /prebuilds/",                                       L, 403, 403, 200,   L,   L),
    ("GET /prebuilds/ (htmx)",                                L, 403, 403, 200,   L,   L),
    ("GET /prebuilds/presets/{preset}/",                      L, 403, 403, 200,   L,   L),
    ("GET /prebuilds/presets/{unknown}/",                     L, 403, 403, 404,   L,   L),
    ("GET /prebuilds/presets/{preset}/backtest",              L, 403, 403, 200,   L,   L),
    ("GET /prebuilds/presets/{unknown}/backtest",             L, 403, 403, 404,   L,   L),
    ("GET /prebuilds/presets/{preset}/confirm/invalidate",    L, 403, 403, 200,   L,   L),
    ("GET /prebuilds/presets/{preset}/confirm/nope",          L, 403, 403, 404,   L,   L),
    ("GET /prebuilds/workspaces/",                            L, 403, 403, 200,   L,   L),
    ("GET /prebuilds/workspaces/{prebuild}/delete/confirm",   L, 403, 403, 200,   L,   L),
    ("GET /prebuilds/workspaces/{unknown}/delete/confirm",    L, 403, 403, 404,   L,   L),
    ("GET /prebuilds/jobs/",                                  L, 403, 403, 200,   L,   L),
    ("POST /prebuilds/pause",                                 L, 403, 403, 302,   L,   L),
    ("POST /prebuilds/reconcile",                             L, 403, 403, 302,   L,   L),
    ("POST /prebuilds/presets/{preset}/desired-instances",    L, 403, 403, 302,   L,   L),
    ("POST /prebuilds/presets/{preset}/invalidate",           L, 403, 403, 302,   L,   L),
    ("POST /prebuilds/presets/{preset}/reset",                L, 403, 403, 302,   L,   L),
    ("POST /prebuilds/presets/{preset}/cancel-pending",       L, 403, 403, 302,   L,   L),
    ("POST /prebuilds/presets/{unknown}/invalidate",          L, 403, 403, 404,   L,   L),
    ("POST /prebuilds/workspaces/{prebuild}/delete",          L, 403, 403, 302,   L,   L),
    ("POST /prebuilds/workspaces/{unknown}/delete",           L, 403, 403, 404,   L,   L),
    ("GET /admin/",                                          AL,  AL,  AL, 200,  AL,  AL),
    ("GET /metrics",                                        401, 403, 403, 200, 401, 401),
    # --- JSON API (bearer API tokens) --------------------------------------------------------
    # The API's description is public (issue 18): the document and the page rendering it.
    ("GET /api/v2/openapi.json",                            200, 200, 200, 200, 200, 200),
    ("GET /api/docs/",                                      200, 200, 200, 200, 200, 200),
    ("GET /api/v2/users/me",                                401, 200, 200, 200, 401, 401),
    ("GET /api/v2/templates",                               401, 200, 200, 200, 401, 401),
    ("GET /api/v2/workspaces",                              401, 200, 200, 200, 401, 401),
    ("GET /api/v2/workspaces?owner=member",                 401, 200, 200, 200, 401, 401),
    ("POST /api/v2/workspaces",                             401, 201, 404, 201, 401, 401),
    ("POST /api/v2/workspaces (unknown template)",          401, 404, 404, 404, 401, 401),
    ("GET /api/v2/workspaces/{ws}",                         401, 200, 404, 200, 401, 401),
    ("GET /api/v2/workspaces/{unknown}",                    401, 404, 404, 404, 401, 401),
    ("GET /api/v2/workspaces/not-a-uuid",                   401, 404, 404, 404, 401, 401),
    ("POST /api/v2/workspaces/{ws}/builds",                 401, 201, 404, 201, 401, 401),
    ("POST /api/v2/workspaces/{unknown}/builds",            401, 404, 404, 404, 401, 401),
    ("GET /api/v2/prebuilds/status",                        401, 403, 403, 200, 401, 401),
    ("GET /api/v2/prebuilds/settings",                      401, 403, 403, 200, 401, 401),
    ("PUT /api/v2/prebuilds/settings",                      401, 403, 403, 200, 401, 401),
    ("GET /api/v2/prebuilds/presets/{preset}",              401, 403, 403, 200, 401, 401),
    ("GET /api/v2/prebuilds/presets/{unknown}",             401, 403, 403, 404, 401, 401),
    ("PUT /api/v2/prebuilds/presets/{preset}",              401, 403, 403, 200, 401, 401),
    ("PUT /api/v2/prebuilds/presets/{unknown}",             401, 403, 403, 404, 401, 401),
    # --- agent endpoints (agent tokens only) -------------------------------------------------
    ("GET /api/v2/workspaceagents/me/manifest",             401, 401, 401, 401, 200, 401),
    ("POST /api/v2/workspaceagents/me/lifecycle",           401, 401, 401, 401, 204, 401),
    ("POST /api/v2/workspaceagents/me/heartbeat",           401, 401, 401, 401, 200, 401),
    # The agent's own answer needs committed rows: see test_the_agent_reaches_reinit.
    ("GET /api/v2/workspaceagents/me/reinit?wait=0",        401, 401, 401, 401, None, 401),
]
# fmt: on


@pytest.fixture
def world() -> dict[str, Any]:
    """The rows the table talks about, and one ready-to-use client per caller."""
    organization = organization_default()
    # Unusable passwords: hashing real ones would triple the cost of every row of the table.
    member = User.objects.create(username="member", password="!")
    other = User.objects.create(username="outsider", password="!")
    Membership.objects.filter(user=other).delete()
    Membership.objects.create(user=other, organization=OrganizationFactory())
    staff = User.objects.create(username="operator", password="!", is_staff=True)

    preset = PresetFactory(desired_instances=1)
    template = preset.template_version.template
    assert template.organization == organization
    workspace = WorkspaceFactory(owner=member, template=template, name="mine")
    agent = AgentFactory(build=BuildFactory(workspace=workspace, preset=preset))
    pooled = prebuild(preset)

    clients: dict[str, tuple[Client, dict[str, str]]] = {"anonymous": (Client(), {})}
    for name, user in (("member", member), ("other_org", other), ("staff", staff)):
        client = Client()
        client.force_login(user)
        clients[name] = (client, {"HTTP_AUTHORIZATION": f"Bearer {api_token_create(user=user)}"})
    clients["agent"] = (Client(HTTP_AUTHORIZATION=f"Bearer {agent.plain_token}"), {})
    clients["system"] = (_system_session(), {"HTTP_AUTHORIZATION": f"Bearer {_system_token()}"})
    return {
        "clients": clients,
        "ids": {
            "ws": workspace.id,
            "preset": preset.id,
            "template": template.id,
            "prebuild": pooled.id,
            "unknown": UNKNOWN,
        },
    }


def _system_session() -> Client:
    """A complete session for the system user, forged (no sign-in path would ever make one)."""
    user = User.objects.get(id=SYSTEM_USER_ID, include_system=True)
    client = Client()
    session = client.session
    session[SESSION_KEY] = str(user.id)
    session[BACKEND_SESSION_KEY] = "accounts.backends.UserBackend"
    session[HASH_SESSION_KEY] = user.get_session_auth_hash()
    session.save()
    client.cookies[settings.SESSION_COOKIE_NAME] = session.session_key
    return client


def _system_token() -> str:
    """An API token of the system user, written straight to the table (the service refuses)."""
    new = tokens.generate("wst")
    ApiToken.objects.create(user_id=SYSTEM_USER_ID, key_id=new.key_id, secret_hash=new.secret_hash)
    return new.token


def _format(value: Any, ids: dict[str, Any]) -> Any:
    if isinstance(value, str):
        return value.format(**ids)
    if isinstance(value, dict):
        return {key: _format(item, ids) for key, item in value.items()}
    return value


def _request(world: dict[str, Any], caller: str, request: str):
    client, api_headers = world["clients"][caller]
    method, path, *options = request.split(" ")
    path = _format(path, world["ids"])
    body = _format(BODIES.get(request), world["ids"])
    if path.startswith("/api/"):
        data = json.dumps(body) if body is not None else ""
        return client.generic(method, path, data, "application/json", **api_headers)
    headers = {"HTTP_HX_REQUEST": "true"} if "(htmx)" in options else {}
    if method == "POST":
        return client.post(path, body or {}, **headers)
    return client.get(path, **headers)


def _matches(response, expected: Any) -> bool:
    if expected in (L, AL):
        location = response.get("Location", "")
        return response.status_code == 302 and location.startswith(expected.removeprefix("→ "))
    if response.status_code != expected:
        return False
    if expected == 302:  # a real answer, not a detour to a sign-in page
        return not response["Location"].startswith(("/login/", "/admin/login/"))
    return True


@pytest.mark.parametrize("entry", MATRIX, ids=[entry[0] for entry in MATRIX])
def test_the_authorization_matrix(world, entry):
    """Each caller on a fresh copy of the same rows (a savepoint rolled back after each)."""
    request, *expected = entry
    wrong = []
    for caller, answer in zip(CALLERS, expected, strict=True):
        if answer is None:
            continue
        with transaction.atomic():
            response = _request(world, caller, request)
            transaction.set_rollback(True)
        if not _matches(response, answer):
            wrong.append((caller, answer, response.status_code, response.get("Location")))
        elif request.split(" ")[1].startswith("/api/") and response.status_code >= 400:
            assert set(response.json()) == {"error", "detail"}, request
    assert wrong == [], "(caller, expected, got, Location)"


def test_the_table_lists_every_url_pattern():
    """A new page or endpoint must be added to the table (with its answers for every caller)."""
    listed = {entry[0].split(" ")[1].split("?")[0] for entry in MATRIX}

    def routes(patterns, prefix=""):
        for pattern in patterns:
            if isinstance(pattern, URLPattern):
                yield prefix + str(pattern.pattern)
            else:
                yield from routes(pattern.url_patterns, prefix + str(pattern.pattern))

    def normalise(route: str) -> str:
        import re

        return re.sub(
            r"<[^>]+>|\{[a-z]+\}|" + UNKNOWN + r"|not-a-uuid|nope|invalidate$", "*", route
        )

    covered = {normalise(path.lstrip("/")) for path in listed}
    missing = sorted(
        route
        for route in routes(get_resolver().url_patterns)
        if not route.startswith("admin/") and route != "logout/" and normalise(route) not in covered
    )
    assert missing == []


@pytest.mark.django_db(transaction=True)
def test_the_agent_reaches_reinit(world):
    # Reinit is async and reads on its own threads, so it runs in a real ASGI server on
    # committed rows (as tests/workspaces/test_reinit.py does); every other caller is above.
    client, _ = world["clients"]["agent"]
    token = client.defaults["HTTP_AUTHORIZATION"]

    with asgi_server() as url:
        response = httpx.get(
            f"{url}/api/v2/workspaceagents/me/reinit?wait=0",
            headers={"Authorization": token},
            timeout=30,
        )

    assert response.status_code in (200, 204)  # 200: its owner changed since its manifest


def test_an_api_session_works_like_a_token_and_the_system_session_does_not(world):
    member, _ = world["clients"]["member"]
    system, _ = world["clients"]["system"]

    assert member.get("/api/v2/users/me").json()["username"] == "member"
    assert system.get("/api/v2/users/me").status_code == 401


def test_unknown_workspace_ids_of_any_shape_are_404(world):
    client, headers = world["clients"]["member"]

    for value in (str(uuid.uuid4()), "0", "'; DROP TABLE x; --", "%00"):
        assert client.get(f"/api/v2/workspaces/{value}", **headers).status_code == 404


# --- CSRF ------------------------------------------------------------------------------------

CONTROLS = [
    ("/workspaces/{ws}/builds", {"transition": "stop"}),
    ("/workspaces/new", {"name": "fresh", "template": "{template}"}),
    ("/prebuilds/pause", {"paused": "true"}),
    ("/prebuilds/reconcile", {}),
    ("/prebuilds/presets/{preset}/desired-instances", {"instances": "2"}),
    ("/prebuilds/presets/{preset}/invalidate", {}),
    ("/prebuilds/presets/{preset}/reset", {}),
    ("/prebuilds/presets/{preset}/cancel-pending", {}),
    ("/prebuilds/workspaces/{prebuild}/delete", {}),
]


@pytest.fixture
def strict(world) -> Client:
    """A staff browser whose CSRF checks are enforced, like a real one."""
    client = Client(enforce_csrf_checks=True)
    client.force_login(User.objects.get(username="operator"))
    return client


def _csrf_token(client: Client) -> str:
    page = client.get("/workspaces/")
    token = client.cookies[settings.CSRF_COOKIE_NAME].value
    # htmx sends the token from <body hx-headers>, so every page must carry it.
    assert 'hx-headers=\'{"X-CSRFToken": "' in page.content.decode()
    return token


@pytest.mark.parametrize(("path", "data"), CONTROLS)
@pytest.mark.parametrize("htmx", [False, True])
def test_every_control_needs_the_csrf_token(world, strict, path, data, htmx):
    path, data = _format(path, world["ids"]), _format(data, world["ids"])
    headers = {"HTTP_HX_REQUEST": "true"} if htmx else {}

    refused = strict.post(path, data, **headers)
    token = _csrf_token(strict)
    if htmx:
        accepted = strict.post(path, data, HTTP_X_CSRFTOKEN=token, **headers)
    else:
        accepted = strict.post(path, {**data, "csrfmiddlewaretoken": token})

    assert refused.status_code == 403
    assert accepted.status_code in (200, 204, 302), accepted.content[:300]


def test_the_login_form_needs_the_csrf_token(world):
    UserFactory(username="alice")
    client = Client(enforce_csrf_checks=True)
    credentials = {"username": "alice", "password": "correct horse battery staple"}

    refused = client.post("/login/", credentials)
    client.get("/login/")
    token = client.cookies[settings.CSRF_COOKIE_NAME].value
    accepted = client.post("/login/", {**credentials, "csrfmiddlewaretoken": token})

    assert refused.status_code == 403
    assert accepted.status_code == 302


def test_no_page_accepts_a_post_without_the_csrf_token(world, strict):
    """Whatever pattern is added later, a POST without the token never reaches a view."""

    def routes(patterns, prefix=""):
        for pattern in patterns:
            if isinstance(pattern, URLPattern):
                yield prefix + str(pattern.pattern)
            else:
                yield from routes(pattern.url_patterns, prefix + str(pattern.pattern))

    import re

    checked = 0
    for route in routes(get_resolver().url_patterns):
        if route.startswith(("api/", "metrics")):
            continue  # bearer-token endpoints: no ambient credential; sessions are checked there
        path = "/" + re.sub(r"<uuid:[a-z_]+>", str(world["ids"]["ws"]), route)
        path = re.sub(r"<[^>]+>", "x", path)
        assert strict.post(path, {}).status_code == 403, path
        checked += 1
    assert checked >= 15


def test_a_session_api_write_needs_the_csrf_token(world, strict):
    url = f"/api/v2/workspaces/{world['ids']['ws']}/builds"

    stop = {"transition": "stop"}

    refused = strict.post(url, stop, content_type="application/json")
    token = _csrf_token(strict)
    accepted = strict.post(url, stop, content_type="application/json", HTTP_X_CSRFTOKEN=token)

    assert refused.status_code == 403 and refused.json()["error"] == "csrf_failed"
    assert accepted.status_code == 201
