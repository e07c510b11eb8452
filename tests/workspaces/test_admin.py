"""Admin for the workspaces app: changelists, read-only rows, actions that call services."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission

from tests.accounts.factories import UserFactory
from tests.workspaces.factories import (
    AgentFactory,
    BuildFactory,
    PresetFactory,
    TemplateFactory,
    WorkspaceFactory,
    prebuild,
)
from workspaces.models import JobStatus, PresetSchedule, ProvisionerJob

pytestmark = pytest.mark.django_db

MODELS = [
    "template",
    "templateversion",
    "templateversionpreset",
    "presetschedule",
    "workspace",
    "workspacebuild",
    "provisionerjob",
    "workspaceagent",
]


@pytest.fixture
def root():
    return UserFactory(username="root", is_staff=True, is_superuser=True)


@pytest.fixture
def staff_client(client, root):
    client.force_login(root)
    return client


@pytest.fixture
def rows():
    """One of everything, including a prebuild owned by the hidden system user."""
    preset = PresetFactory()
    PresetSchedule.objects.create(preset=preset, cron="* 9-17 * * 1-5", instances=2)
    pool = prebuild(preset)
    workspace = WorkspaceFactory(name="dev")
    build = BuildFactory(workspace=workspace, job__status=JobStatus.SUCCEEDED)
    AgentFactory(build=build)
    return {"preset": preset, "prebuild": pool, "workspace": workspace, "build": build}


@pytest.mark.parametrize("model", MODELS)
def test_it_loads_every_changelist_for_staff(staff_client, rows, model):
    response = staff_client.get(f"/admin/workspaces/{model}/")

    assert response.status_code == 200


def test_it_shows_prebuilds_with_their_system_owner(staff_client, rows):
    body = staff_client.get("/admin/workspaces/workspace/?prebuild=yes").content.decode()

    assert rows["prebuild"].name in body
    assert "prebuilds" in body
    assert ">dev<" not in body


@pytest.mark.parametrize(
    ("model", "key"),
    [("workspace", "workspace"), ("workspacebuild", "build"), ("templateversionpreset", "preset")],
)
def test_it_loads_change_pages(staff_client, rows, model, key):
    response = staff_client.get(f"/admin/workspaces/{model}/{rows[key].pk}/change/")

    assert response.status_code == 200


def test_it_shows_the_owner_read_only_and_offers_no_add(staff_client, rows):
    workspace = rows["workspace"]

    change = staff_client.get(f"/admin/workspaces/workspace/{workspace.id}/change/")
    add = staff_client.get("/admin/workspaces/workspace/add/")

    assert 'name="owner"' not in change.content.decode()
    assert workspace.owner.username in change.content.decode()
    assert add.status_code == 403


def test_it_never_shows_agent_token_hashes(staff_client, rows):
    agent = rows["build"].agents.get()

    body = staff_client.get(f"/admin/workspaces/workspaceagent/{agent.id}/change/").content
    assert agent.token_secret_hash not in body.decode()


def test_it_lets_operators_change_pool_settings(staff_client, rows):
    preset = rows["preset"]
    url = f"/admin/workspaces/templateversionpreset/{preset.id}/change/"
    form = {
        "desired_instances": "5",
        "invalidate_after": "",
        "scheduling_timezone": "UTC",
        "last_invalidated_at_0": "",
        "last_invalidated_at_1": "",
        "prebuild_status": "healthy",
        "prebuild_status_reason": "",
        "schedules-TOTAL_FORMS": "1",
        "schedules-INITIAL_FORMS": "1",
        "schedules-0-id": str(preset.schedules.get().id),
        "schedules-0-preset": str(preset.id),
        "schedules-0-position": "0",
        "schedules-0-cron": "* 9-17 * * 1-5",
        "schedules-0-instances": "2",
        "name": "renamed",  # read-only: ignored
    }

    response = staff_client.post(url, form)

    assert response.status_code == 302, response.content.decode()[:2000]
    preset.refresh_from_db()
    assert (preset.desired_instances, preset.scheduling_timezone) == (5, "UTC")
    assert preset.name != "renamed"


def test_it_redirects_non_staff_to_the_admin_login(client, rows):
    client.force_login(UserFactory())

    response = client.get("/admin/workspaces/workspace/")

    assert response.status_code == 302


@pytest.mark.parametrize(
    ("action", "transition"),
    [("queue_stop_build", "stop"), ("queue_delete_build", "delete")],
)
def test_it_queues_builds_through_the_service(staff_client, root, rows, action, transition):
    workspace = rows["workspace"]

    response = staff_client.post(
        "/admin/workspaces/workspace/",
        {"action": action, "_selected_action": [str(workspace.id)]},
        follow=True,
    )

    build = workspace.builds.get(build_number=2)
    assert (build.transition, build.job.status, build.initiator) == (transition, "pending", root)
    assert f"Queued 1 {transition} build(s)." in response.content.decode()


def test_it_reports_workspaces_the_service_refused(staff_client, rows):
    workspace = rows["workspace"]
    BuildFactory(workspace=workspace, job__status=JobStatus.RUNNING)

    response = staff_client.post(
        "/admin/workspaces/workspace/",
        {"action": "queue_stop_build", "_selected_action": [str(workspace.id)]},
        follow=True,
    )

    body = response.content.decode()
    assert "Queued 0 stop build(s)." in body
    assert "is still running" in body
    assert workspace.builds.count() == 2


def test_it_cancels_jobs_from_the_build_list(staff_client, rows):
    pending = BuildFactory(workspace=WorkspaceFactory(), job__status=JobStatus.PENDING)
    running = BuildFactory(workspace=WorkspaceFactory(), job__status=JobStatus.RUNNING)

    response = staff_client.post(
        "/admin/workspaces/workspacebuild/",
        {
            "action": "cancel_job",
            "_selected_action": [str(pending.id), str(running.id), str(rows["build"].id)],
        },
        follow=True,
    )

    pending.job.refresh_from_db()
    running.job.refresh_from_db()
    rows["build"].job.refresh_from_db()
    assert pending.job.status == JobStatus.CANCELED
    assert running.job.status == JobStatus.CANCELING
    assert rows["build"].job.status == JobStatus.SUCCEEDED
    assert "1 job(s) had already finished." in response.content.decode()


def test_it_cancels_jobs_from_the_job_list(staff_client, rows):
    pending = BuildFactory(workspace=WorkspaceFactory(), job__status=JobStatus.PENDING)

    staff_client.post(
        "/admin/workspaces/provisionerjob/",
        {"action": "cancel_job", "_selected_action": [str(pending.job_id)]},
    )

    pending.job.refresh_from_db()
    assert pending.job.status == JobStatus.CANCELED


def test_it_hides_actions_from_staff_without_permission(client, rows):
    viewer = UserFactory(username="viewer", is_staff=True)
    viewer.user_permissions.add(
        Permission.objects.get(codename="view_workspace"),
        Permission.objects.get(codename="view_workspacebuild"),
    )
    client.force_login(viewer)
    workspace = rows["workspace"]

    page = client.get("/admin/workspaces/workspace/").content.decode()
    client.post(
        "/admin/workspaces/workspace/",
        {"action": "queue_delete_build", "_selected_action": [str(workspace.id)]},
    )

    assert "queue_delete_build" not in page
    assert workspace.builds.count() == 1


def test_it_limits_the_active_version_choice_to_the_templates_own_versions(staff_client, rows):
    template = rows["preset"].template_version.template
    other = TemplateFactory()

    body = staff_client.get(f"/admin/workspaces/template/{template.id}/change/").content.decode()

    assert str(template.active_version_id) in body
    assert str(other.active_version_id) not in body


def test_forget_worker_host_lets_the_next_build_run_on_any_worker(staff_client, rows):
    workspace = rows["workspace"]
    version = workspace.template.active_version
    version_is_local = version.provisioner == "local"
    type(workspace).objects.filter(id=workspace.id).update(host_queue="host.gone-for-good")

    response = staff_client.post(
        "/admin/workspaces/workspace/",
        {"action": "forget_host", "_selected_action": [str(workspace.id)]},
        follow=True,
    )
    staff_client.post(
        "/admin/workspaces/workspace/",
        {"action": "queue_delete_build", "_selected_action": [str(workspace.id)]},
    )

    workspace.refresh_from_db()
    assert workspace.host_queue == ""
    assert "1 workspace(s) no longer tied to a worker host" in response.content.decode()
    assert version_is_local  # else the queue below would say nothing about the host
    assert workspace.builds.get(build_number=2).job.queue == "default"


def test_forget_worker_host_needs_the_change_permission(client, rows):
    viewer = UserFactory(username="viewer", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_workspace"))
    client.force_login(viewer)
    workspace = rows["workspace"]
    type(workspace).objects.filter(id=workspace.id).update(host_queue="host.elsewhere")

    page = client.get("/admin/workspaces/workspace/").content.decode()
    client.post(
        "/admin/workspaces/workspace/",
        {"action": "forget_host", "_selected_action": [str(workspace.id)]},
    )

    workspace.refresh_from_db()
    assert "forget_host" not in page
    assert workspace.host_queue == "host.elsewhere"


def test_the_job_list_filters_failures_by_kind(staff_client):
    lost = BuildFactory(job__status=JobStatus.FAILED).job
    broken = BuildFactory(job__status=JobStatus.FAILED).job
    ProvisionerJob.objects.filter(id=lost.id).update(failure_kind="infrastructure")
    ProvisionerJob.objects.filter(id=broken.id).update(failure_kind="template")

    response = staff_client.get("/admin/workspaces/provisionerjob/?failure_kind=infrastructure")

    body = response.content.decode()
    assert response.status_code == 200
    assert str(lost.id) in body and str(broken.id) not in body
    assert "Infrastructure" in body
