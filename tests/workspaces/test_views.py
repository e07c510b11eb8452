"""User pages: workspace list, new workspace, detail with its live fragment, build buttons."""

from __future__ import annotations

import uuid

import pytest

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
from workspaces.models import AgentLifecycle, JobStatus, ProvisionerJob, Workspace, WorkspaceBuild

pytestmark = pytest.mark.django_db

HX = {"HTTP_HX_REQUEST": "true"}


@pytest.fixture
def alice():
    return UserFactory(username="alice")


@pytest.fixture
def alice_client(client, alice):
    client.force_login(alice)
    return client


@pytest.fixture
def workspace(alice):
    """Alice's workspace, started successfully, with one ready agent."""
    template = TemplateFactory(name="python", display_name="Python dev")
    workspace = WorkspaceFactory(owner=alice, template=template, name="dev")
    build = BuildFactory(workspace=workspace, job__status=JobStatus.SUCCEEDED)
    build.job.logs = "provisioning...\nall good\n"
    build.job.save()
    AgentFactory(build=build, name="main", lifecycle_state=AgentLifecycle.READY)
    return workspace


def login_url(path: str) -> str:
    return f"/login/?next={path}"


# -- home -----------------------------------------------------------------------------------


def test_it_sends_home_to_the_workspace_list(alice_client):
    response = alice_client.get("/")

    assert response.status_code == 302
    assert response.url == "/workspaces/"


def test_it_links_workspaces_in_the_navigation(alice_client):
    body = alice_client.get("/workspaces/").content.decode()

    assert '<a href="/workspaces/">Workspaces</a>' in body


# -- list -----------------------------------------------------------------------------------


def test_it_lists_my_workspaces(alice_client, workspace):
    WorkspaceFactory(name="someone-elses")

    response = alice_client.get("/workspaces/")

    body = response.content.decode()
    assert response.status_code == 200
    assert f'href="/workspaces/{workspace.id}/"' in body
    assert "Python dev" in body
    assert "succeeded" in body
    assert "someone-elses" not in body


def test_it_leaves_deleted_workspaces_out_of_the_list(alice_client, alice):
    WorkspaceFactory(owner=alice, name="gone", deleted=True)

    assert "gone" not in alice_client.get("/workspaces/").content.decode()


def test_it_shows_an_empty_state_with_a_new_workspace_link(alice_client):
    body = alice_client.get("/workspaces/").content.decode()

    assert "no workspaces yet" in body
    assert 'href="/workspaces/new"' in body


def test_it_ignores_staff_filters_for_users(alice_client, alice):
    WorkspaceFactory(name="bobs", owner=UserFactory(username="bob"))
    prebuild(PresetFactory())

    body = alice_client.get("/workspaces/?prebuilds=1&owner=bob").content.decode()

    assert "bobs" not in body
    assert "prebuild-" not in body
    assert 'name="owner"' not in body


def test_it_lists_everyones_workspaces_to_staff_but_prebuilds_only_on_request(client, workspace):
    client.force_login(UserFactory(username="root", is_staff=True))
    pool = prebuild(PresetFactory())

    default = client.get("/workspaces/").content.decode()
    with_prebuilds = client.get("/workspaces/?prebuilds=1").content.decode()

    assert "dev" in default and "alice" in default
    assert pool.name not in default
    assert pool.name in with_prebuilds and "dev" in with_prebuilds


def test_it_filters_by_owner_for_staff(client, workspace):
    client.force_login(UserFactory(username="root", is_staff=True))
    WorkspaceFactory(name="bobs", owner=UserFactory(username="bob"))

    body = client.get("/workspaces/?owner=bob").content.decode()

    assert "bobs" in body
    assert f"/workspaces/{workspace.id}/" not in body


def test_it_pages_long_lists(alice_client, alice):
    for index in range(55):
        WorkspaceFactory(owner=alice, name=f"ws-many-{index}")

    first = alice_client.get("/workspaces/").content.decode()
    second = alice_client.get("/workspaces/?page=2").content.decode()

    assert first.count("ws-many-") == 50
    assert second.count("ws-many-") == 5
    assert "Page 2 of 2" in second


def test_it_lists_with_a_fixed_number_of_queries(
    alice_client, alice, django_assert_max_num_queries
):
    for index in range(10):
        build = BuildFactory(workspace=WorkspaceFactory(owner=alice, name=f"w{index}"))
        AgentFactory(build=build)

    with django_assert_max_num_queries(8):
        alice_client.get("/workspaces/")


def test_it_redirects_anonymous_users_from_the_list(client):
    response = client.get("/workspaces/")

    assert response.status_code == 302
    assert response.url == login_url("/workspaces/")


# -- new ------------------------------------------------------------------------------------


@pytest.fixture
def preset():
    template = TemplateFactory(name="python", display_name="Python dev")
    return PresetFactory(template_version=template.active_version, name="standard")


def test_it_offers_only_usable_templates_and_active_presets(alice_client, preset):
    TemplateFactory(organization=OrganizationFactory(), display_name="Elsewhere")
    TemplateFactory(display_name="Gone", deleted=True)
    template = preset.template_version.template
    old_preset = PresetFactory(template_version=template.active_version, name="old-one")
    template.active_version = TemplateVersionFactory(template=template)
    template.save()
    current = PresetFactory(template_version=template.active_version, name="current")

    body = alice_client.get("/workspaces/new").content.decode()

    assert "Python dev" in body
    assert "Elsewhere" not in body and "Gone" not in body
    assert str(current.id) in body
    assert str(old_preset.id) not in body and str(preset.id) not in body


def test_it_creates_a_workspace_from_a_preset_and_redirects(alice_client, alice, preset):
    template = preset.template_version.template

    response = alice_client.post(
        "/workspaces/new", {"template": template.id, "preset": preset.id, "name": "dev"}
    )

    workspace = Workspace.objects.get()
    assert response.status_code == 302
    assert response.url == f"/workspaces/{workspace.id}/"
    assert workspace.owner == alice
    assert workspace.builds.get().preset == preset


def test_it_creates_a_workspace_from_a_template_without_preset(alice_client, preset):
    template = preset.template_version.template

    response = alice_client.post("/workspaces/new", {"template": template.id, "name": "dev"})

    assert response.status_code == 302
    assert Workspace.objects.get().builds.get().preset is None


@pytest.mark.parametrize(
    ("name", "message"),
    [("Bad Name", "lowercase letters"), ("", "This field is required")],
)
def test_it_shows_name_errors_next_to_the_field_and_creates_nothing(
    alice_client, preset, name, message
):
    template = preset.template_version.template

    response = alice_client.post(
        "/workspaces/new", {"template": template.id, "preset": preset.id, "name": name}
    )

    body = response.content.decode()
    assert response.status_code == 200
    assert message in body
    assert 'aria-invalid="true"' in body
    assert not Workspace.objects.exists()
    assert not WorkspaceBuild.objects.exists()


def test_it_shows_a_taken_name(alice_client, alice, preset):
    template = preset.template_version.template
    WorkspaceFactory(owner=alice, template=template, name="dev")

    response = alice_client.post("/workspaces/new", {"template": template.id, "name": "dev"})

    assert "already have a workspace" in response.content.decode()
    assert Workspace.objects.count() == 1


def test_it_refuses_a_preset_of_another_template(alice_client, preset):
    other = TemplateFactory()

    response = alice_client.post(
        "/workspaces/new", {"template": other.id, "preset": preset.id, "name": "dev"}
    )

    assert "Pick a preset of the chosen template" in response.content.decode()
    assert not Workspace.objects.exists()


def test_it_refuses_another_organizations_template(alice_client):
    TemplateFactory()
    foreign = TemplateFactory(organization=OrganizationFactory())

    response = alice_client.post("/workspaces/new", {"template": foreign.id, "name": "dev"})

    assert response.status_code == 200
    assert "Select a valid choice" in response.content.decode()
    assert not Workspace.objects.exists()


def test_it_says_when_no_template_is_available(alice_client):
    body = alice_client.get("/workspaces/new").content.decode()

    assert "No template is available" in body


def test_it_redirects_anonymous_users_from_new(client, preset):
    response = client.post(
        "/workspaces/new", {"template": preset.template_version.template_id, "name": "dev"}
    )

    assert response.status_code == 302
    assert response.url == login_url("/workspaces/new")
    assert not Workspace.objects.exists()


# -- detail ---------------------------------------------------------------------------------


def test_it_shows_the_workspace(alice_client, workspace):
    response = alice_client.get(f"/workspaces/{workspace.id}/")

    body = response.content.decode()
    assert response.status_code == 200
    assert "<html" in body
    assert "Build #1" in body
    assert "all good" in body  # the build log
    assert "main" in body and "ready" in body  # the agent
    assert "Build history" in body
    assert 'hx-trigger="every 2s"' not in body  # settled: nothing to poll


def test_it_shows_only_the_end_of_a_huge_log(alice_client, workspace, monkeypatch):
    monkeypatch.setattr("workspaces.views.LOG_TAIL_CHARS", 10)
    build = workspace.builds.get()
    build.job.logs = "early lines\n" + "x" * 5 + "THE END"
    build.job.save()

    body = alice_client.get(f"/workspaces/{workspace.id}/", **HX).content.decode()

    assert "xxxTHE END" in body
    assert "early lines" not in body
    assert "Showing the end of the log." in body


def test_it_polls_while_a_build_is_running(alice_client, workspace):
    BuildFactory(workspace=workspace, transition="stop", job__status=JobStatus.RUNNING)

    body = alice_client.get(f"/workspaces/{workspace.id}/").content.decode()

    assert 'hx-trigger="every 2s"' in body
    assert "A build is in progress" in body


def test_it_answers_htmx_with_only_the_fragment(alice_client, workspace):
    BuildFactory(workspace=workspace, job__status=JobStatus.PENDING)

    response = alice_client.get(f"/workspaces/{workspace.id}/", **HX)

    body = response.content.decode()
    assert response.status_code == 200
    assert "<html" not in body
    assert 'id="build-status"' in body
    assert 'hx-trigger="every 2s"' in body


def test_it_stops_polling_once_the_build_is_final_and_agents_are_up(alice_client, workspace):
    response = alice_client.get(f"/workspaces/{workspace.id}/", **HX)

    assert response.status_code == 286
    body = response.content.decode()
    assert "<html" not in body
    assert "succeeded" in body
    assert 'hx-trigger="every 2s"' not in body


@pytest.mark.parametrize("state", [AgentLifecycle.CREATED, AgentLifecycle.STARTING])
def test_it_keeps_polling_while_agents_come_up_after_a_start(alice_client, workspace, state):
    workspace.agents.update(lifecycle_state=state)

    response = alice_client.get(f"/workspaces/{workspace.id}/", **HX)

    assert response.status_code == 200
    assert 'hx-trigger="every 2s"' in response.content.decode()


def test_it_stops_polling_after_a_failed_start_even_with_agents_that_never_came_up(
    alice_client, workspace
):
    build = BuildFactory(workspace=workspace, job__status=JobStatus.FAILED)
    AgentFactory(build=build, name="second", lifecycle_state=AgentLifecycle.CREATED)

    response = alice_client.get(f"/workspaces/{workspace.id}/", **HX)

    assert response.status_code == 286


@pytest.mark.parametrize(
    ("kind", "label"),
    [("infrastructure", "infrastructure failure"), ("template", "template failure")],
)
def test_it_shows_which_kind_of_failure_a_failed_build_was(alice_client, workspace, kind, label):
    build = BuildFactory(workspace=workspace, job__status=JobStatus.FAILED)
    ProvisionerJob.objects.filter(id=build.job_id).update(
        failure_kind=kind, error="something broke"
    )

    body = alice_client.get(f"/workspaces/{workspace.id}/").content.decode()

    status = body.split('id="build-status"')[1].split("</section>")[0]
    assert label in status and "something broke" in status
    other = {"infrastructure failure", "template failure"} - {label}
    assert other.pop() not in status


def test_it_shows_anyones_workspace_to_staff(client, workspace):
    client.force_login(UserFactory(is_staff=True))

    assert client.get(f"/workspaces/{workspace.id}/").status_code == 200


def test_it_answers_404_for_someone_elses_workspace(client, workspace):
    client.force_login(UserFactory())

    assert client.get(f"/workspaces/{workspace.id}/").status_code == 404
    assert client.get(f"/workspaces/{workspace.id}/", **HX).status_code == 404
    assert client.get(f"/workspaces/{workspace.id}/delete").status_code == 404


def test_it_answers_404_for_an_unknown_workspace(alice_client):
    assert alice_client.get(f"/workspaces/{uuid.uuid4()}/").status_code == 404
    assert alice_client.get("/workspaces/not-a-uuid/").status_code == 404


def test_it_redirects_anonymous_users_from_the_detail(client, workspace):
    response = client.get(f"/workspaces/{workspace.id}/")

    assert response.status_code == 302
    assert response.url == login_url(f"/workspaces/{workspace.id}/")


def test_it_shows_a_deleted_workspace_without_buttons(alice_client, workspace):
    workspace.deleted = True
    workspace.save()

    body = alice_client.get(f"/workspaces/{workspace.id}/").content.decode()

    assert "deleted" in body
    assert 'name="transition"' not in body


# -- build buttons --------------------------------------------------------------------------


@pytest.mark.parametrize("transition", ["start", "stop", "delete"])
def test_it_queues_builds_from_the_buttons(alice_client, alice, workspace, transition):
    response = alice_client.post(
        f"/workspaces/{workspace.id}/builds", {"transition": transition}, follow=True
    )

    build = workspace.builds.get(build_number=2)
    assert (build.transition, build.job.status, build.initiator) == (transition, "pending", alice)
    assert response.redirect_chain == [(f"/workspaces/{workspace.id}/", 302)]
    assert f"Build #2 ({transition}) queued." in response.content.decode()


def test_it_offers_the_buttons_with_a_confirmation_for_delete(alice_client, workspace):
    body = alice_client.get(f"/workspaces/{workspace.id}/").content.decode()

    assert 'value="start"' in body and 'value="stop"' in body
    assert "hx-confirm=" in body
    assert f'href="/workspaces/{workspace.id}/delete"' in body  # the no-JS confirmation


def test_it_asks_for_confirmation_without_javascript(alice_client, workspace):
    response = alice_client.get(f"/workspaces/{workspace.id}/delete")

    body = response.content.decode()
    assert response.status_code == 200
    assert f'action="/workspaces/{workspace.id}/builds"' in body
    assert 'value="delete"' in body
    assert workspace.builds.count() == 1


def test_it_redirects_htmx_build_requests_on_the_client(alice_client, workspace):
    response = alice_client.post(
        f"/workspaces/{workspace.id}/builds", {"transition": "delete"}, **HX
    )

    assert response["HX-Redirect"] == f"/workspaces/{workspace.id}/"
    assert workspace.builds.latest("build_number").transition == "delete"


def test_it_says_why_a_build_was_refused(alice_client, workspace):
    BuildFactory(workspace=workspace, job__status=JobStatus.RUNNING)

    response = alice_client.post(
        f"/workspaces/{workspace.id}/builds", {"transition": "stop"}, follow=True
    )

    assert "is still running" in response.content.decode()
    assert workspace.builds.count() == 2


def test_it_refuses_a_bad_transition(alice_client, workspace):
    response = alice_client.post(
        f"/workspaces/{workspace.id}/builds", {"transition": "explode"}, follow=True
    )

    assert "use start, stop or delete" in response.content.decode()
    assert workspace.builds.count() == 1


def test_it_answers_404_to_builds_of_someone_elses_workspace(client, workspace):
    client.force_login(UserFactory())

    response = client.post(f"/workspaces/{workspace.id}/builds", {"transition": "delete"})

    assert response.status_code == 404
    assert workspace.builds.count() == 1


def test_it_redirects_anonymous_build_requests(client, workspace):
    response = client.post(f"/workspaces/{workspace.id}/builds", {"transition": "delete"})

    assert response.status_code == 302
    assert workspace.builds.count() == 1


def test_it_refuses_get_on_the_build_endpoint(alice_client, workspace):
    assert alice_client.get(f"/workspaces/{workspace.id}/builds").status_code == 405
