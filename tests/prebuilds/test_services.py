from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from prebuilds.models import PrebuildsSettings
from prebuilds.reconciler import reconcile
from prebuilds.selectors import reconciliation_paused
from prebuilds.services import (
    PrebuildsError,
    preset_cancel_pending,
    preset_invalidate,
    preset_reset,
    preset_set_desired_instances,
    reconciliation_pause,
    reconciliation_run_now,
)
from tests.workspaces.factories import BuildFactory, PresetFactory, WorkspaceFactory, prebuild
from workspaces.models import JobStatus, PrebuildStatus, TemplateVersionPreset, WorkspaceBuild

pytestmark = pytest.mark.django_db


def test_it_pauses_and_resumes_the_reconciler():
    assert not PrebuildsSettings.objects.exists()
    assert not reconciliation_paused()

    reconciliation_pause(paused=True)
    assert reconciliation_paused()
    reconciliation_pause(paused=False)
    assert not reconciliation_paused()
    assert PrebuildsSettings.objects.count() == 1


@pytest.mark.parametrize("value", [1, "true", None])
def test_it_refuses_a_non_bool_pause(value):
    with pytest.raises(PrebuildsError, match="^paused: "):
        reconciliation_pause(paused=value)
    assert not PrebuildsSettings.objects.exists()


def test_invalidating_a_preset_makes_the_next_pass_replace_its_prebuilds():
    preset = PresetFactory(desired_instances=1)
    old = prebuild(preset, created_at=timezone.now() - timedelta(minutes=1))

    preset_invalidate(preset=preset)

    preset.refresh_from_db()
    assert preset.last_invalidated_at > old.created_at
    reconcile()
    assert old.builds.order_by("-build_number").first().transition == "delete"
    assert WorkspaceBuild.objects.filter(transition="start", job__status="pending").count() == 1


def test_resetting_a_hard_limited_preset_gives_it_a_fresh_streak(settings):
    settings.PREBUILDS_FAILURE_HARD_LIMIT = 2
    settings.PREBUILDS_BACKOFF_INTERVAL = timedelta(0)
    preset = PresetFactory(desired_instances=1)
    for _ in range(2):
        prebuild(preset, status=JobStatus.FAILED, created_at=timezone.now() - timedelta(minutes=5))
    reconcile()
    preset.refresh_from_db()
    assert preset.prebuild_status == PrebuildStatus.HARD_LIMITED

    assert preset_reset(preset=preset) is True

    stored = TemplateVersionPreset.objects.get(id=preset.id)
    assert (stored.prebuild_status, stored.prebuild_status_reason) == ("healthy", "")
    assert stored.prebuild_status_changed_at is not None
    result = reconcile()
    assert result.actions_taken == 1  # it tries again instead of being re-limited at once
    stored.refresh_from_db()
    assert stored.prebuild_status == PrebuildStatus.HEALTHY


def test_resetting_clears_a_validation_failure_and_a_healthy_preset_is_left_alone():
    failed = PresetFactory(
        prebuild_status=PrebuildStatus.VALIDATION_FAILED, prebuild_status_reason="bad"
    )
    healthy = PresetFactory()

    assert preset_reset(preset=failed) is True
    assert preset_reset(preset=healthy) is False
    assert TemplateVersionPreset.objects.get(id=failed.id).prebuild_status == "healthy"
    assert TemplateVersionPreset.objects.get(id=healthy.id).prebuild_status_changed_at is None


def test_it_cancels_only_pending_prebuild_start_builds():
    preset = PresetFactory(desired_instances=3)
    pending = [prebuild(preset, status=JobStatus.PENDING) for _ in range(2)]
    running = prebuild(preset, status=JobStatus.RUNNING)
    deleting = prebuild(preset, transition="delete", status=JobStatus.PENDING)
    users_build = BuildFactory(
        workspace=WorkspaceFactory(template=preset.template_version.template),
        preset=preset,
        job__status=JobStatus.PENDING,
    )

    assert preset_cancel_pending(preset=preset) == 2

    for workspace in pending:
        assert workspace.builds.get().job.status == JobStatus.CANCELED
    assert running.builds.get().job.status == JobStatus.RUNNING
    assert deleting.builds.get().job.status == JobStatus.PENDING
    users_build.job.refresh_from_db()
    assert users_build.job.status == JobStatus.PENDING


@pytest.mark.parametrize("instances", [0, 7, None])
def test_it_sets_the_desired_instances(instances):
    preset = PresetFactory(desired_instances=2)

    preset_set_desired_instances(preset=preset, instances=instances)

    assert TemplateVersionPreset.objects.get(id=preset.id).desired_instances == instances


@pytest.mark.parametrize("instances", [-1, "3", True, 1.5])
def test_it_refuses_bad_desired_instances(instances):
    preset = PresetFactory(desired_instances=2)

    with pytest.raises(PrebuildsError, match="^instances: "):
        preset_set_desired_instances(preset=preset, instances=instances)
    assert TemplateVersionPreset.objects.get(id=preset.id).desired_instances == 2


@pytest.mark.parametrize(
    "service",
    [preset_invalidate, preset_reset, preset_cancel_pending],
)
def test_preset_services_refuse_something_that_is_not_a_preset(service):
    with pytest.raises(PrebuildsError, match="^preset: "):
        service(preset=None)


def test_run_now_runs_a_real_pass():
    PresetFactory(desired_instances=2)

    result = reconciliation_run_now()

    assert result.lock_acquired and result.actions_taken == 2
