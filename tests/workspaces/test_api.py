"""User endpoints of the JSON API: templates, workspaces, builds (DESIGN.md §7)."""

from __future__ import annotations

import json
import uuid

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from accounts.services import api_token_create
from tests.accounts.factories import OrganizationFactory, UserFactory
from tests.workspaces.factories import (
    AgentFactory,
    BuildFactory,
    PresetFactory,
    TemplateFactory,
    TemplateVersionFactory,
    WorkspaceFactory,
    prebuild,
)
from workspaces.models import JobStatus, ProvisionerJob, Workspace, WorkspaceBuild

pytestmark = pytest.mark.django_db

WORKSPACE_KEYS = {
    "id",
    "name",
    "owner",
    "organization",
    "template_id",
    "template_version_id",
    "preset_id",
    "claimed_prebuild",
    "created_at",
    "latest_build",
    "agents",
}
BUILD_KEYS = {"id", "build_number", "transition", "status", "initiator", "is_claim"}


def auth(user) -> dict[str, str]:
    return {"HTTP_AUTHORIZATION": f"Bearer {api_token_create(user=user)}"}


BAD_TOKEN = {"HTTP_AUTHORIZATION": "Bearer wst_0000000000000000_nope"}


def post(client: Client, url: str, body, **headers):
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    return client.post(url, data=data, content_type="application/json", **headers)


def rows() -> tuple[int, int, int]:
    return Workspace.objects.count(), WorkspaceBuild.objects.count(), ProvisionerJob.objects.count()


@pytest.fixture
def alice():
    return UserFactory(username="alice")


@pytest.fixture
def preset():
    template = TemplateFactory(name="python")
    return PresetFactory(
        template_version=template.active_version, name="standard", parameters={"repo": "r"}
    )


# -- GET /api/v2/templates ------------------------------------------------------------------


def test_it_lists_usable_templates_with_versions_and_presets(client, alice):
    template = TemplateFactory(name="python")
    old = template.active_version
    new = TemplateVersionFactory(template=template)
    template.active_version = new
    template.save()
    standard = PresetFactory(template_version=new, name="standard", desired_instances=3)
    PresetFactory(template_version=old, name="legacy", desired_instances=None)

    response = client.get("/api/v2/templates", **auth(alice))

    assert response.status_code == 200
    assert response.json() == [
        {
            "id": str(template.id),
            "name": "python",
            "organization": "default",
            "active_version_id": str(new.id),
            "versions": [
                {
                    "id": str(new.id),
                    "name": new.name,
                    "presets": [
                        {"id": str(standard.id), "name": "standard", "desired_instances": 3}
                    ],
                },
                {
                    "id": str(old.id),
                    "name": old.name,
                    "presets": [
                        {
                            "id": str(old.presets.get().id),
                            "name": "legacy",
                            "desired_instances": None,
                        }
                    ],
                },
            ],
        }
    ]


def test_it_hides_templates_the_caller_may_not_use(client, alice):
    TemplateFactory(organization=OrganizationFactory(), name="elsewhere")
    TemplateFactory(name="gone", deleted=True)
    TemplateFactory(name="draft", with_version=False)
    visible = TemplateFactory(name="visible")

    response = client.get("/api/v2/templates", **auth(alice))

    assert [t["id"] for t in response.json()] == [str(visible.id)]


def test_it_lists_templates_of_other_organizations_to_their_members(client, alice):
    from accounts.services import membership_ensure

    other = OrganizationFactory(slug="acme")
    membership_ensure(user=alice, organization=other)
    TemplateFactory(organization=other, name="acme-dev")

    response = client.get("/api/v2/templates", **auth(alice))

    assert {(t["organization"], t["name"]) for t in response.json()} == {("acme", "acme-dev")}


def test_it_lists_templates_with_a_fixed_number_of_queries(
    client, alice, django_assert_max_num_queries
):
    headers = auth(alice)
    PresetFactory(template_version=TemplateFactory().active_version)
    with CaptureQueriesContext(connection) as one:
        assert len(client.get("/api/v2/templates", **headers).json()) == 1
    for _ in range(19):
        template = TemplateFactory()
        TemplateVersionFactory(template=template)
        PresetFactory(template_version=template.active_version)
        PresetFactory(template_version=template.active_version)

    with django_assert_max_num_queries(len(one)):
        assert len(client.get("/api/v2/templates", **headers).json()) == 20


def test_it_answers_401_to_anonymous_template_requests(client):
    assert client.get("/api/v2/templates").status_code == 401


def test_it_answers_401_to_a_bad_token_for_templates(client, alice):
    TemplateFactory()
    client.force_login(alice)  # a bad token is judged alone, even beside a session

    response = client.get("/api/v2/templates", **BAD_TOKEN)

    assert response.status_code == 401
    assert response.json()["error"] == "unauthorized"


def test_it_answers_405_to_posting_templates(client, alice):
    response = post(client, "/api/v2/templates", {}, **auth(alice))

    assert response.status_code == 405
    assert response.json()["error"] == "method_not_allowed"


def test_it_accepts_a_session_for_templates(client, alice):
    TemplateFactory()
    client.force_login(alice)

    assert len(client.get("/api/v2/templates").json()) == 1


# -- POST /api/v2/workspaces ----------------------------------------------------------------


def test_it_creates_a_workspace_from_a_preset(client, alice, preset):
    response = post(
        client,
        "/api/v2/workspaces",
        {"name": "dev", "template_version_preset_id": str(preset.id)},
        **auth(alice),
    )

    assert response.status_code == 201
    body = response.json()
    assert set(body) == WORKSPACE_KEYS
    workspace = Workspace.objects.get()
    assert body["id"] == str(workspace.id)
    assert body["name"] == "dev"
    assert body["owner"] == {"id": str(alice.id), "username": "alice"}
    assert body["organization"] == "default"
    assert body["template_id"] == str(preset.template_version.template_id)
    assert body["template_version_id"] == str(preset.template_version_id)
    assert body["preset_id"] == str(preset.id)
    assert body["claimed_prebuild"] is False
    assert body["agents"] == []
    build = workspace.builds.get()
    assert body["latest_build"] == {
        "id": str(build.id),
        "build_number": 1,
        "transition": "start",
        "status": "pending",
        "initiator": "alice",
        "is_claim": False,
    }
    assert build.parameters == {"repo": "r"}


def test_it_creates_a_workspace_from_a_template(client, alice):
    template = TemplateFactory()

    response = post(
        client,
        "/api/v2/workspaces",
        {"name": "dev", "template_id": str(template.id)},
        **auth(alice),
    )

    assert response.status_code == 201
    assert response.json()["preset_id"] is None
    assert response.json()["template_version_id"] == str(template.active_version_id)
    assert Workspace.objects.get().owner == alice


def test_it_creates_through_a_session_with_a_csrf_token(alice, preset):
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    body = {"name": "dev", "template_version_preset_id": str(preset.id)}

    refused = post(client, "/api/v2/workspaces", body)
    client.get("/workspaces/")  # sets the CSRF cookie
    token = client.cookies["csrftoken"].value
    accepted = post(client, "/api/v2/workspaces", body, HTTP_X_CSRFTOKEN=token)

    assert refused.status_code == 403
    assert accepted.status_code == 201
    assert Workspace.objects.count() == 1


def test_it_refuses_anonymous_creation(client, preset):
    response = post(
        client, "/api/v2/workspaces", {"name": "dev", "template_version_preset_id": str(preset.id)}
    )

    assert response.status_code == 401
    assert rows() == (0, 0, 0)


def test_it_refuses_creation_with_a_bad_token(client, preset):
    response = post(
        client,
        "/api/v2/workspaces",
        {"name": "dev", "template_version_preset_id": str(preset.id)},
        **BAD_TOKEN,
    )

    assert response.status_code == 401
    assert rows() == (0, 0, 0)


@pytest.mark.parametrize("field", ["template_version_preset_id", "template_id"])
def test_it_answers_404_for_another_organizations_template_or_preset(client, alice, field):
    template = TemplateFactory(organization=OrganizationFactory())
    preset = PresetFactory(template_version=template.active_version)
    target = preset.id if field == "template_version_preset_id" else template.id

    response = post(
        client, "/api/v2/workspaces", {"name": "dev", field: str(target)}, **auth(alice)
    )

    assert response.status_code == 404
    assert response.json()["error"] == "not_found"
    assert field in response.json()["detail"]
    assert rows() == (0, 0, 0)
    # Word for word the answer to an id that does not exist: existence is not revealed.
    unknown = post(
        client, "/api/v2/workspaces", {"name": "dev", field: str(uuid.uuid4())}, **auth(alice)
    )
    assert (unknown.status_code, unknown.json()) == (404, response.json())


@pytest.mark.parametrize("field", ["template_version_preset_id", "template_id"])
def test_it_answers_404_for_unknown_ids(client, alice, field):
    TemplateFactory()

    response = post(
        client, "/api/v2/workspaces", {"name": "dev", field: str(uuid.uuid4())}, **auth(alice)
    )

    assert response.status_code == 404
    assert rows() == (0, 0, 0)


def test_it_answers_404_for_a_deleted_template(client, alice):
    template = TemplateFactory(deleted=True)

    response = post(
        client,
        "/api/v2/workspaces",
        {"name": "dev", "template_id": str(template.id)},
        **auth(alice),
    )

    assert response.status_code == 404
    assert rows() == (0, 0, 0)


def test_it_refuses_a_preset_of_an_old_version(client, alice, preset):
    template = preset.template_version.template
    template.active_version = TemplateVersionFactory(template=template)
    template.save()

    response = post(
        client,
        "/api/v2/workspaces",
        {"name": "dev", "template_version_preset_id": str(preset.id)},
        **auth(alice),
    )

    assert response.status_code == 409
    assert response.json()["error"] == "preset_inactive"
    assert "active version" in response.json()["detail"]
    assert rows() == (0, 0, 0)


@pytest.mark.parametrize(
    ("body", "error", "mentions"),
    [
        ({"name": "dev"}, "invalid_request", "exactly one"),
        (
            {"name": "dev", "template_id": "X", "template_version_preset_id": "Y"},
            "invalid_field",
            "template_version_preset_id",
        ),
        ({"template_id": "PRESET"}, "missing_field", "name"),
        ({"name": 12, "template_id": "PRESET"}, "invalid_field", "name"),
        ({"name": "dev", "template_id": 12}, "invalid_field", "template_id"),
        ({"name": "dev", "template_version_preset_id": ["x"]}, "invalid_field", "preset"),
        ({"name": "dev", "template_id": "not-a-uuid"}, "invalid_field", "template_id"),
        (
            {"name": "dev", "template_version_preset_id": "123"},
            "invalid_field",
            "template_version_preset_id",
        ),
        (
            {"name": "dev", "template_id": "PRESET", "owner": "bob", "zzz": 1},
            "unknown_fields",
            "owner, zzz",
        ),
        ({"name": "Not Valid", "template_id": "PRESET"}, "invalid_name", "name"),
    ],
)
def test_it_refuses_bad_bodies_and_writes_nothing(client, alice, preset, body, error, mentions):
    template_id = str(preset.template_version.template_id)
    body = {k: (template_id if v == "PRESET" else v) for k, v in body.items()}

    response = post(client, "/api/v2/workspaces", body, **auth(alice))

    assert response.status_code == 400
    assert response.json()["error"] == error
    assert mentions in response.json()["detail"]
    assert rows() == (0, 0, 0)


def test_it_refuses_both_ids_at_once(client, alice, preset):
    response = post(
        client,
        "/api/v2/workspaces",
        {
            "name": "dev",
            "template_id": str(preset.template_version.template_id),
            "template_version_preset_id": str(preset.id),
        },
        **auth(alice),
    )

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_request"
    assert rows() == (0, 0, 0)


@pytest.mark.parametrize("data", ["{not json", "[1, 2]", '"dev"', "null", ""])
def test_it_refuses_bodies_that_are_not_json_objects(client, alice, data):
    response = post(client, "/api/v2/workspaces", data, **auth(alice))

    assert response.status_code == 400
    assert response.json()["error"] == "invalid_json"
    assert rows() == (0, 0, 0)


def test_it_answers_409_when_the_name_is_taken(client, alice, preset):
    headers = auth(alice)
    body = {"name": "dev", "template_version_preset_id": str(preset.id)}
    assert post(client, "/api/v2/workspaces", body, **headers).status_code == 201

    response = post(client, "/api/v2/workspaces", body, **headers)

    assert response.status_code == 409
    assert response.json()["error"] == "name_taken"
    assert rows() == (1, 1, 1)


def test_it_lists_workspaces_instead_of_answering_405(client, alice):
    # Issue 18 added the listing (tests/workspaces/test_listing.py); DELETE stays refused.
    assert client.get("/api/v2/workspaces", **auth(alice)).status_code == 200
    assert client.delete("/api/v2/workspaces", **auth(alice)).status_code == 405


# -- GET /api/v2/workspaces/<id> ------------------------------------------------------------


def test_it_shows_a_workspace_to_its_owner(client, alice, preset):
    workspace = WorkspaceFactory(owner=alice, template=preset.template_version.template)
    BuildFactory(workspace=workspace, preset=preset, job__status=JobStatus.SUCCEEDED)
    build = BuildFactory(workspace=workspace, preset=preset, job__status=JobStatus.SUCCEEDED)
    retired = AgentFactory(build=build, name="old")
    retired.retired_at = retired.created_at
    retired.save()
    agent = AgentFactory(build=build, name="main", initialized_owner=alice)

    response = client.get(f"/api/v2/workspaces/{workspace.id}", **auth(alice))

    assert response.status_code == 200
    body = response.json()
    assert set(body) == WORKSPACE_KEYS
    assert body["latest_build"]["build_number"] == 2
    assert body["latest_build"]["status"] == "succeeded"
    assert body["preset_id"] == str(preset.id)
    assert body["created_at"] == workspace.created_at.isoformat()
    assert body["agents"] == [
        {
            "id": str(agent.id),
            "name": "main",
            "lifecycle_state": "ready",
            "initialized_owner_id": str(alice.id),
            "connection": "connected",
            "last_seen_at": agent.last_seen_at.isoformat(),
        }
    ]


def test_it_says_when_a_workspace_came_from_the_pool(client, alice, preset):
    workspace = prebuild(preset)
    workspace.owner, workspace.name = alice, "claimed"
    workspace.claimed_at = workspace.created_at
    workspace.save()

    body = client.get(f"/api/v2/workspaces/{workspace.id}", **auth(alice)).json()

    assert body["claimed_prebuild"] is True
    assert body["owner"]["username"] == "alice"


def test_it_shows_a_workspace_with_a_fixed_number_of_queries(
    client, alice, preset, django_assert_max_num_queries
):
    headers = auth(alice)
    client.get("/api/v2/templates", **headers)  # the token's first use writes last_used_at
    workspace = WorkspaceFactory(owner=alice, template=preset.template_version.template)
    build = BuildFactory(workspace=workspace)
    for index in range(5):
        AgentFactory(build=build, name=f"agent{index}")

    with django_assert_max_num_queries(5):
        response = client.get(f"/api/v2/workspaces/{workspace.id}", **headers)

    assert len(response.json()["agents"]) == 5


def test_it_answers_404_for_someone_elses_workspace(client, alice):
    workspace = WorkspaceFactory()
    BuildFactory(workspace=workspace)

    response = client.get(f"/api/v2/workspaces/{workspace.id}", **auth(alice))

    assert response.status_code == 404
    assert response.json() == {"error": "not_found", "detail": "No such workspace."}


def test_it_shows_anyones_workspace_to_staff(client, preset):
    workspace = prebuild(preset)
    staff = UserFactory(is_staff=True)

    response = client.get(f"/api/v2/workspaces/{workspace.id}", **auth(staff))

    assert response.status_code == 200
    assert response.json()["owner"]["username"] == "prebuilds"


@pytest.mark.parametrize("workspace_id", [str(uuid.uuid4()), "nope", "1234"])
def test_it_answers_404_for_unknown_or_malformed_ids(client, alice, workspace_id):
    response = client.get(f"/api/v2/workspaces/{workspace_id}", **auth(alice))

    assert response.status_code == 404
    assert response.json()["error"] == "not_found"


def test_it_answers_401_to_anonymous_workspace_requests(client):
    workspace = WorkspaceFactory()

    assert client.get(f"/api/v2/workspaces/{workspace.id}").status_code == 401
    assert client.get(f"/api/v2/workspaces/{workspace.id}", **BAD_TOKEN).status_code == 401


def test_it_answers_405_to_deleting_a_workspace_directly(client, alice):
    workspace = WorkspaceFactory(owner=alice)

    response = client.delete(f"/api/v2/workspaces/{workspace.id}", **auth(alice))

    assert response.status_code == 405
    assert Workspace.objects.filter(deleted=False).count() == 1


# -- POST /api/v2/workspaces/<id>/builds ----------------------------------------------------


@pytest.fixture
def running(alice, preset):
    """Alice's workspace whose start build succeeded."""
    workspace = WorkspaceFactory(owner=alice, template=preset.template_version.template)
    BuildFactory(workspace=workspace, preset=preset, job__status=JobStatus.SUCCEEDED)
    return workspace


@pytest.mark.parametrize("transition", ["start", "stop", "delete"])
def test_it_queues_a_build(client, alice, running, transition):
    response = post(
        client, f"/api/v2/workspaces/{running.id}/builds", {"transition": transition}, **auth(alice)
    )

    assert response.status_code == 201
    build = running.builds.get(build_number=2)
    assert response.json() == {
        "id": str(build.id),
        "build_number": 2,
        "transition": transition,
        "status": "pending",
        "initiator": "alice",
        "is_claim": False,
    }
    assert set(response.json()) == BUILD_KEYS


def test_it_lets_staff_queue_builds_of_anyones_workspace(client, running):
    staff = UserFactory(username="root", is_staff=True)

    response = post(
        client, f"/api/v2/workspaces/{running.id}/builds", {"transition": "stop"}, **auth(staff)
    )

    assert response.status_code == 201
    assert response.json()["initiator"] == "root"


def test_it_answers_409_while_a_build_is_in_progress(client, alice, running):
    BuildFactory(workspace=running, job__status=JobStatus.RUNNING)
    before = rows()

    response = post(
        client, f"/api/v2/workspaces/{running.id}/builds", {"transition": "stop"}, **auth(alice)
    )

    assert response.status_code == 409
    assert response.json()["error"] == "build_in_progress"
    assert rows() == before


def test_it_answers_409_for_a_deleted_workspace(client, alice, running):
    running.deleted = True
    running.save()
    before = rows()

    response = post(
        client, f"/api/v2/workspaces/{running.id}/builds", {"transition": "start"}, **auth(alice)
    )

    assert response.status_code == 409
    assert response.json()["error"] == "workspace_deleted"
    assert rows() == before


@pytest.mark.parametrize(
    ("data", "error"),
    [
        ({"transition": "restart"}, "invalid_transition"),
        ({"transition": 1}, "invalid_field"),
        ({}, "missing_field"),
        ({"transition": "stop", "force": True}, "unknown_fields"),
        ("{oops", "invalid_json"),
        ('["stop"]', "invalid_json"),
    ],
)
def test_it_refuses_bad_build_requests(client, alice, running, data, error):
    before = rows()

    response = post(client, f"/api/v2/workspaces/{running.id}/builds", data, **auth(alice))

    assert response.status_code == 400
    assert response.json()["error"] == error
    assert rows() == before


def test_it_answers_404_to_builds_of_someone_elses_workspace(client, running):
    before = rows()

    response = post(
        client,
        f"/api/v2/workspaces/{running.id}/builds",
        {"transition": "delete"},
        **auth(UserFactory()),
    )

    assert response.status_code == 404
    assert rows() == before


@pytest.mark.parametrize("workspace_id", [str(uuid.uuid4()), "nope"])
def test_it_answers_404_to_builds_of_unknown_workspaces(client, alice, workspace_id):
    response = post(
        client, f"/api/v2/workspaces/{workspace_id}/builds", {"transition": "stop"}, **auth(alice)
    )

    assert response.status_code == 404


def test_it_answers_401_to_anonymous_build_requests(client, running):
    before = rows()
    url = f"/api/v2/workspaces/{running.id}/builds"

    assert post(client, url, {"transition": "stop"}).status_code == 401
    assert post(client, url, {"transition": "stop"}, **BAD_TOKEN).status_code == 401
    assert rows() == before


def test_it_answers_405_to_listing_builds(client, alice, running):
    response = client.get(f"/api/v2/workspaces/{running.id}/builds", **auth(alice))

    assert response.status_code == 405
