"""The snapshot's demand figures for presets sized by a goal (`prebuilds.sizing`), on PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.utils import timezone

from prebuilds.models import PrebuildClaim
from prebuilds.reconciler import reconcile, status_document
from prebuilds.selectors import SIZING_REFRESH, reconciliation_snapshot, sizing_cache_clear
from prebuilds.sizing import Demand, SizingGoal, desired_size
from tests.accounts.factories import UserFactory
from tests.workspaces.factories import PresetFactory, TemplateVersionFactory, prebuild
from workspaces.models import ProvisionerJob, TemplateVersionPreset

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _fresh_sizing_cache():
    sizing_cache_clear()
    yield
    sizing_cache_clear()


# Monday 2026-11-30 10:30 UTC: hour of the week 10.
NOW = datetime(2026, 11, 30, 10, 30, tzinfo=UTC)
BUILD_SECONDS = (240, 270, 300)


def goal_preset(**kwargs) -> TemplateVersionPreset:
    defaults = {"desired_instances": 2, "target_hit_rate": 0.95, "min_instances": 1}
    return PresetFactory(**{**defaults, "max_instances": 30, **kwargs})


def record_builds(preset: TemplateVersionPreset, seconds=BUILD_SECONDS) -> None:
    """Successful prebuild start builds of `preset` that took `seconds` each."""
    for duration in seconds:
        workspace = prebuild(preset)
        job_id = workspace.builds.get().job_id
        completed = NOW - timedelta(hours=1)
        ProvisionerJob.objects.filter(id=job_id).update(
            started_at=completed - timedelta(seconds=duration), completed_at=completed
        )


def record_requests(preset, *, weeks: int, per_minute: dict[int, int], hour: int = 10) -> None:
    """For each of the last `weeks` Mondays at `hour`:00 UTC, `per_minute[minute]` requests."""
    user = UserFactory()
    rows = []
    for week in range(1, weeks + 1):
        start = NOW.replace(hour=hour, minute=0) - timedelta(weeks=week)
        for minute, count in per_minute.items():
            at = start + timedelta(minutes=minute, seconds=1)
            rows += [
                PrebuildClaim(
                    preset=preset,
                    user=user,
                    claimed=i % 2 == 0,
                    miss_reason="" if i % 2 == 0 else "pool_empty",
                    requested_at=at,
                )
                for i in range(count)
            ]
    PrebuildClaim.objects.bulk_create(rows)


def entry_of(preset):
    return {e.id: e for e in reconciliation_snapshot(now=NOW).presets}[preset.id]


def test_it_sizes_a_goal_preset_from_its_recorded_demand_and_build_durations():
    preset = goal_preset()
    preset.schedules.create(position=0, cron="* * * * *", instances=6)
    preset.scheduling_timezone = "UTC"
    preset.save()
    record_builds(preset)
    # One request a minute, plus a burst of 20 at 10:05, on the three Mondays before.
    per_minute = dict.fromkeys(range(60), 1) | {5: 20}
    record_requests(preset, weeks=3, per_minute=per_minute)

    entry = entry_of(preset)

    expected = desired_size(
        goal=SizingGoal(0.95, 1, 30),
        # History from the first request, 3 weeks and 30 minutes before NOW.
        demand=Demand(21 + 30 / 1440, {10: {1: 3 * 59, 20: 3}}),
        build_seconds=BUILD_SECONDS,
        now=NOW,
        fallback=6,
    )
    assert entry.sizing == expected
    assert entry.sizing.policy == "target"
    assert "bursts up to 20" in entry.sizing.reason
    assert entry.snapshot.desired_instances == expected.desired
    assert entry.snapshot.schedules == ()  # the schedule was only the fallback
    assert len(entry.declared_schedules) == 1


def test_demand_of_earlier_versions_of_the_same_preset_counts():
    old = goal_preset(name="standard")
    template = old.template_version.template
    version = TemplateVersionFactory(template=template)
    template.active_version = version
    template.save()
    current = goal_preset(name="standard", template_version=version)
    other = PresetFactory(name="other", template_version=version, desired_instances=1)
    record_builds(old)
    record_requests(old, weeks=2, per_minute=dict.fromkeys(range(30), 1))
    record_requests(other, weeks=4, per_minute=dict.fromkeys(range(60), 5))

    sizing = entry_of(current).sizing

    assert sizing.policy == "target"
    # 60 requests of "standard" over 2 Mondays; "other"'s requests are not its demand.
    assert "from 60 requests over" in sizing.reason
    assert "0.5 requests/min" in sizing.reason


def test_it_falls_back_to_instances_while_history_is_short():
    preset = goal_preset(desired_instances=3)
    record_builds(preset)
    PrebuildClaim.objects.create(
        preset=preset, user=UserFactory(), claimed=True, requested_at=NOW - timedelta(days=2)
    )

    entry = entry_of(preset)

    assert entry.sizing.policy == "fallback"
    assert entry.snapshot.desired_instances == 3
    assert "2.0 of 7 days" in entry.sizing.reason


def test_a_preset_without_a_goal_is_not_sized():
    preset = PresetFactory(desired_instances=2)
    assert entry_of(preset).sizing is None


def test_the_reconciler_creates_the_derived_size_and_documents_why():
    preset = goal_preset(desired_instances=0, min_instances=0)
    record_builds(preset)
    record_requests(preset, weeks=4, per_minute=dict.fromkeys(range(60), 1))

    result = reconcile(dry_run=True, now=NOW)

    (document,) = [p for p in result.presets if p.entry.id == preset.id]
    sizing = document.entry.sizing
    assert document.state.desired == sizing.desired > 3
    creates = [a.create for a in document.actions if a.type.value == "create"]
    assert creates == [sizing.desired - document.state.actual]


def _populate_goals(count: int) -> None:
    user = UserFactory()
    rows = []
    for _ in range(count):
        preset = goal_preset()
        record_builds(preset, seconds=(300,))
        rows += [
            PrebuildClaim(
                preset=preset,
                user=user,
                claimed=True,
                requested_at=NOW - timedelta(days=day, minutes=5),
            )
            for day in range(1, 10)
        ]
    PrebuildClaim.objects.bulk_create(rows)


@pytest.mark.parametrize("presets", [1, 50])
def test_sizing_costs_one_query_whatever_the_number_of_goal_presets(
    presets, django_assert_max_num_queries
):
    _populate_goals(presets)

    with django_assert_max_num_queries(6):
        snapshot = reconciliation_snapshot(now=NOW)

    assert len(snapshot.presets) == presets
    assert all(entry.sizing is not None for entry in snapshot.presets)


def test_the_status_document_and_the_preset_page_say_why(client):
    now = timezone.now()
    preset = goal_preset(desired_instances=2)
    record_builds(preset)
    user = UserFactory()
    # Ten days of one request every hour, at this minute of the hour: a history that covers every
    # hour of the week, so the current hour has demand.
    PrebuildClaim.objects.bulk_create(
        PrebuildClaim(preset=preset, user=user, claimed=True, requested_at=now - timedelta(hours=h))
        for h in range(1, 240)
    )
    plain = PresetFactory(desired_instances=1)

    presets = {p["preset_id"]: p for p in status_document()["presets"]}

    sizing = presets[str(preset.id)]["sizing"]
    assert set(sizing) == {"policy", "desired", "reason"}
    assert sizing["policy"] == "target"
    assert sizing["desired"] == presets[str(preset.id)]["state"]["desired"] >= 1
    assert sizing["reason"].startswith(f"desired {sizing['desired']}: ")
    assert "from 239 requests over" in sizing["reason"]
    assert presets[str(plain.id)]["sizing"] is None

    client.force_login(UserFactory(is_staff=True))
    page = client.get(f"/prebuilds/presets/{preset.id}/").content.decode()
    assert 'id="preset-sizing"' in page
    assert "Sized by a goal: desired" in page
    assert "from 239 requests over" in page
    assert (
        'id="preset-sizing"' not in client.get(f"/prebuilds/presets/{plain.id}/").content.decode()
    )


def test_the_overview_marks_a_pool_sized_by_a_goal_with_its_reason(client):
    preset = goal_preset(desired_instances=3)
    record_builds(preset)
    plain = PresetFactory(desired_instances=1)
    client.force_login(UserFactory(is_staff=True))

    page = client.get("/prebuilds/").content.decode()

    # No history yet: the fallback, with its reason in the tooltip.
    assert 'data-sizing="fallback"' in page
    assert 'title="desired 3: history too short (0.0 of 7 days of requests)' in page
    assert page.count("data-sizing=") == 1
    assert f'id="preset-{plain.id}"' in page  # listed, without a goal mark


def test_demand_figures_are_reused_for_five_minutes(django_assert_num_queries):
    preset = goal_preset()
    record_builds(preset)
    record_requests(preset, weeks=2, per_minute=dict.fromkeys(range(60), 1))
    first = entry_of(preset).sizing

    PrebuildClaim.objects.filter(preset=preset).delete()
    with django_assert_num_queries(5):  # the figures of the first snapshot are reused
        reused = reconciliation_snapshot(now=NOW + SIZING_REFRESH - timedelta(seconds=1))
    later = reconciliation_snapshot(now=NOW + SIZING_REFRESH)  # read again: no demand now

    assert [e.sizing for e in reused.presets] == [first]
    assert first.policy == "target"
    assert later.presets[0].sizing.policy == "fallback"
