"""HTTP details of the JSON API as clients nobody here wrote expect them (issue 18):
``WWW-Authenticate`` on 401s, 415 for bodies that are not JSON, ``HEAD`` wherever ``GET`` works,
JSON 405 (never Django's HTML CSRF page) on agent endpoints, and the right ``Content-Type``."""

from __future__ import annotations

import json

import httpx
import pytest
from django.test import Client, RequestFactory

from accounts.api import csrf_failure, is_json_media_type
from accounts.services import api_token_create
from config.outage import server_error
from prebuilds.selectors import reconciliation_paused
from tests.accounts.factories import UserFactory
from tests.processes import asgi_server
from tests.workspaces.factories import AgentFactory, BuildFactory, PresetFactory, WorkspaceFactory
from workspaces.models import Workspace, WorkspaceAgent

pytestmark = pytest.mark.django_db

MANIFEST = "/api/v2/workspaceagents/me/manifest"
LIFECYCLE = "/api/v2/workspaceagents/me/lifecycle"
HEARTBEAT = "/api/v2/workspaceagents/me/heartbeat"
REINIT = "/api/v2/workspaceagents/me/reinit"


def bearer(token: str) -> dict[str, str]:
    return {"HTTP_AUTHORIZATION": f"Bearer {token}"}


@pytest.fixture
def world():
    alice = UserFactory(username="alice")
    staff = UserFactory(username="operator", is_staff=True)
    preset = PresetFactory()
    workspace = WorkspaceFactory(owner=alice, template=preset.template_version.template)
    agent = AgentFactory(build=BuildFactory(workspace=workspace, preset=preset))
    return {
        "alice": bearer(api_token_create(user=alice)),
        "staff": bearer(api_token_create(user=staff)),
        "agent": bearer(agent.plain_token),
        "workspace": workspace,
        "preset": preset,
        "agent_row": agent,
    }


# -- 401: WWW-Authenticate ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("GET", "/api/v2/users/me"),
        ("GET", "/api/v2/workspaces"),
        ("POST", "/api/v2/workspaces"),
        ("GET", "/api/v2/prebuilds/status"),
        ("GET", MANIFEST),
        ("POST", LIFECYCLE),
        ("POST", HEARTBEAT),
    ],
)
@pytest.mark.parametrize("credentials", [{}, bearer("wst_0000000000000000_nope")])
def test_every_401_names_the_bearer_scheme(client, method, url, credentials):
    response = client.generic(method, url, "{}", "application/json", **credentials)

    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert response.json()["error"] == "unauthorized"


def test_other_errors_carry_no_www_authenticate(client, world):
    response = client.get("/api/v2/workspaces/nope", **world["alice"])

    assert response.status_code == 404
    assert "WWW-Authenticate" not in response


# -- 415: bodies that are not JSON ----------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    ["application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x", ""],
)
@pytest.mark.parametrize(
    ("method", "url", "caller", "body"),
    [
        ("POST", "/api/v2/workspaces", "alice", {"name": "dev", "template_id": "{template}"}),
        ("POST", "/api/v2/workspaces/{workspace}/builds", "alice", {"transition": "stop"}),
        ("PUT", "/api/v2/prebuilds/settings", "staff", {"reconciliation_paused": True}),
        ("PUT", "/api/v2/prebuilds/presets/{preset}", "staff", {"desired_instances": 5}),
        ("POST", LIFECYCLE, "agent", {"state": "starting"}),
    ],
)
def test_a_body_that_is_not_declared_json_is_415_and_changes_nothing(
    world, method, url, caller, body, content_type
):
    ids = {
        "template": world["preset"].template_version.template_id,
        "workspace": world["workspace"].id,
        "preset": world["preset"].id,
    }
    url = url.format(**ids)
    data = json.dumps({k: (v.format(**ids) if isinstance(v, str) else v) for k, v in body.items()})
    before = _state(world)
    client = Client()

    # The body is a perfectly good JSON request: only its declared type is wrong.
    response = client.generic(method, url, data, content_type, **world[caller])

    assert response.status_code == 415, response.content
    assert response.json()["error"] == "unsupported_media_type"
    assert response["Content-Type"] == "application/json"
    assert _state(world) == before


def _state(world) -> tuple:
    world["preset"].refresh_from_db()
    return (
        Workspace.objects.count(),
        world["workspace"].builds.count(),
        reconciliation_paused(),
        world["preset"].desired_instances,
        WorkspaceAgent.objects.get(id=world["agent_row"].id).lifecycle_state,
    )


def test_json_with_a_charset_or_a_json_suffix_is_accepted(client, world):
    for content_type in ("application/json; charset=utf-8", "application/merge-patch+json"):
        response = client.generic(
            "PUT",
            "/api/v2/prebuilds/settings",
            json.dumps({"reconciliation_paused": False}),
            content_type,
            **world["staff"],
        )
        assert response.status_code == 200, content_type


def test_a_missing_body_is_still_the_400_it_was(client, world):
    response = client.generic("POST", LIFECYCLE, "", **world["agent"])

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_json"


def test_the_media_type_check():
    assert is_json_media_type("application/json")
    assert is_json_media_type("Application/JSON ; charset=UTF-8")
    assert is_json_media_type("application/problem+json")
    assert not is_json_media_type("text/json+plain")
    assert not is_json_media_type("text/plain")
    assert not is_json_media_type("")
    assert not is_json_media_type(None)


# -- HEAD -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "caller"),
    [
        ("/api/v2/users/me", "alice"),
        ("/api/v2/templates", "alice"),
        ("/api/v2/workspaces", "alice"),
        ("/api/v2/workspaces/{workspace}", "alice"),
        ("/api/v2/prebuilds/status", "staff"),
        ("/api/v2/prebuilds/settings", "staff"),
        ("/api/v2/prebuilds/presets/{preset}", "staff"),
        (MANIFEST, "agent"),
    ],
)
def test_head_answers_like_get_without_a_body(client, world, url, caller):
    url = url.format(workspace=world["workspace"].id, preset=world["preset"].id)

    get = client.get(url, **world[caller])
    head = client.head(url, **world[caller])

    assert get.status_code == head.status_code == 200
    assert head["Content-Type"] == get["Content-Type"] == "application/json"
    assert head.content == b""


@pytest.mark.parametrize(
    "url", ["/workspaces/", "/workspaces/new", "/prebuilds/", "/prebuilds/jobs/"]
)
def test_head_works_on_pages(url):
    client = Client()
    client.force_login(UserFactory(is_staff=True))

    response = client.head(url)

    assert response.status_code == 200
    assert response.content == b""


def test_405_lists_head_beside_get(client, world):
    response = client.post("/api/v2/users/me", **world["alice"])

    assert response.status_code == 405
    assert response["Allow"] == "GET, HEAD"


# -- agent endpoints: JSON 405, never the CSRF page -----------------------------------------


@pytest.mark.parametrize(
    ("method", "url", "allow"),
    [
        ("POST", MANIFEST, "GET, HEAD"),
        ("DELETE", MANIFEST, "GET, HEAD"),
        ("PUT", MANIFEST, "GET, HEAD"),
        ("DELETE", LIFECYCLE, "POST"),
        ("GET", LIFECYCLE, "POST"),
        ("DELETE", HEARTBEAT, "POST"),
    ],
)
@pytest.mark.parametrize("caller", ["agent", "nobody"])
def test_agent_endpoints_answer_a_wrong_method_with_a_json_405(world, method, url, allow, caller):
    # A browser-like client: CSRF enforced, as for a real request without a CSRF cookie.
    client = Client(enforce_csrf_checks=True)
    headers = world["agent"] if caller == "agent" else {}

    response = client.generic(method, url, "", **headers)

    assert response.status_code == 405
    assert response["Content-Type"] == "application/json"
    assert response["Allow"] == allow
    assert response.json()["error"] == "method_not_allowed"


def test_a_csrf_refusal_under_the_api_is_json_and_html_elsewhere():
    factory = RequestFactory()

    api = csrf_failure(factory.post("/api/v2/anything"), reason="CSRF cookie not set.")
    page = csrf_failure(factory.post("/workspaces/new"), reason="CSRF cookie not set.")

    assert api.status_code == page.status_code == 403
    assert json.loads(api.content) == {
        "error": "csrf_failed",
        "detail": "CSRF check failed for a session request.",
    }
    assert page["Content-Type"].startswith("text/html")


def test_an_unexpected_error_under_the_api_is_a_json_500():
    request = RequestFactory().get("/api/v2/workspaces")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        response = server_error(request)

    assert response.status_code == 500
    assert response["Content-Type"] == "application/json"
    assert set(json.loads(response.content)) == {"error", "detail"}


# -- Content-Type of 204s -------------------------------------------------------------------


def test_the_lifecycle_204_carries_no_content_type(client, world):
    response = client.post(LIFECYCLE, {"state": "ready"}, "application/json", **world["agent"])

    assert response.status_code == 204
    assert "Content-Type" not in response
    assert "Content-Length" not in response
    assert response.content == b""


# -- the same over the wire, through uvicorn ------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_over_the_wire(world):
    """What a client sees from a real server (uvicorn; reinit is an async view)."""
    agent = world["agent"]["HTTP_AUTHORIZATION"]
    alice = world["alice"]["HTTP_AUTHORIZATION"]
    with asgi_server() as url, httpx.Client(base_url=url, timeout=30) as http:
        # The agent fetches its manifest first: it is then initialised for its owner, so a
        # reinit wait of 0 s has nothing to deliver.
        assert http.get(MANIFEST, headers={"Authorization": agent}).status_code == 200
        waited = http.get(f"{REINIT}?wait=0", headers={"Authorization": agent})
        anonymous = http.get(f"{REINIT}?wait=0")
        posted = http.post(REINIT, headers={"Authorization": agent})
        deleted = http.delete(REINIT)
        head = http.head("/api/v2/workspaces", headers={"Authorization": alice})
        get = http.get("/api/v2/workspaces", headers={"Authorization": alice})
        form = http.post(
            "/api/v2/workspaces",
            content=b"name=dev",
            headers={"Authorization": alice, "Content-Type": "application/x-www-form-urlencoded"},
        )

    assert waited.status_code == 204
    assert "content-type" not in waited.headers
    assert "content-length" not in waited.headers  # RFC 9110: never on a 204
    assert waited.content == b""
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"].startswith("Bearer")
    for refused in (posted, deleted):
        assert refused.status_code == 405
        assert refused.headers["content-type"] == "application/json"
        assert refused.json()["error"] == "method_not_allowed"
    assert head.status_code == get.status_code == 200
    assert head.content == b""
    assert head.headers["content-type"] == "application/json"
    assert form.status_code == 415
    assert form.json()["error"] == "unsupported_media_type"
