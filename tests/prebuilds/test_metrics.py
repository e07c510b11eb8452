from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from prebuilds.metrics import registry
from prebuilds.models import ReconciliationPass
from prebuilds.reconciler import reconcile
from prebuilds.services import reconciliation_pause
from tests.accounts.factories import UserFactory
from tests.workspaces.factories import PresetFactory, TemplateFactory, prebuild
from workspaces.models import JobStatus, PrebuildStatus, Workspace, WorkspaceAgent

pytestmark = pytest.mark.django_db

SAMPLE = re.compile(r"^(?P<name>[a-z_]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Parse the text exposition into {(name, labels): value}."""
    result = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = SAMPLE.match(line)
        assert match, line
        labels = frozenset(re.findall(r'(\w+)="([^"]*)"', match["labels"] or ""))
        result[(match["name"], labels)] = float(match["value"])
    return result


def labels(preset) -> frozenset:
    template = preset.template_version.template
    return frozenset(
        {
            ("organization", template.organization.name),
            ("template", template.name),
            ("preset", preset.name),
        }
    )


@pytest.fixture
def staff_client(client: Client) -> Client:
    client.force_login(UserFactory(is_staff=True))
    return client


def test_it_exposes_pool_and_history_metrics(staff_client):
    template = TemplateFactory(name="python-dev")
    preset = PresetFactory(template_version=template.active_version, desired_instances=4)
    prebuild(preset)
    prebuild(preset)
    prebuild(preset, ready=False)
    prebuild(preset, status=JobStatus.FAILED)
    gone = prebuild(preset)  # its agent not heard from for an hour: unhealthy
    WorkspaceAgent.objects.filter(workspace=gone).update(
        last_seen_at=timezone.now() - timedelta(hours=1)
    )
    claimed = prebuild(preset)
    Workspace.objects.filter(id=claimed.id).update(
        owner=UserFactory(), name="mine", claimed_at=timezone.now()
    )
    limited = PresetFactory(desired_instances=1, prebuild_status=PrebuildStatus.HARD_LIMITED)
    reconciliation_pause(paused=True)  # a paused pass still records the pool's figures
    reconcile()

    response = staff_client.get("/metrics")

    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    text = response.content.decode()
    values = samples(text)
    mine = labels(preset)
    assert values[("prebuilt_workspaces_created_total", mine)] == 6
    assert values[("prebuilt_workspaces_failed_total", mine)] == 1
    assert values[("prebuilt_workspaces_claimed_total", mine)] == 1
    assert values[("prebuilt_workspaces_desired", mine)] == 4
    assert values[("prebuilt_workspaces_running", mine)] == 3
    assert values[("prebuilt_workspaces_eligible", mine)] == 2
    assert values[("prebuilt_workspaces_unhealthy", mine)] == 1
    assert values[("prebuilt_workspaces_preset_hard_limited", mine)] == 0
    assert values[("prebuilt_workspaces_preset_hard_limited", labels(limited))] == 1
    assert values[("prebuilds_reconciliation_paused", frozenset())] == 1
    assert "# TYPE prebuilds_reconciliation_duration_seconds histogram" in text
    assert values[("prebuilds_reconciliation_duration_seconds_gcount", frozenset())] == 1


def test_the_duration_histogram_counts_recent_passes_that_held_the_lock(staff_client):
    now = timezone.now()
    for seconds in (0.02, 0.3, 4.0):
        ReconciliationPass.objects.create(started_at=now, duration_seconds=seconds)
    ReconciliationPass.objects.create(started_at=now, duration_seconds=9, lock_acquired=False)
    ReconciliationPass.objects.create(started_at=now - timedelta(hours=2), duration_seconds=1)

    values = samples(staff_client.get("/metrics").content.decode())

    def bucket(le: str) -> float:
        key = ("prebuilds_reconciliation_duration_seconds_bucket", frozenset({("le", le)}))
        return values[key]

    assert (bucket("0.025"), bucket("0.5"), bucket("5.0"), bucket("+Inf")) == (1, 2, 3, 3)
    assert values[("prebuilds_reconciliation_duration_seconds_gsum", frozenset())] == (
        pytest.approx(4.32)
    )
    assert values[("prebuilds_reconciliation_paused", frozenset())] == 0


def test_the_last_pass_timestamp_is_the_newest_pass_that_held_the_lock(staff_client):
    key = ("prebuilds_reconciliation_last_pass_timestamp_seconds", frozenset())
    assert samples(staff_client.get("/metrics").content.decode())[key] == 0  # none yet: alert

    now = timezone.now()
    ReconciliationPass.objects.create(started_at=now - timedelta(hours=3), duration_seconds=1)
    newest = ReconciliationPass.objects.create(
        started_at=now - timedelta(minutes=2), duration_seconds=1
    )
    ReconciliationPass.objects.create(started_at=now, duration_seconds=0, lock_acquired=False)

    values = samples(staff_client.get("/metrics").content.decode())
    assert values[key] == pytest.approx(newest.started_at.timestamp())


def test_it_collects_in_a_fixed_number_of_queries(django_assert_max_num_queries):
    for _ in range(30):
        preset = PresetFactory(desired_instances=1)
        prebuild(preset)
        prebuild(preset, status=JobStatus.FAILED)
    reconcile()

    with django_assert_max_num_queries(7):
        list(registry.collect())


def test_it_refuses_anonymous_scrapes(client):
    response = client.get("/metrics")

    assert response.status_code == 401
    assert "prebuilt" not in response.content.decode()


def test_it_refuses_non_staff_sessions(client):
    client.force_login(UserFactory())

    assert client.get("/metrics").status_code == 403


def test_it_accepts_the_metrics_token(client, monkeypatch):
    monkeypatch.setenv("METRICS_TOKEN", "s3cret-token")

    ok = client.get("/metrics", headers={"Authorization": "Bearer s3cret-token"})
    wrong = client.get("/metrics", headers={"Authorization": "Bearer nope"})

    assert ok.status_code == 200 and b"prebuilds_reconciliation_paused" in ok.content
    assert wrong.status_code == 401


def test_a_bearer_token_is_refused_when_no_metrics_token_is_set(client, monkeypatch):
    monkeypatch.delenv("METRICS_TOKEN", raising=False)

    response = client.get("/metrics", headers={"Authorization": "Bearer "})
    assert response.status_code == 401
    response = client.get("/metrics", headers={"Authorization": "Bearer anything"})
    assert response.status_code == 401


def test_a_wrong_token_is_refused_even_with_a_staff_session(staff_client, monkeypatch):
    monkeypatch.setenv("METRICS_TOKEN", "s3cret-token")

    response = staff_client.get("/metrics", headers={"Authorization": "Bearer nope"})

    assert response.status_code == 401
