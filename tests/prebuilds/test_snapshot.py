from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import pytest
from django.utils import timezone

from accounts.models import SYSTEM_USER_ID
from prebuilds.selectors import LastFailure, reconciliation_snapshot
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
from workspaces.models import (
    AgentLifecycle,
    FailureKind,
    JobStatus,
    PrebuildStatus,
    ProvisionerJob,
    TemplateVersionPreset,
    Workspace,
)

pytestmark = pytest.mark.django_db


def entry_of(preset: TemplateVersionPreset):
    entries = {entry.id: entry for entry in reconciliation_snapshot().presets}
    return entries.get(preset.id)


def fail_build(workspace: Workspace, completed_at) -> None:
    """Make the workspace's latest build's job a failure that completed at ``completed_at``."""
    build = workspace.builds.order_by("-build_number").first()
    ProvisionerJob.objects.filter(id=build.job_id).update(
        status=JobStatus.FAILED, completed_at=completed_at
    )


def test_it_derives_running_ready_and_in_progress_from_latest_builds():
    preset = PresetFactory(desired_instances=5)
    ready = prebuild(preset)
    not_ready = prebuild(preset, ready=False)
    no_agents = prebuild(preset, agents=0)
    half_ready = prebuild(preset, agents=2)
    AgentFactory(
        build=half_ready.builds.get(),
        name="late",
        lifecycle_state=AgentLifecycle.STARTING,
    )
    # A retired agent that is not ready does not count against a fresh, ready one.
    retired_ok = prebuild(preset)
    AgentFactory(
        build=retired_ok.builds.get(),
        name="old",
        lifecycle_state=AgentLifecycle.OFF,
        retired_at=timezone.now(),
    )
    pending = prebuild(preset, status=JobStatus.PENDING)
    prebuild(preset, status=JobStatus.RUNNING)
    prebuild(preset, status=JobStatus.CANCELING)
    prebuild(preset, transition="stop", status=JobStatus.RUNNING)
    prebuild(preset, transition="delete", status=JobStatus.PENDING)
    prebuild(preset, status=JobStatus.FAILED)
    prebuild(preset, status=JobStatus.CANCELED)
    prebuild(preset, transition="stop")  # stopped: neither running nor in progress
    gone = prebuild(preset)
    Workspace.objects.filter(id=gone.id).update(deleted=True)
    user_workspace = WorkspaceFactory(template=preset.template_version.template)
    BuildFactory(workspace=user_workspace, preset=preset)

    entry = entry_of(preset)

    running = {info.id: info.ready for info in entry.snapshot.running}
    assert running == {
        ready.id: True,
        not_ready.id: False,
        no_agents.id: False,
        half_ready.id: False,
        retired_ok.id: True,
    }
    snapshot = entry.snapshot
    assert (snapshot.starting, snapshot.stopping, snapshot.deleting) == (3, 1, 1)
    assert snapshot.pending_count == 1
    assert entry.pending_job_ids == (pending.builds.get().job_id,)
    assert snapshot.active is True
    assert snapshot.desired_instances == 5


def test_it_attributes_a_prebuild_to_its_latest_builds_preset():
    version = TemplateFactory().active_version
    first = PresetFactory(template_version=version, desired_instances=1)
    second = PresetFactory(template_version=version, desired_instances=1)
    workspace = prebuild(first)
    BuildFactory(
        workspace=workspace,
        preset=second,
        initiator=workspace.owner,
        template_version=version,
    )

    assert [info.id for info in entry_of(second).snapshot.running] == [workspace.id]
    assert entry_of(first).snapshot.running == ()


def test_it_reads_created_at_names_and_settings():
    created = timezone.now() - timedelta(hours=3)
    preset = PresetFactory(
        desired_instances=2,
        invalidate_after=timedelta(hours=1),
        scheduling_timezone="Europe/Paris",
        parameters={"repo": "r"},
    )
    preset.schedules.create(position=0, cron="* 9-17 * * 1-5", instances=4)
    workspace = prebuild(preset, created_at=created)

    entry = entry_of(preset)

    assert entry.snapshot.running[0].created_at == created
    assert entry.snapshot.ttl == timedelta(hours=1)
    assert entry.snapshot.timezone == "Europe/Paris"
    assert [(s.cron, s.instances) for s in entry.snapshot.schedules] == [("* 9-17 * * 1-5", 4)]
    template = preset.template_version.template
    assert (entry.name, entry.template, entry.template_version, entry.organization) == (
        preset.name,
        template.name,
        preset.template_version.name,
        template.organization.name,
    )
    assert entry.parameters == {"repo": "r"}
    assert entry.version_parameter_names == {"repo"}
    assert workspace.owner_id == SYSTEM_USER_ID


def test_it_lists_presets_with_prebuilds_or_running_prebuilds_only():
    declared = PresetFactory(desired_instances=0)
    PresetFactory(desired_instances=None)  # no prebuilds declared, none exist
    undeclared_with_prebuild = PresetFactory(desired_instances=None)
    prebuild(undeclared_with_prebuild)

    old = PresetFactory(desired_instances=2)
    template = old.template_version.template
    old_pending = PresetFactory(
        template_version=old.template_version, desired_instances=2, name="pending-only"
    )
    PresetFactory(template_version=old.template_version, desired_instances=2, name="empty")
    prebuild(old)
    prebuild(old_pending, status=JobStatus.PENDING)
    new_version = TemplateVersionFactory(template=template)
    template.active_version = new_version
    template.save()

    deprecated = PresetFactory(desired_instances=1)
    deprecated.template_version.template.__class__.objects.filter(
        id=deprecated.template_version.template_id
    ).update(deprecated=True)

    entries = {entry.id: entry for entry in reconciliation_snapshot().presets}

    assert set(entries) == {declared.id, undeclared_with_prebuild.id, old.id, old_pending.id}
    assert entries[declared.id].active
    assert entries[undeclared_with_prebuild.id].active
    assert not entries[old.id].active
    assert entries[old_pending.id].snapshot.pending_count == 1


def test_it_counts_recent_failed_prebuild_builds_for_backoff():
    now = timezone.now()
    preset = PresetFactory(desired_instances=1)
    for minutes in (5, 20):
        fail_build(prebuild(preset, status=JobStatus.FAILED), now - timedelta(minutes=minutes))
    fail_build(prebuild(preset, status=JobStatus.FAILED), now - timedelta(hours=2))  # too old
    # A failed build of a user's workspace of the same preset is not a prebuild failure.
    user_workspace = WorkspaceFactory(template=preset.template_version.template)
    BuildFactory(workspace=user_workspace, preset=preset, job__status=JobStatus.FAILED)

    backoff = reconciliation_snapshot(now=now).presets[0].snapshot.backoff

    assert backoff.num_failed == 2
    assert backoff.last_build_at == now - timedelta(minutes=5)


def test_it_has_no_backoff_without_recent_failures():
    preset = PresetFactory(desired_instances=1)
    prebuild(preset)

    assert entry_of(preset).snapshot.backoff is None


def test_it_sees_a_failure_streak_at_the_hard_limit(settings):
    settings.PREBUILDS_FAILURE_HARD_LIMIT = 3
    start = timezone.now() - timedelta(minutes=30)
    preset = PresetFactory(desired_instances=1)
    prebuild(preset, created_at=start)  # an older success does not break the newest three
    for minute in (1, 2, 3):
        prebuild(preset, status=JobStatus.FAILED, created_at=start + timedelta(minutes=minute))

    entry = entry_of(preset)

    assert entry.failure_streak
    assert not entry.snapshot.hard_limited  # stored status is still healthy


def test_it_sees_no_streak_when_a_newer_build_succeeded_or_is_pending(settings):
    settings.PREBUILDS_FAILURE_HARD_LIMIT = 3
    start = timezone.now() - timedelta(minutes=30)
    succeeded, pending = PresetFactory(desired_instances=1), PresetFactory(desired_instances=1)
    for preset, last in ((succeeded, JobStatus.SUCCEEDED), (pending, JobStatus.PENDING)):
        for minute in (1, 2, 3):
            prebuild(preset, status=JobStatus.FAILED, created_at=start + timedelta(minutes=minute))
        prebuild(preset, status=last, created_at=start + timedelta(minutes=4))

    assert not entry_of(succeeded).failure_streak
    assert not entry_of(pending).failure_streak


def test_it_sees_no_streak_below_the_limit_or_when_disabled(settings):
    settings.PREBUILDS_FAILURE_HARD_LIMIT = 3
    preset = PresetFactory(desired_instances=1)
    for _ in range(2):
        prebuild(preset, status=JobStatus.FAILED)
    assert not entry_of(preset).failure_streak

    prebuild(preset, status=JobStatus.FAILED)
    assert entry_of(preset).failure_streak
    settings.PREBUILDS_FAILURE_HARD_LIMIT = 0
    assert not entry_of(preset).failure_streak


def test_it_only_counts_failures_after_the_last_status_change(settings):
    settings.PREBUILDS_FAILURE_HARD_LIMIT = 2
    start = timezone.now() - timedelta(minutes=30)
    preset = PresetFactory(desired_instances=1)
    for minute in (1, 2):
        prebuild(preset, status=JobStatus.FAILED, created_at=start + timedelta(minutes=minute))
    TemplateVersionPreset.objects.filter(id=preset.id).update(
        prebuild_status=PrebuildStatus.HEALTHY,
        prebuild_status_changed_at=start + timedelta(minutes=3),  # an operator reset
    )
    assert not entry_of(preset).failure_streak

    prebuild(preset, status=JobStatus.FAILED, created_at=start + timedelta(minutes=4))
    assert not entry_of(preset).failure_streak
    prebuild(preset, status=JobStatus.FAILED, created_at=start + timedelta(minutes=5))
    assert entry_of(preset).failure_streak


def fail_as(workspace: Workspace, kind: str, completed_at, error: str = "boom") -> None:
    """Make the workspace's latest build's job a failure of ``kind``."""
    build = workspace.builds.order_by("-build_number").first()
    ProvisionerJob.objects.filter(id=build.job_id).update(
        status=JobStatus.FAILED, failure_kind=kind, error=error, completed_at=completed_at
    )


def test_infrastructure_failures_do_not_count_towards_backoff():
    now = timezone.now()
    preset = PresetFactory(desired_instances=1)
    for minutes in (30, 20):
        fail_as(prebuild(preset), FailureKind.TEMPLATE, now - timedelta(minutes=minutes))
    for minutes in (3, 2, 1):  # the newest failures: three lost workers
        fail_as(
            prebuild(preset),
            FailureKind.INFRASTRUCTURE,
            now - timedelta(minutes=minutes),
            error="Worker lost (heartbeat timeout).",
        )

    entry = reconciliation_snapshot(now=now).presets[0]

    assert entry.snapshot.backoff.num_failed == 2
    assert entry.snapshot.backoff.last_build_at == now - timedelta(minutes=20)
    assert (entry.failures.template, entry.failures.infrastructure) == (2, 3)
    assert entry.failures.last == LastFailure(
        kind="infrastructure",
        error="Worker lost (heartbeat timeout).",
        at=now - timedelta(minutes=1),
    )


def test_only_infrastructure_failures_mean_no_backoff_but_a_last_failure():
    now = timezone.now()
    preset = PresetFactory(desired_instances=1)
    for minutes in (3, 2, 1):
        fail_as(prebuild(preset), FailureKind.INFRASTRUCTURE, now - timedelta(minutes=minutes))

    entry = entry_of(preset)

    assert entry.snapshot.backoff is None
    assert (entry.failures.template, entry.failures.infrastructure) == (0, 3)
    assert entry.failures.last.kind == "infrastructure"


def test_a_failure_without_a_kind_counts_as_a_template_failure():
    # Jobs failed by code that does not set the kind (or before it existed): conservative.
    now = timezone.now()
    preset = PresetFactory(desired_instances=1)
    fail_as(prebuild(preset), "", now - timedelta(minutes=1))

    entry = reconciliation_snapshot(now=now).presets[0]

    assert entry.snapshot.backoff.num_failed == 1
    assert entry.failures.last.kind == "template"


def test_infrastructure_failures_neither_make_nor_break_a_failure_streak(settings):
    settings.PREBUILDS_FAILURE_HARD_LIMIT = 3
    start = timezone.now() - timedelta(minutes=30)
    lost, mixed = PresetFactory(desired_instances=1), PresetFactory(desired_instances=1)
    for minute in (1, 2, 3):
        fail_as(
            prebuild(lost, created_at=start + timedelta(minutes=minute)),
            FailureKind.INFRASTRUCTURE,
            start + timedelta(minutes=minute),
        )
    # template, lost, template, lost, template: the newest three *template* builds all failed.
    for minute, kind in enumerate(
        ["template", "infrastructure", "template", "infrastructure", "template"], start=1
    ):
        fail_as(
            prebuild(mixed, created_at=start + timedelta(minutes=minute)),
            kind,
            start + timedelta(minutes=minute),
        )

    assert not entry_of(lost).failure_streak
    assert entry_of(mixed).failure_streak


def test_it_reads_the_stored_hard_limit():
    preset = PresetFactory(desired_instances=1, prebuild_status=PrebuildStatus.HARD_LIMITED)

    assert entry_of(preset).snapshot.hard_limited


def _populate(count: int) -> None:
    owner = UserFactory()
    for index in range(count):
        preset = PresetFactory(desired_instances=2)
        preset.schedules.create(position=0, cron="* 9-17 * * 1-5", instances=3)
        prebuild(preset)
        prebuild(preset, status=JobStatus.FAILED)
        prebuild(preset, status=JobStatus.PENDING)
        if index % 2:
            claimed = prebuild(preset)
            Workspace.objects.filter(id=claimed.id).update(owner=owner, claimed_at=timezone.now())


@pytest.mark.parametrize("presets", [1, 200])
def test_it_reads_the_snapshot_in_a_fixed_number_of_queries(presets, django_assert_max_num_queries):
    _populate(presets)

    with django_assert_max_num_queries(5):
        snapshot = reconciliation_snapshot()

    assert len(snapshot.presets) == presets
    assert all(len(entry.snapshot.running) == 1 for entry in snapshot.presets)
    assert all(entry.snapshot.backoff.num_failed == 1 for entry in snapshot.presets)


# -- a snapshot of some presets only (a pool's page) ----------------------------------------


def _normalized(entry):
    """The entry with its order-free parts sorted (rows come in no particular order)."""
    snapshot = replace(entry.snapshot, running=tuple(sorted(entry.snapshot.running, key=str)))
    return replace(entry, snapshot=snapshot, pending_job_ids=tuple(sorted(entry.pending_job_ids)))


def test_a_snapshot_of_one_preset_holds_the_entry_the_whole_snapshot_holds():
    _populate(3)
    version = TemplateFactory().active_version
    busy = PresetFactory(template_version=version, desired_instances=4)
    prebuild(busy)
    prebuild(busy, ready=False)
    prebuild(busy, status=JobStatus.PENDING)
    prebuild(busy, transition="delete", status=JobStatus.RUNNING)
    fail_build(prebuild(busy), timezone.now())
    moved = PresetFactory(template_version=version, desired_instances=1, name="moved")
    workspace = prebuild(busy)  # its latest build is `moved`'s: it counts there only
    BuildFactory(
        workspace=workspace, preset=moved, initiator=workspace.owner, template_version=version
    )
    declared = PresetFactory(desired_instances=0)
    undeclared = PresetFactory(desired_instances=None)
    whole = {entry.id: _normalized(entry) for entry in reconciliation_snapshot().presets}

    for preset in (busy, moved, declared, undeclared):
        alone = reconciliation_snapshot(preset_ids=[preset.id]).presets
        expected = [whole[preset.id]] if preset.id in whole else []
        assert [_normalized(entry) for entry in alone] == expected, preset.name
    assert len(whole[busy.id].snapshot.running) == 2
    assert [info.id for info in whole[moved.id].snapshot.running] == [workspace.id]


@pytest.mark.parametrize("presets", [1, 200])
def test_it_reads_one_presets_snapshot_in_a_fixed_number_of_queries(
    presets, django_assert_max_num_queries
):
    _populate(presets)
    preset = TemplateVersionPreset.objects.order_by("id").first()

    with django_assert_max_num_queries(6):
        snapshot = reconciliation_snapshot(preset_ids=[preset.id])

    assert [entry.id for entry in snapshot.presets] == [preset.id]
    assert len(snapshot.presets[0].snapshot.running) == 1
