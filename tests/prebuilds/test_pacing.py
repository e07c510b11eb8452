"""The in-flight caps on prebuild creation: the pure rule, and a real pass applying it."""

from __future__ import annotations

import pytest
from django.utils import timezone

from prebuilds.pacing import Demand, allowed_creations
from prebuilds.reconciler import reconcile
from tests.workspaces.factories import PresetFactory, prebuild
from workspaces.models import JobStatus, ProvisionerJob, WorkspaceBuild

# --- The rule -------------------------------------------------------------------------------


def test_it_creates_everything_without_caps():
    demands = [Demand("a", want=200, in_flight=7, supply=0), Demand("b", 3, 0, 1)]

    assert allowed_creations(demands, in_flight_total=7, limit=0, per_preset_limit=0) == {
        "a": 200,
        "b": 3,
    }


def test_the_per_preset_cap_counts_builds_already_in_flight():
    demands = [Demand("a", want=10, in_flight=2, supply=2), Demand("b", 1, 5, 5)]

    allowed = allowed_creations(demands, in_flight_total=7, limit=0, per_preset_limit=5)

    assert allowed == {"a": 3, "b": 0}


def test_the_global_cap_counts_every_build_in_flight_and_never_goes_negative():
    demands = [Demand("a", want=10, in_flight=0, supply=0)]

    assert allowed_creations(demands, in_flight_total=8, limit=10, per_preset_limit=0) == {"a": 2}
    assert allowed_creations(demands, in_flight_total=12, limit=10, per_preset_limit=0) == {"a": 0}


def test_the_global_room_goes_round_by_round_emptiest_pool_first():
    demands = [
        Demand("full-ish", want=1, in_flight=0, supply=9),
        Demand("filling", want=200, in_flight=0, supply=50),
        Demand("empty", want=10, in_flight=0, supply=0),
    ]

    # One round (3 builds) plus one: the emptiest pool gets the fourth.
    allowed = allowed_creations(demands, in_flight_total=6, limit=10, per_preset_limit=0)

    assert allowed == {"empty": 2, "filling": 1, "full-ish": 1}
    assert sum(allowed.values()) == 4


def test_a_preset_at_its_own_cap_leaves_the_global_room_to_others():
    demands = [Demand("big", want=100, in_flight=0, supply=0), Demand("small", 5, 0, 3)]

    allowed = allowed_creations(demands, in_flight_total=0, limit=10, per_preset_limit=4)

    assert allowed == {"big": 4, "small": 4}


# --- A real pass ----------------------------------------------------------------------------


def in_flight(preset) -> int:
    return WorkspaceBuild.objects.filter(
        preset=preset,
        reason="prebuild",
        job__status__in=(JobStatus.PENDING, JobStatus.RUNNING),
    ).count()


@pytest.mark.django_db
def test_a_pass_creates_no_more_than_the_per_preset_cap(settings):
    settings.PREBUILDS_MAX_IN_FLIGHT, settings.PREBUILDS_MAX_IN_FLIGHT_PER_PRESET = 0, 3
    preset = PresetFactory(desired_instances=20)
    prebuild(preset, status=JobStatus.RUNNING)  # one already in flight

    result = reconcile()

    assert result.actions_taken == 2
    assert in_flight(preset) == 3
    [paced] = result.presets
    assert [(a.type.value, a.create) for a in paced.actions] == [("create", 2)]
    # Nothing finished: the next pass creates nothing, and says nothing about creating.
    again = reconcile()
    assert again.actions_taken == 0 and again.presets[0].actions == ()
    assert in_flight(preset) == 3
    # A build finishes: its room goes to the next one.
    ProvisionerJob.objects.filter(status=JobStatus.RUNNING).update(
        status=JobStatus.SUCCEEDED, completed_at=timezone.now()
    )
    assert reconcile().actions_taken == 1
    assert in_flight(preset) == 3


@pytest.mark.django_db
def test_a_pass_shares_the_global_cap_between_presets(settings):
    settings.PREBUILDS_MAX_IN_FLIGHT, settings.PREBUILDS_MAX_IN_FLIGHT_PER_PRESET = 5, 0
    big, small = PresetFactory(desired_instances=50), PresetFactory(desired_instances=2)

    assert reconcile().actions_taken == 5

    assert in_flight(big) + in_flight(small) == 5
    assert in_flight(small) == 2  # fewest prebuilds first, round by round: both of its own


@pytest.mark.django_db
def test_deletions_are_never_held_back_by_the_caps(settings):
    settings.PREBUILDS_MAX_IN_FLIGHT, settings.PREBUILDS_MAX_IN_FLIGHT_PER_PRESET = 1, 1
    preset = PresetFactory(desired_instances=0)
    for _ in range(3):
        prebuild(preset)

    result = reconcile()

    assert result.actions_taken == 3  # three delete builds, caps or not
