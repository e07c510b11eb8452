"""Workspace requests claim from the pool first, and every attempt is recorded."""

from __future__ import annotations

from datetime import timedelta

import pytest
from prometheus_client.parser import text_string_to_metric_families

from accounts.models import SYSTEM_USER_ID
from prebuilds.metrics import registry
from prebuilds.models import PrebuildClaim
from tests.accounts.factories import UserFactory
from tests.workspaces.factories import PresetFactory, prebuild
from workspaces import jobs
from workspaces.creation import workspace_request
from workspaces.models import WorkspaceAgent

pytestmark = pytest.mark.django_db


def test_a_request_for_a_pooled_preset_claims_a_ready_prebuild():
    preset = PresetFactory(desired_instances=1)
    pool = prebuild(preset)
    alice = UserFactory()

    workspace = workspace_request(user=alice, name="dev", preset=preset)

    assert workspace.id == pool.id and workspace.claimed_prebuild
    record = PrebuildClaim.objects.get()
    assert (record.claimed, record.workspace_id, record.user_id) == (True, pool.id, alice.id)


def test_an_empty_pool_is_a_recorded_miss_and_a_cold_build():
    preset = PresetFactory(desired_instances=1)
    alice = UserFactory()

    workspace = workspace_request(user=alice, name="dev", preset=preset)

    assert not workspace.claimed_prebuild and workspace.owner == alice
    assert workspace.builds.get().is_claim is False
    record = PrebuildClaim.objects.get()
    assert (record.claimed, record.workspace_id) == (False, None)


def test_a_preset_without_prebuilds_never_claims():
    preset = PresetFactory(desired_instances=None)
    prebuild(preset)  # a leftover; the reconciler removes those, requests do not take them

    workspace = workspace_request(user=UserFactory(), name="dev", preset=preset)

    assert not workspace.claimed_prebuild
    assert not PrebuildClaim.objects.exists()


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
        (s.name, s.labels.get("le")): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.labels.get("preset") == preset.name
    }
    assert samples[("prebuilt_workspaces_claim_misses_total", None)] == 1
    assert samples[("prebuilt_workspace_claim_duration_seconds_count", None)] == 1
    assert samples[("prebuilt_workspace_claim_duration_seconds_bucket", "0.25")] == 0
    assert samples[("prebuilt_workspace_claim_duration_seconds_bucket", "0.5")] == 1
