"""The operator audit trail: the recording service and the admin (read-only entries, actions)."""

from __future__ import annotations

import pytest

from prebuilds.audit import audit_recent, audit_record
from prebuilds.models import AuditAction, AuditEntry, PrebuildsSettings
from prebuilds.selectors import reconciliation_paused
from tests.accounts.factories import UserFactory
from tests.workspaces.factories import PresetFactory, TemplateFactory, prebuild
from workspaces.models import JobStatus, TemplateVersionPreset

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff():
    return UserFactory(username="dana", is_staff=True, is_superuser=True)


@pytest.fixture
def admin_client(client, staff):
    client.force_login(staff)
    return client


@pytest.fixture
def preset():
    template = TemplateFactory(name="python-dev")
    return PresetFactory(template_version=template.active_version, name="standard")


# -- the service ----------------------------------------------------------------------------


def test_it_records_who_did_what_to_which_preset(staff, preset):
    entry = audit_record(user=staff, action=AuditAction.INVALIDATE, preset=preset, detail="because")

    entry.refresh_from_db()
    assert entry.user == staff
    assert entry.username == "dana"
    assert entry.action == AuditAction.INVALIDATE
    assert entry.preset_id == preset.id
    assert entry.target == f"Default / python-dev / {preset.template_version.name} / standard"
    assert entry.detail == "because"
    assert entry.source == "dashboard"
    assert entry.created_at is not None


def test_it_names_a_workspace_target_by_its_name(staff, preset):
    workspace = prebuild(preset)

    entry = audit_record(user=staff, action=AuditAction.DELETE_PREBUILD, workspace=workspace)

    assert entry.target == workspace.name


def test_it_leaves_the_target_empty_for_global_actions(staff):
    assert audit_record(user=staff, action=AuditAction.PAUSE).target == ""


def test_it_refuses_an_unknown_action_and_writes_nothing(staff):
    with pytest.raises(ValueError):
        audit_record(user=staff, action="explode")

    assert AuditEntry.objects.count() == 0


def test_it_keeps_the_entry_readable_after_the_user_is_deleted(preset):
    user = UserFactory(username="temp", is_staff=True)
    entry = audit_record(user=user, action=AuditAction.RESET, preset=preset)

    user.delete()

    entry.refresh_from_db()
    assert entry.user is None
    assert entry.username == "temp"


def test_it_lists_recent_entries_newest_first(staff):
    first = audit_record(user=staff, action=AuditAction.PAUSE)
    second = audit_record(user=staff, action=AuditAction.RESUME)

    assert list(audit_recent()) == [second, first]
    assert list(audit_recent(limit=1)) == [second]


# -- the admin ------------------------------------------------------------------------------


def test_it_shows_audit_entries_read_only_in_the_admin(admin_client, staff, preset):
    entry = audit_record(user=staff, action=AuditAction.INVALIDATE, preset=preset)

    listing = admin_client.get("/admin/prebuilds/auditentry/")
    change = admin_client.get(f"/admin/prebuilds/auditentry/{entry.pk}/change/")
    add = admin_client.get("/admin/prebuilds/auditentry/add/")
    posted = admin_client.post(
        f"/admin/prebuilds/auditentry/{entry.pk}/change/", {"detail": "forged"}
    )

    assert listing.status_code == 200 and "Invalidated prebuilds" in listing.content.decode()
    assert change.status_code == 200 and 'name="_save"' not in change.content.decode()
    assert add.status_code == 403
    assert posted.status_code == 403
    entry.refresh_from_db()
    assert entry.detail == ""


def test_it_lists_prebuild_pools_in_the_admin(admin_client, preset):
    body = admin_client.get("/admin/prebuilds/prebuildpool/").content.decode()

    assert "standard" in body
    assert f'href="/prebuilds/presets/{preset.id}/"' in body


def run_action(client, action: str, *presets):
    return client.post(
        "/admin/prebuilds/prebuildpool/",
        {"action": action, "_selected_action": [str(p.pk) for p in presets]},
        follow=True,
    )


def test_it_invalidates_from_the_admin_with_an_audit_entry(admin_client, preset):
    other = PresetFactory()

    response = run_action(admin_client, "invalidate_prebuilds", preset, other)

    assert "2 presets invalidated." in response.content.decode()
    assert TemplateVersionPreset.objects.filter(last_invalidated_at__isnull=False).count() == 2
    entries = AuditEntry.objects.filter(action=AuditAction.INVALIDATE, source="admin")
    assert {entry.preset_id for entry in entries} == {preset.id, other.id}


def test_it_resets_from_the_admin_only_what_needs_it(admin_client, preset):
    limited = PresetFactory(prebuild_status="hard_limited", prebuild_status_reason="3 failed")

    response = run_action(admin_client, "reset_status", preset, limited)

    assert "1 presets reset to healthy." in response.content.decode()
    assert TemplateVersionPreset.objects.get(id=limited.id).prebuild_status == "healthy"
    entry = AuditEntry.objects.get()
    assert (entry.preset_id, entry.detail) == (limited.id, "was Hard limited")


def test_it_cancels_pending_builds_from_the_admin(admin_client, preset):
    pending = prebuild(preset, status=JobStatus.PENDING)

    response = run_action(admin_client, "cancel_pending_builds", preset)

    assert "1 pending prebuild builds canceled." in response.content.decode()
    assert pending.builds.get().job.status == JobStatus.CANCELED
    assert AuditEntry.objects.get().detail == "1 canceled"


def test_it_changes_desired_instances_from_the_admin(admin_client, preset):
    response = admin_client.post(
        f"/admin/prebuilds/prebuildpool/{preset.pk}/change/", {"desired_instances": "4"}
    )

    assert response.status_code == 302
    assert TemplateVersionPreset.objects.get(id=preset.id).desired_instances == 4
    entry = AuditEntry.objects.get()
    assert (entry.action, entry.detail, entry.source) == (
        AuditAction.SET_DESIRED_INSTANCES,
        "1 → 4",
        "admin",
    )


def test_it_records_pausing_from_the_settings_admin(admin_client):
    PrebuildsSettings.objects.get_or_create(id=1)

    admin_client.post(
        "/admin/prebuilds/prebuildssettings/1/change/", {"reconciliation_paused": "on"}
    )

    assert reconciliation_paused()
    assert AuditEntry.objects.get().action == AuditAction.PAUSE


def test_it_records_a_pass_run_from_the_admin(admin_client):
    response = admin_client.post(
        "/admin/prebuilds/reconciliationpass/",
        {"action": "run_pass_now", "_selected_action": ["0"], "select_across": "1"},
        follow=True,
    )

    assert response.status_code == 200
    assert AuditEntry.objects.get().action == AuditAction.RECONCILE
