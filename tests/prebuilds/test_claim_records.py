"""Workspace requests claim from the pool first, and every attempt is recorded."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import IntegrityError, transaction
from django.test import override_settings
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from accounts.models import SYSTEM_USER_ID
from prebuilds.claims import miss_reason
from prebuilds.metrics import registry
from prebuilds.models import MissReason, PrebuildClaim, PrebuildsSettings, ReconciliationPass
from tests.accounts.factories import UserFactory
from tests.workspaces.factories import PresetFactory, TemplateVersionFactory, prebuild
from workspaces import jobs
from workspaces.creation import workspace_request
from workspaces.models import (
    FailureKind,
    JobStatus,
    PrebuildStatus,
    PresetSchedule,
    ProvisionerJob,
    TemplateVersionPreset,
    Workspace,
    WorkspaceAgent,
)

pytestmark = pytest.mark.django_db


def test_a_request_for_a_pooled_preset_claims_a_ready_prebuild():
    preset = PresetFactory(desired_instances=1)
    pool = prebuild(preset)
    alice = UserFactory()

    workspace = workspace_request(user=alice, name="dev", preset=preset)

    assert workspace.id == pool.id and workspace.claimed_prebuild
    record = PrebuildClaim.objects.get()
    assert (record.claimed, record.workspace_id, record.user_id) == (True, pool.id, alice.id)
    assert record.miss_reason == ""


def test_an_empty_pool_is_a_recorded_miss_and_a_cold_build():
    preset = PresetFactory(desired_instances=1)
    alice = UserFactory()

    workspace = workspace_request(user=alice, name="dev", preset=preset)

    assert not workspace.claimed_prebuild and workspace.owner == alice
    assert workspace.builds.get().is_claim is False
    record = PrebuildClaim.objects.get()
    assert (record.claimed, record.workspace_id) == (False, None)
    assert record.miss_reason == MissReason.POOL_EMPTY


def test_a_preset_without_prebuilds_never_claims():
    preset = PresetFactory(desired_instances=None)
    prebuild(preset)  # a leftover; the reconciler removes those, requests do not take them

    workspace = workspace_request(user=UserFactory(), name="dev", preset=preset)

    assert not workspace.claimed_prebuild
    # Issue 17: still a claim request, a miss because the preset keeps no pool.
    record = PrebuildClaim.objects.get()
    assert (record.claimed, record.miss_reason) == (False, MissReason.DECLARES_NONE)


def test_a_refused_request_records_nothing():
    preset = PresetFactory(desired_instances=1)
    prebuild(preset)

    with pytest.raises(Exception, match="name:"):
        workspace_request(user=UserFactory(), name="Bad Name", preset=preset)

    assert not PrebuildClaim.objects.exists()


def _report(client, agent, state):
    return client.post(
        "/api/v2/workspaceagents/me/lifecycle",
        {"state": state},
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {agent.plain_token}",
    )


def test_the_claim_is_ready_once_every_agent_reinitialised_for_the_new_owner(client):
    preset = PresetFactory(desired_instances=1)
    pool = prebuild(preset, agents=2)
    first, second = pool.created_agents
    WorkspaceAgent.objects.filter(workspace=pool).update(initialized_owner_id=SYSTEM_USER_ID)
    workspace_request(user=UserFactory(), name="dev", preset=preset)
    job_id = pool.builds.order_by("-build_number").first().job_id
    jobs.job_acquire(job_id, worker="t")
    jobs.job_complete(job_id, worker="t", succeeded=True)

    # Still initialised for the system user: a "ready" report is not the claim being ready.
    assert _report(client, first, "ready").status_code == 204
    assert PrebuildClaim.objects.get().ready_at is None

    for agent in (first, second):
        manifest = client.get(
            "/api/v2/workspaceagents/me/manifest", HTTP_AUTHORIZATION=f"Bearer {agent.plain_token}"
        )
        assert manifest.status_code == 200
        agent.refresh_from_db()
        assert agent.lifecycle_state == "starting", "not ready for the new owner yet"
        _report(client, agent, "starting")
        _report(client, agent, "ready")
        ready_at = PrebuildClaim.objects.get().ready_at
        assert (ready_at is not None) == (agent is second), "ready only when all agents are"


def test_metrics_show_misses_and_claim_durations(client):
    preset = PresetFactory(desired_instances=1)
    workspace_request(user=UserFactory(), name="dev", preset=preset)  # a miss
    prebuild(preset)
    claimed = workspace_request(user=UserFactory(), name="dev", preset=preset)
    record = PrebuildClaim.objects.get(workspace=claimed)
    PrebuildClaim.objects.filter(id=record.id).update(
        ready_at=record.requested_at + timedelta(seconds=0.4)
    )

    from prometheus_client import generate_latest

    text = generate_latest(registry).decode()
    samples = {
        (s.name, s.labels.get("le") or s.labels.get("reason")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.labels.get("preset") == preset.name
    }
    assert samples[("prebuilt_workspaces_claim_misses_total", "pool_empty")] == 1
    assert samples[("prebuilt_workspaces_claim_misses_total", "starting")] == 0
    assert samples[("prebuilt_workspace_claim_duration_seconds_count", None)] == 1
    assert samples[("prebuilt_workspace_claim_duration_seconds_bucket", "0.25")] == 0
    assert samples[("prebuilt_workspace_claim_duration_seconds_bucket", "0.5")] == 1


# ---------------------------------------------------------------------------------------------
# Miss reasons (issue 17): one test per reason, and the precedence between them.


def _miss(preset) -> str:
    workspace = workspace_request(user=UserFactory(), name="dev", preset=preset)
    assert not workspace.claimed_prebuild
    record = PrebuildClaim.objects.get(user=workspace.owner)
    assert not record.claimed
    return record.miss_reason


def _failed_prebuild(preset, *, kind=FailureKind.TEMPLATE, ago=timedelta(seconds=1)):
    failed = prebuild(preset, status=JobStatus.FAILED)
    ProvisionerJob.objects.filter(build__workspace=failed).update(
        failure_kind=kind, completed_at=timezone.now() - ago
    )
    return failed


def test_miss_pool_empty():
    assert _miss(PresetFactory(desired_instances=2)) == MissReason.POOL_EMPTY


def test_miss_reconciliation_paused():
    preset = PresetFactory(desired_instances=1)
    PrebuildsSettings.objects.create(reconciliation_paused=True)
    assert _miss(preset) == MissReason.PAUSED


def test_miss_hard_limited():
    preset = PresetFactory(desired_instances=1, prebuild_status=PrebuildStatus.HARD_LIMITED)
    assert _miss(preset) == MissReason.HARD_LIMITED


def test_miss_validation_failed():
    preset = PresetFactory(desired_instances=1, prebuild_status=PrebuildStatus.VALIDATION_FAILED)
    assert _miss(preset) == MissReason.VALIDATION_FAILED


def test_miss_declares_none_when_the_latest_pass_wanted_none():
    preset = PresetFactory(desired_instances=3)  # a schedule says 0 now, say
    ReconciliationPass.objects.create(preset_counts={str(preset.id): [0, 0, 0, 0]})
    assert _miss(preset) == MissReason.DECLARES_NONE


def test_miss_declares_none_for_zero_instances_before_any_pass():
    assert _miss(PresetFactory(desired_instances=0)) == MissReason.DECLARES_NONE


def test_zero_instances_with_a_schedule_is_not_declares_none_before_a_pass():
    preset = PresetFactory(desired_instances=0)
    PresetSchedule.objects.create(preset=preset, cron="* * * * *", instances=2)
    assert _miss(preset) == MissReason.POOL_EMPTY


def test_miss_backing_off_after_a_recent_template_failure():
    preset = PresetFactory(desired_instances=1)
    _failed_prebuild(preset)
    assert _miss(preset) == MissReason.BACKING_OFF


@override_settings(PREBUILDS_BACKOFF_INTERVAL=timedelta(seconds=10))
def test_no_backing_off_once_the_backoff_ended_or_for_infrastructure_failures():
    preset = PresetFactory(desired_instances=1)
    _failed_prebuild(preset, ago=timedelta(seconds=30))  # 1 failure: 10 s, long over
    _failed_prebuild(preset, kind=FailureKind.INFRASTRUCTURE)  # says nothing of the template
    assert _miss(preset) == MissReason.POOL_EMPTY


def test_miss_starting_while_a_prebuild_builds():
    preset = PresetFactory(desired_instances=1)
    prebuild(preset, status=JobStatus.RUNNING)
    assert _miss(preset) == MissReason.STARTING


def test_miss_starting_while_its_agents_come_up():
    preset = PresetFactory(desired_instances=1)
    prebuild(preset, ready=False)
    assert _miss(preset) == MissReason.STARTING


def test_miss_only_expired_prebuilds_left():
    preset = PresetFactory(desired_instances=1, invalidate_after=timedelta(minutes=5))
    prebuild(preset, created_at=timezone.now() - timedelta(hours=1))
    assert _miss(preset) == MissReason.EXPIRED_OR_UNHEALTHY


def test_miss_only_unhealthy_prebuilds_left():
    preset = PresetFactory(desired_instances=1)
    gone = prebuild(preset)
    WorkspaceAgent.objects.filter(workspace=gone).update(
        lifecycle_state="off", lifecycle_changed_at=timezone.now() - timedelta(hours=1)
    )
    assert _miss(preset) == MissReason.EXPIRED_OR_UNHEALTHY


def test_an_expired_prebuild_with_starting_agents_is_expired_not_starting():
    preset = PresetFactory(desired_instances=1, invalidate_after=timedelta(minutes=5))
    prebuild(preset, ready=False, created_at=timezone.now() - timedelta(hours=1))
    assert _miss(preset) == MissReason.EXPIRED_OR_UNHEALTHY


def test_precedence_of_the_reasons():
    """paused > hard_limited > validation_failed > declares_none > backing_off > starting >
    expired_or_unhealthy > pool_empty: each step removes the cause that won the last one."""
    preset = PresetFactory(
        desired_instances=1,
        prebuild_status=PrebuildStatus.HARD_LIMITED,
        invalidate_after=timedelta(minutes=5),
    )
    prebuild(preset, created_at=timezone.now() - timedelta(hours=1))  # expired
    building = prebuild(preset, status=JobStatus.RUNNING)  # starting
    _failed_prebuild(preset)  # backing off
    zero = ReconciliationPass.objects.create(preset_counts={str(preset.id): [0, 0, 0, 0]})
    PrebuildsSettings.objects.create(reconciliation_paused=True)

    seen = [_miss(preset)]
    PrebuildsSettings.objects.update(reconciliation_paused=False)
    seen.append(_miss(preset))
    TemplateVersionPreset.objects.filter(id=preset.id).update(
        prebuild_status=PrebuildStatus.VALIDATION_FAILED
    )
    preset.refresh_from_db()
    seen.append(_miss(preset))
    TemplateVersionPreset.objects.filter(id=preset.id).update(prebuild_status="healthy")
    preset.refresh_from_db()
    seen.append(_miss(preset))
    zero.delete()
    seen.append(_miss(preset))
    ProvisionerJob.objects.filter(status=JobStatus.FAILED).update(
        completed_at=timezone.now() - timedelta(days=1)
    )
    seen.append(_miss(preset))
    building.deleted = True
    building.save(update_fields=["deleted"])
    seen.append(_miss(preset))
    Workspace.objects.filter(owner_id=SYSTEM_USER_ID).update(deleted=True)
    seen.append(_miss(preset))

    assert seen == [
        "reconciliation_paused",
        "hard_limited",
        "validation_failed",
        "declares_none",
        "backing_off",
        "starting",
        "expired_or_unhealthy",
        "pool_empty",
    ]


def test_the_reason_costs_one_statement_and_only_on_a_miss(django_assert_num_queries):
    preset = PresetFactory(desired_instances=1)
    preset = TemplateVersionPreset.objects.select_related("template_version__template").get(
        id=preset.id
    )
    with django_assert_num_queries(1):
        assert miss_reason(preset) == MissReason.POOL_EMPTY


def test_a_claim_with_a_miss_reason_is_refused_by_the_database():
    preset = PresetFactory(desired_instances=1)
    with pytest.raises(IntegrityError), transaction.atomic():
        PrebuildClaim.objects.create(
            preset=preset, user=UserFactory(), claimed=True, miss_reason="pool_empty"
        )
    with pytest.raises(IntegrityError), transaction.atomic():
        PrebuildClaim.objects.create(preset=preset, user=UserFactory(), claimed=False)


def test_metrics_count_misses_by_reason_summed_over_versions():
    preset = PresetFactory(desired_instances=1)
    old = TemplateVersionFactory(template=preset.template_version.template)
    twin = PresetFactory(template_version=old, name=preset.name)  # same names, another version
    workspace_request(user=UserFactory(), name="a", preset=preset)  # pool_empty
    PrebuildsSettings.objects.create(reconciliation_paused=True)
    workspace_request(user=UserFactory(), name="b", preset=preset)  # paused
    PrebuildClaim.objects.create(
        preset=twin, user=UserFactory(), claimed=False, miss_reason="reconciliation_paused"
    )
    other = PresetFactory(desired_instances=None)
    workspace_request(user=UserFactory(), name="c", preset=other)  # declares_none

    from prometheus_client import generate_latest

    text = generate_latest(registry).decode()
    misses = {
        (s.labels["preset"], s.labels["reason"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "prebuilt_workspaces_claim_misses_total"
    }
    zeros = {
        (name, reason): 0
        for name in (preset.name, other.name)
        for reason in MissReason.values
        if reason != "unknown"
    }
    assert misses == {
        **zeros,
        (preset.name, "pool_empty"): 1,
        (preset.name, "reconciliation_paused"): 2,
        (other.name, "declares_none"): 1,
    }
