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
    TemplateVersionFactory,
    WorkspaceFactory,
    prebuild,
)
from workspaces.models import JobStatus, PresetSchedule, ProvisionerJob, TemplateVersionPreset

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


# --- bounds and schedules: as strict as a template file ----------------------------------------


def _preset_form(preset, **changes) -> dict:
    """The preset's change form as the admin posts it, with one schedule row and ``changes``."""
    schedule = preset.schedules.get()
    form = {
        "desired_instances": str(preset.desired_instances),
        "invalidate_after": "",
        "scheduling_timezone": "UTC",
        "last_invalidated_at_0": "",
        "last_invalidated_at_1": "",
        "prebuild_status": "healthy",
        "prebuild_status_reason": "",
        "schedules-TOTAL_FORMS": "1",
        "schedules-INITIAL_FORMS": "1",
        "schedules-0-id": str(schedule.id),
        "schedules-0-preset": str(preset.id),
        "schedules-0-position": "0",
        "schedules-0-cron": schedule.cron,
        "schedules-0-instances": str(schedule.instances),
    }
    form.update(changes)
    return form


def _pool_rows(preset) -> tuple:
    preset.refresh_from_db()
    return (
        preset.desired_instances,
        preset.scheduling_timezone,
        list(preset.schedules.values_list("position", "cron", "instances")),
    )


def _refused(client, url: str, form: dict, preset) -> str:
    """Post ``form``; assert the admin showed it again (200) and changed nothing."""
    from html import unescape

    before = _pool_rows(preset)
    response = client.post(url, form)
    assert response.status_code == 200, response.status_code
    assert _pool_rows(preset) == before
    return unescape(response.content.decode())


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"desired_instances": "50000"},
            "desired_instances: 50000 is above the maximum of 100 "
            "(PREBUILDS_MAX_INSTANCES_PER_PRESET)",
        ),
        (
            {"scheduling_timezone": "Mars/Olympus"},
            "scheduling_timezone: unknown timezone 'Mars/Olympus' (use an IANA name",
        ),
        ({"schedules-0-cron": "garbage cron"}, "cron: cron must have 5 fields (got 2)"),
        ({"schedules-0-cron": "0 9 * * *"}, "cron: minute field must be '*' (got '0')"),
        (
            {"schedules-0-instances": "50000"},
            "instances: 50000 is above the maximum of 100 (PREBUILDS_MAX_INSTANCES_PER_PRESET)",
        ),
        (
            {"scheduling_timezone": ""},
            'scheduling_timezone: required when schedules are given (an IANA name, e.g. "UTC")',
        ),
        (
            {
                "schedules-TOTAL_FORMS": "2",
                "schedules-1-preset": "",
                "schedules-1-position": "1",
                "schedules-1-cron": "* 12 * * *",
                "schedules-1-instances": "1",
            },
            "schedules[1].cron: '* 12 * * *' overlaps schedules[0] ('* 9-17 * * 1-5'); "
            "schedules must not overlap",
        ),
    ],
)
def test_the_preset_form_refuses_what_a_template_file_refuses(staff_client, rows, changes, message):
    preset = rows["preset"]
    url = f"/admin/workspaces/templateversionpreset/{preset.id}/change/"
    preset_form = _preset_form(preset, **changes)
    if "schedules-1-preset" in changes:
        preset_form["schedules-1-preset"] = str(preset.id)

    body = _refused(staff_client, url, preset_form, preset)

    assert message in body


def test_the_preset_form_refuses_raising_the_organization_total(staff_client, rows, settings):
    settings.PREBUILDS_MAX_INSTANCES_PER_ORGANIZATION = 30
    PresetFactory(desired_instances=25)
    preset = rows["preset"]  # peak 2 (its schedule): 27 in all
    url = f"/admin/workspaces/templateversionpreset/{preset.id}/change/"

    body = _refused(
        staff_client, url, _preset_form(preset, **{"schedules-0-instances": "6"}), preset
    )
    accepted = staff_client.post(url, _preset_form(preset, desired_instances="5"))

    assert (
        "desired_instances: the organization's prebuilt instances would total 31 (now 27), "
        "above the maximum of 30 (PREBUILDS_MAX_INSTANCES_PER_ORGANIZATION)"
    ) in body
    assert accepted.status_code == 302
    assert _pool_rows(preset)[0] == 5


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"cron": "garbage cron"}, "cron: cron must have 5 fields (got 2)"),
        ({"instances": "50000"}, "instances: 50000 is above the maximum of 100"),
    ],
)
def test_the_schedule_form_refuses_bad_crons_and_instances(staff_client, rows, changes, message):
    preset = rows["preset"]
    schedule = preset.schedules.get()
    url = f"/admin/workspaces/presetschedule/{schedule.id}/change/"
    form = {"preset": str(preset.id), "position": "0", "cron": schedule.cron, "instances": "2"}

    body = _refused(staff_client, url, {**form, **changes}, preset)

    assert message in body


def test_a_schedule_added_on_its_own_is_checked_with_its_presets_others(staff_client, rows):
    preset = rows["preset"]
    TemplateVersionPreset.objects.filter(id=preset.id).update(scheduling_timezone="UTC")
    form = {"preset": str(preset.id), "position": "1", "cron": "* 10 * * 1", "instances": "1"}

    body = _refused(staff_client, "/admin/workspaces/presetschedule/add/", form, preset)

    assert "overlaps schedules[0] ('* 9-17 * * 1-5'); schedules must not overlap" in body


def test_switching_the_active_version_cannot_raise_the_organization_total(staff_client, settings):
    from html import unescape

    settings.PREBUILDS_MAX_INSTANCES_PER_ORGANIZATION = 30
    PresetFactory(desired_instances=25)
    template = TemplateFactory()
    PresetFactory(template_version=template.active_version, desired_instances=1)  # 26 in all
    v1 = template.active_version
    bigger = TemplateVersionFactory(template=template)
    PresetFactory(template_version=bigger, name="standard", desired_instances=6)
    url = f"/admin/workspaces/template/{template.id}/change/"
    form = {
        "display_name": template.display_name,
        "active_version": str(bigger.id),
        "versions-TOTAL_FORMS": "0",  # the read-only inline of versions
        "versions-INITIAL_FORMS": "0",
    }

    refused = staff_client.post(url, form)
    deleted = staff_client.post(url, {**form, "deleted": "on"})  # counts nothing: accepted

    assert refused.status_code == 200
    assert (
        "active_version: the organization's prebuilt instances would total 31 (now 26), above "
        "the maximum of 30 (PREBUILDS_MAX_INSTANCES_PER_ORGANIZATION)"
    ) in unescape(refused.content.decode())
    assert deleted.status_code == 302
    template.refresh_from_db()
    assert (template.active_version, template.deleted) == (bigger, True)
    # Bringing it back would count the bigger version: refused the same way.
    back = staff_client.post(url, form)
    assert back.status_code == 200
    template.refresh_from_db()
    assert template.deleted is True
    assert v1 != bigger


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


def test_the_preset_form_shows_a_sizing_goal_and_cannot_change_it(staff_client, rows):
    preset = rows["preset"]
    TemplateVersionPreset.objects.filter(id=preset.id).update(
        target_hit_rate=0.95, min_instances=1, max_instances=12
    )
    url = f"/admin/workspaces/templateversionpreset/{preset.id}/change/"

    page = staff_client.get(url).content.decode()
    staff_client.post(url, _preset_form(preset, max_instances="99", target_hit_rate="0.5"))

    assert "0.95" in page and "Max instances" in page
    preset.refresh_from_db()
    assert (preset.target_hit_rate, preset.max_instances) == (0.95, 12)
