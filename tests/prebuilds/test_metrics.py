from __future__ import annotations

import re
import threading
from datetime import timedelta

import pytest
from django.db import connection
from django.test import Client
from django.utils import timezone
from prometheus_client import generate_latest

from prebuilds.metrics import PrebuildsCollector, pass_duration_observe, registry
from prebuilds.models import ReconciliationPass
from prebuilds.reconciler import PassResult, _record, reconcile
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
    assert values[("prebuilds_reconciliation_duration_seconds_count", frozenset())] == 1


def _duration(values, suffix: str, le: str | None = None) -> float:
    key_labels = frozenset({("le", le)}) if le is not None else frozenset()
    return values[(f"prebuilds_reconciliation_duration_seconds_{suffix}", key_labels)]


def test_the_duration_histogram_has_cumulative_buckets_a_count_and_a_sum(staff_client):
    for seconds in (0.02, 0.3, 4.0, 100.0):
        pass_duration_observe(seconds)

    values = samples(staff_client.get("/metrics").content.decode())

    buckets = [_duration(values, "bucket", le) for le in ("0.025", "0.5", "5.0", "60.0", "+Inf")]
    assert buckets == [1, 2, 3, 3, 4]
    assert _duration(values, "count") == 4
    assert _duration(values, "sum") == pytest.approx(104.32)
    assert values[("prebuilds_reconciliation_paused", frozenset())] == 0


def test_the_duration_histogram_counts_every_pass_that_held_the_lock_and_outlives_pruning(
    staff_client,
):
    reconcile()
    reconcile()
    skipped = PassResult(
        started_at=timezone.now(),
        duration_seconds=9.0,
        lock_acquired=False,
        paused=False,
        dry_run=False,
    )
    _record(skipped, timezone.now())  # a pass that found the lock taken: not a pass that ran
    ran = ReconciliationPass.objects.filter(lock_acquired=True)
    expected_sum = sum(p.duration_seconds for p in ran)

    values = samples(staff_client.get("/metrics").content.decode())
    assert _duration(values, "count") == 2
    assert _duration(values, "sum") == pytest.approx(expected_sum)

    ReconciliationPass.objects.all().delete()  # what pruning does a day later
    values = samples(staff_client.get("/metrics").content.decode())
    assert _duration(values, "count") == 2, "a counter must never go down"


@pytest.mark.django_db(transaction=True)
def test_racing_passes_lose_no_duration():
    """Passes record after releasing the lock, so two can record at once: no lost update."""
    barrier = threading.Barrier(6)
    errors: list[BaseException] = []

    def record() -> None:
        try:
            barrier.wait()
            for index in range(20):
                pass_duration_observe(0.01 * index)
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=record) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    values = samples(generate_latest(registry).decode())
    assert _duration(values, "count") == 120
    assert _duration(values, "sum") == pytest.approx(6 * sum(0.01 * i for i in range(20)))


def test_pool_metrics_are_also_exposed_under_coders_names_and_labels(staff_client):
    template = TemplateFactory(name="python-dev")
    preset = PresetFactory(template_version=template.active_version, desired_instances=2)
    prebuild(preset)
    prebuild(preset, status=JobStatus.FAILED)
    claimed = prebuild(preset)
    Workspace.objects.filter(id=claimed.id).update(
        owner=UserFactory(), name="mine", claimed_at=timezone.now()
    )
    reconciliation_pause(paused=True)
    reconcile()

    values = samples(staff_client.get("/metrics").content.decode())

    ours = labels(preset)
    coders = frozenset(
        {
            ("organization_name", template.organization.name),
            ("template_name", "python-dev"),
            ("preset_name", preset.name),
        }
    )
    for name in (
        "created_total",
        "failed_total",
        "claimed_total",
        "desired",
        "running",
        "eligible",
        "preset_hard_limited",
    ):
        assert (
            values[(f"coderd_prebuilt_workspaces_{name}", coders)]
            == (values[(f"prebuilt_workspaces_{name}", ours)])
        ), name
    assert values[("coderd_prebuilt_workspaces_desired", coders)] == 2
    assert values[("coderd_prebuilt_workspaces_failed_total", coders)] == 1
    assert values[("coderd_prebuilt_workspaces_claimed_total", coders)] == 1
    assert values[("coderd_prebuilt_workspaces_reconciliation_paused", frozenset())] == 1
    assert values[("coderd_prebuilds_reconciliation_duration_seconds_count", frozenset())] == 1
    assert (
        values[("coderd_prebuilt_workspaces_metrics_last_updated", frozenset())]
        == (values[("prebuilds_reconciliation_last_pass_timestamp_seconds", frozenset())])
    )


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
        list(PrebuildsCollector().collect())


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
