from __future__ import annotations

import logging
import re
from datetime import timedelta

import pytest
from django.utils import timezone

from accounts.models import SYSTEM_USER_ID, Membership
from prebuilds import reconciler
from prebuilds.models import ReconciliationPass
from prebuilds.reconciler import pass_document, prebuild_delete, reconcile
from prebuilds.services import reconciliation_pause
from tests.accounts.factories import OrganizationFactory, UserFactory
from tests.workspaces.factories import (
    PresetFactory,
    TemplateFactory,
    TemplateVersionFactory,
    prebuild,
    system_user,
)
from workspaces.models import (
    BuildReason,
    FailureKind,
    JobStatus,
    PrebuildStatus,
    ProvisionerJob,
    Workspace,
    WorkspaceBuild,
)

pytestmark = pytest.mark.django_db

PREBUILD_NAME = re.compile(r"^prebuild-[a-z2-7]{16}$")


def pool(preset) -> list[Workspace]:
    """The preset's live system-owned workspaces whose latest build is a start that has not
    failed or been canceled (running, or on its way)."""
    result = []
    for workspace in Workspace.objects.filter(owner_id=SYSTEM_USER_ID, deleted=False):
        latest = workspace.builds.order_by("-build_number").first()
        if (
            latest.preset_id == preset.id
            and latest.transition == "start"
            and latest.job.status not in (JobStatus.FAILED, JobStatus.CANCELED)
        ):
            result.append(workspace)
    return result


def delete_builds() -> set:
    return set(
        WorkspaceBuild.objects.filter(transition="delete").values_list("workspace_id", flat=True)
    )


def test_it_fills_an_empty_pool():
    preset = PresetFactory(desired_instances=2, parameters={"repo": "r"})

    result = reconcile()

    assert result.lock_acquired and result.actions_taken == 2 and result.errors == 0
    workspaces = pool(preset)
    assert len(workspaces) == 2
    for workspace in workspaces:
        assert workspace.owner_id == SYSTEM_USER_ID
        assert PREBUILD_NAME.match(workspace.name)
        build = workspace.builds.get()
        assert (build.transition, build.job.status, build.reason) == (
            "start",
            "pending",
            "prebuild",
        )
        assert build.initiator_id == SYSTEM_USER_ID
        assert build.preset_id == preset.id
        assert build.template_version_id == preset.template_version_id
        assert build.parameters == {"repo": "r"}
    # A second pass counts the pending builds as starting and creates nothing more.
    assert reconcile().actions_taken == 0
    assert len(pool(preset)) == 2


def test_it_deletes_extraneous_prebuilds_oldest_first():
    now = timezone.now()
    preset = PresetFactory(desired_instances=1)
    oldest = prebuild(preset, created_at=now - timedelta(hours=3))
    older = prebuild(preset, created_at=now - timedelta(hours=2))
    newest = prebuild(preset, created_at=now - timedelta(hours=1))

    result = reconcile()

    assert delete_builds() == {oldest.id, older.id}
    build = oldest.builds.order_by("-build_number").first()
    assert (build.initiator_id, build.reason, build.job.status) == (
        SYSTEM_USER_ID,
        BuildReason.PREBUILD,
        "pending",
    )
    assert newest.builds.count() == 1
    document = pass_document(result)["presets"][0]
    assert document["actions"] == [
        {
            "type": "delete",
            "workspace_ids": [str(oldest.id), str(older.id)],
            "reason": "extraneous",
        }
    ]


def test_it_deletes_expired_prebuilds_and_replaces_them():
    now = timezone.now()
    preset = PresetFactory(desired_instances=2, invalidate_after=timedelta(hours=1))
    expired = prebuild(preset, created_at=now - timedelta(hours=2))
    fresh = prebuild(preset, created_at=now - timedelta(minutes=5))

    result = reconcile()

    assert delete_builds() == {expired.id}
    assert fresh.builds.count() == 1
    assert result.actions_taken == 2  # one delete build, one new prebuild
    assert Workspace.objects.filter(owner_id=SYSTEM_USER_ID, deleted=False).count() == 3


def test_it_cleans_up_an_inactive_version():
    preset = PresetFactory(desired_instances=2)
    running = [prebuild(preset), prebuild(preset)]
    pending = prebuild(preset, status=JobStatus.PENDING)
    template = preset.template_version.template
    template.active_version = TemplateVersionFactory(template=template)
    template.save()

    result = reconcile()

    assert delete_builds() == {workspace.id for workspace in running}
    assert pending.builds.get().job.status == JobStatus.CANCELED
    assert result.actions_taken == 3
    assert Workspace.objects.filter(owner_id=SYSTEM_USER_ID).count() == 3  # nothing created


def test_it_holds_creation_during_backoff(settings):
    settings.PREBUILDS_BACKOFF_INTERVAL = timedelta(seconds=60)
    now = timezone.now()
    preset = PresetFactory(desired_instances=1)
    failed = prebuild(preset, status=JobStatus.FAILED)
    ProvisionerJob.objects.filter(build__workspace=failed).update(completed_at=now)

    result = reconcile(now=now + timedelta(seconds=30))

    assert pool(preset) == []
    assert pass_document(result)["presets"][0]["actions"] == [
        {
            "type": "backoff",
            "until": (now + timedelta(seconds=60)).isoformat(),
            "reason": "recent_failures_1",
        }
    ]
    reconcile(now=now + timedelta(seconds=61))
    assert len(pool(preset)) == 1


def test_it_marks_a_hard_limited_preset_stops_creating_and_logs_once(settings, caplog):
    settings.PREBUILDS_FAILURE_HARD_LIMIT = 2
    settings.PREBUILDS_BACKOFF_INTERVAL = timedelta(0)  # only the hard limit may hold creation
    preset = PresetFactory(desired_instances=1)
    for _ in range(2):
        prebuild(preset, status=JobStatus.FAILED)

    with caplog.at_level(logging.WARNING, logger="prebuilds.reconciler"):
        first = reconcile()
        second = reconcile()

    preset.refresh_from_db()
    assert preset.prebuild_status == PrebuildStatus.HARD_LIMITED
    assert "last 2 prebuild builds failed" in preset.prebuild_status_reason
    assert pool(preset) == []
    assert [p["status"] for p in pass_document(first)["presets"]] == ["hard_limited"]
    assert pass_document(second)["presets"][0]["actions"] == []
    status_logs = [r for r in caplog.records if "prebuilds_preset_status" in r.getMessage()]
    assert len(status_logs) == 1


def test_lost_workers_neither_back_off_nor_hard_limit_a_preset(settings):
    """Three infrastructure failures in a row (the hard limit is 3): the failed prebuilds are
    simply replaced, and the status document says what they were."""
    settings.PREBUILDS_FAILURE_HARD_LIMIT = 3
    settings.PREBUILDS_BACKOFF_INTERVAL = timedelta(hours=1)  # a back-off would be visible
    now = timezone.now()
    preset = PresetFactory(desired_instances=2)
    for seconds in (30, 20, 10):
        lost = prebuild(preset, status=JobStatus.FAILED, created_at=now - timedelta(minutes=1))
        ProvisionerJob.objects.filter(build__workspace=lost).update(
            failure_kind=FailureKind.INFRASTRUCTURE,
            error="Worker lost (heartbeat timeout).",
            completed_at=now - timedelta(seconds=seconds),
        )

    result = reconcile(now=now)

    preset.refresh_from_db()
    assert preset.prebuild_status == PrebuildStatus.HEALTHY
    [document] = pass_document(result)["presets"]
    assert document["status"] == "healthy"
    assert document["actions"] == [{"type": "create", "count": 2, "reason": "below_desired"}]
    assert document["failures"] == {"template": 0, "infrastructure": 3}
    assert document["last_failure"] == {
        "kind": "infrastructure",
        "error": "Worker lost (heartbeat timeout).",
        "at": (now - timedelta(seconds=10)).isoformat(),
    }
    assert len(pool(preset)) == 2


def test_replacing_lost_prebuilds_cannot_spin(settings):
    """The replacements of infrastructure failures count as starting while they build: the
    next pass creates nothing more, however often passes run."""
    now = timezone.now()
    preset = PresetFactory(desired_instances=1)
    lost = prebuild(preset, status=JobStatus.FAILED)
    ProvisionerJob.objects.filter(build__workspace=lost).update(
        failure_kind=FailureKind.INFRASTRUCTURE, completed_at=now
    )

    reconcile(now=now)
    second = reconcile(now=now + timedelta(seconds=1))

    assert len(pool(preset)) == 1
    assert pass_document(second)["presets"][0]["actions"] == []
    assert pass_document(second)["presets"][0]["state"]["starting"] == 1


def test_template_failures_still_hard_limit_among_lost_workers(settings):
    settings.PREBUILDS_FAILURE_HARD_LIMIT = 2
    settings.PREBUILDS_BACKOFF_INTERVAL = timedelta(0)
    start = timezone.now() - timedelta(minutes=10)
    preset = PresetFactory(desired_instances=1)
    for minute, kind in enumerate(["template", "infrastructure", "template"], start=1):
        failed = prebuild(
            preset, status=JobStatus.FAILED, created_at=start + timedelta(minutes=minute)
        )
        ProvisionerJob.objects.filter(build__workspace=failed).update(failure_kind=kind)

    reconcile()

    preset.refresh_from_db()
    assert preset.prebuild_status == PrebuildStatus.HARD_LIMITED
    assert preset.prebuild_status_reason == "the last 2 prebuild builds failed (template failures)"


def test_a_hard_limited_preset_still_deletes(settings):
    preset = PresetFactory(desired_instances=0, prebuild_status=PrebuildStatus.HARD_LIMITED)
    extra = prebuild(preset)

    reconcile()

    assert delete_builds() == {extra.id}


def test_it_marks_and_skips_a_preset_that_fails_validation(caplog):
    bad_parameter = PresetFactory(desired_instances=1, parameters={"nope": "x"})
    bad_schedule = PresetFactory(desired_instances=1, scheduling_timezone="Mars/Olympus")
    bad_schedule.schedules.create(position=0, cron="* 9 * * *", instances=2)
    good = PresetFactory(desired_instances=1)

    with caplog.at_level(logging.WARNING, logger="prebuilds.reconciler"):
        reconcile()
        reconcile()

    bad_parameter.refresh_from_db()
    bad_schedule.refresh_from_db()
    assert bad_parameter.prebuild_status == PrebuildStatus.VALIDATION_FAILED
    assert "nope" in bad_parameter.prebuild_status_reason
    assert bad_schedule.prebuild_status == PrebuildStatus.VALIDATION_FAILED
    assert "Mars/Olympus" in bad_schedule.prebuild_status_reason
    assert pool(bad_parameter) == [] and pool(bad_schedule) == []
    assert len(pool(good)) == 1
    status_logs = [r for r in caplog.records if "prebuilds_preset_status" in r.getMessage()]
    assert len(status_logs) == 2  # once per preset, not once per pass


def test_a_paused_reconciler_reports_but_executes_nothing():
    preset = PresetFactory(desired_instances=2)
    reconciliation_pause(paused=True)

    result = reconcile()

    assert result.paused and result.lock_acquired and result.actions_taken == 0
    assert pass_document(result)["presets"][0]["actions"] == [
        {"type": "create", "count": 2, "reason": "below_desired"}
    ]
    assert pool(preset) == []
    assert ReconciliationPass.objects.get().paused


def test_a_dry_run_executes_and_records_nothing():
    preset = PresetFactory(desired_instances=2, parameters={"nope": "x"})
    other = PresetFactory(desired_instances=1)

    result = reconcile(dry_run=True)

    document = pass_document(result)
    assert document["lock_acquired"] is True and document["paused"] is False
    by_id = {p["preset_id"]: p for p in document["presets"]}
    assert by_id[str(other.id)]["actions"] == [
        {"type": "create", "count": 1, "reason": "below_desired"}
    ]
    assert by_id[str(preset.id)]["status"] == "validation_failed"
    preset.refresh_from_db()
    assert preset.prebuild_status == PrebuildStatus.HEALTHY  # shown, not stored
    assert not Workspace.objects.filter(owner_id=SYSTEM_USER_ID).exists()
    assert not ReconciliationPass.objects.exists()


def test_one_failing_preset_does_not_stop_the_others(monkeypatch):
    broken = PresetFactory(desired_instances=1)
    healthy = PresetFactory(desired_instances=2)
    extra = prebuild(PresetFactory(desired_instances=0))
    real_create = reconciler.workspace_create

    def workspace_create(**kwargs):
        if kwargs["preset"].id == broken.id:
            raise RuntimeError("provisioner exploded")
        return real_create(**kwargs)

    monkeypatch.setattr(reconciler, "workspace_create", workspace_create)

    result = reconcile()

    assert result.errors == 1
    assert result.error_details[0]["preset_id"] == str(broken.id)
    assert "provisioner exploded" in result.error_details[0]["error"]
    assert pool(broken) == []
    assert len(pool(healthy)) == 2
    assert delete_builds() == {extra.id}
    assert ReconciliationPass.objects.get().errors == 1


def test_it_makes_the_system_user_a_member_of_organizations_with_presets():
    organization = OrganizationFactory()
    PresetFactory(
        desired_instances=1,
        template_version=TemplateFactory(organization=organization).active_version,
    )

    reconcile()

    assert Membership.objects.filter(organization=organization, user_id=SYSTEM_USER_ID).exists()


def test_it_records_passes_and_prunes_old_ones():
    old = ReconciliationPass.objects.create(started_at=timezone.now() - timedelta(hours=25))
    recent = ReconciliationPass.objects.create(started_at=timezone.now() - timedelta(hours=23))
    preset = PresetFactory(desired_instances=3)
    prebuild(preset)
    prebuild(preset, ready=False)

    result = reconcile()

    assert not ReconciliationPass.objects.filter(id=old.id).exists()
    assert ReconciliationPass.objects.filter(id=recent.id).exists()
    row = ReconciliationPass.objects.latest()
    assert (row.lock_acquired, row.presets_seen, row.actions_taken, row.errors) == (
        True,
        1,
        1,
        0,
    )
    assert row.preset_counts == {str(preset.id): [3, 2, 1, 0]}
    assert row.duration_seconds == pytest.approx(result.duration_seconds)


def test_a_pass_that_cannot_take_the_lock_returns_at_once():
    PresetFactory(desired_instances=1)

    with reconciler.reconciliation_lock() as held:
        assert held
        result = reconcile()
        dry = reconcile(dry_run=True)

    assert not result.lock_acquired and result.presets == ()
    assert not Workspace.objects.filter(owner_id=SYSTEM_USER_ID).exists()
    assert not ReconciliationPass.objects.get().lock_acquired
    # A dry run executes nothing, so it still shows the presets, and says the lock was taken.
    assert not dry.lock_acquired and len(dry.presets) == 1


def test_it_never_deletes_a_workspace_claimed_after_the_snapshot():
    preset = PresetFactory(desired_instances=1)
    claimed = prebuild(preset)
    alice = UserFactory()
    Workspace.objects.filter(id=claimed.id).update(owner=alice, claimed_at=timezone.now())

    assert prebuild_delete(workspace_id=claimed.id, owner=system_user()) is False
    assert not WorkspaceBuild.objects.filter(workspace=claimed, transition="delete").exists()


def test_it_skips_a_prebuild_whose_build_started_after_the_snapshot():
    preset = PresetFactory(desired_instances=1)
    busy = prebuild(preset, status=JobStatus.RUNNING)

    assert prebuild_delete(workspace_id=busy.id, owner=system_user()) is False
    assert busy.builds.count() == 1


# -- unhealthy prebuilds (issue 12) -------------------------------------------------------------


def _agent_gone(workspace: Workspace, **fields) -> None:
    from workspaces.models import WorkspaceAgent

    WorkspaceAgent.objects.filter(workspace=workspace).update(**fields)


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"last_seen_at_ago": 61}, "agent_disconnected"),  # 30 s timeout + 30 s grace
        ({"lifecycle_state": "off", "lifecycle_changed_at_ago": 31}, "agent_off"),
        ({"lifecycle_state": "start_error", "lifecycle_changed_at_ago": 31}, "agent_start_error"),
    ],
)
def test_an_unhealthy_prebuild_is_counted_apart_deleted_and_replaced(settings, caplog, fields, why):
    settings.AGENT_DISCONNECT_TIMEOUT = 30
    now = timezone.now()
    preset = PresetFactory(desired_instances=2)
    healthy = prebuild(preset, created_at=now - timedelta(minutes=2))
    broken = prebuild(preset, created_at=now - timedelta(minutes=1))
    _agent_gone(
        broken,
        **{
            name.removesuffix("_ago"): now - timedelta(seconds=value)
            if name.endswith("_ago")
            else value
            for name, value in fields.items()
        },
    )
    caplog.set_level(logging.INFO, logger="prebuilds.reconciler")

    result = reconcile(now=now)

    document = pass_document(result)["presets"][0]
    assert document["state"]["actual"] == 1
    assert document["state"]["eligible"] == 1
    assert document["state"]["unhealthy"] == 1
    assert document["actions"] == [
        {"type": "delete", "workspace_ids": [str(broken.id)], "reason": "unhealthy"},
        {"type": "create", "count": 1, "reason": "below_desired"},
    ]
    assert broken.builds.order_by("-build_number").first().transition == "delete"
    assert healthy.builds.count() == 1
    assert len(pool(preset)) == 2  # the healthy one and its replacement, on its way
    assert f"unhealthy={broken.id}:{why}" in caplog.text


@pytest.mark.parametrize(
    "fields",
    [
        {"last_seen_at_ago": 45},  # disconnected, still within the grace period
        {"lifecycle_state": "off", "lifecycle_changed_at_ago": 5},
    ],
)
def test_a_prebuild_within_the_grace_period_is_not_eligible_but_not_replaced_yet(settings, fields):
    settings.AGENT_DISCONNECT_TIMEOUT = 30
    now = timezone.now()
    preset = PresetFactory(desired_instances=1)
    waiting = prebuild(preset)
    _agent_gone(
        waiting,
        **{
            name.removesuffix("_ago"): now - timedelta(seconds=value)
            if name.endswith("_ago")
            else value
            for name, value in fields.items()
        },
    )

    document = pass_document(reconcile(now=now))["presets"][0]

    state = document["state"]
    assert (state["actual"], state["eligible"], state["unhealthy"]) == (1, 0, 0)
    assert document["actions"] == []
    assert waiting.builds.count() == 1
