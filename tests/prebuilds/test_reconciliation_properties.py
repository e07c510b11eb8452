"""Property tests of the pure reconciliation core: invariants that must hold for any snapshot.

Expiry is recomputed here from DESIGN.md section 4 rule 1 instead of calling the module's
helper, so a wrong helper cannot make these properties pass by agreeing with itself.
"""

from __future__ import annotations

import dataclasses
import random
from datetime import UTC, datetime, timedelta, timezone
from uuid import UUID

from hypothesis import given, settings
from hypothesis import strategies as st

from prebuilds.reconciliation import (
    ActionType,
    Backoff,
    PrebuildInfo,
    PrebuildSchedule,
    PresetSnapshot,
    ReconciliationActions,
    calculate_actions,
    calculate_state,
)

BASE = datetime(2024, 3, 10, 0, 0, tzinfo=UTC)  # America/New_York springs forward this day
FAST = settings(max_examples=150, deadline=None)

minutes = st.integers(min_value=0, max_value=24 * 60)
# A narrow range of creation times so that ties (broken by id) are common.
created_minutes = st.integers(min_value=0, max_value=12).map(lambda m: m * 60)


def at_minute(minute: int) -> datetime:
    return BASE + timedelta(minutes=minute)


def as_minutes(minute: int) -> timedelta:
    return timedelta(minutes=minute)


small_counts = st.integers(min_value=0, max_value=4)


prebuilds = st.lists(
    st.builds(
        lambda n, minute, ready: PrebuildInfo(UUID(int=n), at_minute(minute), ready),
        st.integers(min_value=1, max_value=10_000),
        created_minutes,
        st.booleans(),
    ),
    max_size=10,
    unique_by=lambda prebuild: prebuild.id,
)

schedule_sets = st.sampled_from(
    [
        ("", ()),
        ("UTC", (PrebuildSchedule("* 9-18 * * 1-5", 6),)),
        (
            "America/New_York",
            (PrebuildSchedule("* 0-5 * * *", 0), PrebuildSchedule("* 6-11 * * *", 4)),
        ),
        ("Europe/Berlin", (PrebuildSchedule("* * * * 0", 3),)),
        ("UTC", (PrebuildSchedule("* 1 * * *", 2), PrebuildSchedule("* * * * *", 9))),  # overlap
        ("Mars/Olympus_Mons", (PrebuildSchedule("* * * * *", 9),)),
    ]
)


@st.composite
def snapshots(draw: st.DrawFn) -> PresetSnapshot:
    tz, schedules = draw(schedule_sets)
    return PresetSnapshot(
        preset_id=UUID(int=1),
        desired_instances=draw(st.none() | st.integers(min_value=0, max_value=8)),
        active=draw(st.booleans()),
        running=draw(prebuilds),
        ttl=draw(st.none() | st.integers(min_value=0, max_value=600).map(as_minutes)),
        last_invalidated_at=draw(st.none() | minutes.map(at_minute)),
        timezone=tz,
        schedules=schedules,
        starting=draw(small_counts),
        stopping=draw(small_counts),
        deleting=draw(small_counts),
        pending_count=draw(small_counts),
        backoff=draw(st.none() | st.builds(Backoff, small_counts, minutes.map(at_minute))),
        hard_limited=draw(st.booleans()),
    )


nows = st.builds(
    lambda minute, offset_hours: at_minute(minute).astimezone(
        timezone(timedelta(hours=offset_hours))
    ),
    minutes,
    st.integers(min_value=-12, max_value=14),
)
intervals = st.integers(min_value=0, max_value=120).map(lambda s: timedelta(seconds=s))


def expired_oracle(prebuild: PrebuildInfo, snapshot: PresetSnapshot, now: datetime) -> bool:
    invalidated = snapshot.last_invalidated_at
    if invalidated is not None and prebuild.created_at < invalidated:
        return True
    return bool(snapshot.ttl) and now - prebuild.created_at > snapshot.ttl


def fresh_ids(snapshot: PresetSnapshot, now: datetime) -> set[UUID]:
    return {p.id for p in snapshot.running if not expired_oracle(p, snapshot, now)}


def deleted_ids(actions: list[ReconciliationActions]) -> list[UUID]:
    return [i for action in actions if action.type is ActionType.DELETE for i in action.delete_ids]


def created(actions: list[ReconciliationActions]) -> int:
    return sum(action.create for action in actions if action.type is ActionType.CREATE)


@FAST
@given(snapshots(), nows, intervals)
def test_it_never_creates_while_deleting_non_expired_prebuilds(snapshot, now, interval):
    actions = calculate_actions(snapshot, now, interval)

    deletes_fresh = bool(set(deleted_ids(actions)) & fresh_ids(snapshot, now))
    assert not (created(actions) > 0 and deletes_fresh)


@FAST
@given(snapshots(), nows, intervals)
def test_it_never_overfills_the_pool(snapshot, now, interval):
    actions = calculate_actions(snapshot, now, interval)
    desired = calculate_state(snapshot, now).desired
    present = len(fresh_ids(snapshot, now)) + snapshot.starting

    assert created(actions) + present <= max(desired, present)


@FAST
@given(snapshots(), nows, intervals)
def test_it_fills_the_pool_unless_held_back(snapshot, now, interval):
    actions = calculate_actions(snapshot, now, interval)
    desired = calculate_state(snapshot, now).desired
    present = len(fresh_ids(snapshot, now)) + snapshot.starting
    held_back = snapshot.hard_limited or any(a.type is ActionType.BACKOFF for a in actions)

    if snapshot.active and not held_back:
        assert created(actions) == max(desired - present, 0)


@FAST
@given(snapshots(), nows, intervals)
def test_it_deletes_only_running_prebuilds_and_each_once(snapshot, now, interval):
    deleted = deleted_ids(calculate_actions(snapshot, now, interval))

    assert len(deleted) == len(set(deleted))
    assert set(deleted) <= {p.id for p in snapshot.running}


@FAST
@given(snapshots(), nows, intervals)
def test_it_deletes_every_expired_prebuild(snapshot, now, interval):
    deleted = set(deleted_ids(calculate_actions(snapshot, now, interval)))
    expired = {p.id for p in snapshot.running if expired_oracle(p, snapshot, now)}

    assert expired <= deleted


@FAST
@given(snapshots(), nows, intervals, st.randoms(use_true_random=False))
def test_it_is_deterministic_and_ignores_input_order(snapshot, now, interval, rng: random.Random):
    actions = calculate_actions(snapshot, now, interval)
    shuffled = list(snapshot.running)
    rng.shuffle(shuffled)
    reordered = dataclasses.replace(snapshot, running=shuffled)

    assert calculate_actions(snapshot, now, interval) == actions
    assert calculate_actions(reordered, now, interval) == actions


@FAST
@given(snapshots(), nows, intervals, st.integers(min_value=-12, max_value=14))
def test_it_judges_the_instant_not_the_offset_of_now(snapshot, now, interval, offset_hours):
    elsewhere = now.astimezone(timezone(timedelta(hours=offset_hours)))

    assert calculate_actions(snapshot, elsewhere, interval) == calculate_actions(
        snapshot, now, interval
    )
    assert calculate_state(snapshot, elsewhere) == calculate_state(snapshot, now)


@FAST
@given(snapshots(), nows, intervals)
def test_it_only_cleans_up_an_inactive_preset(snapshot, now, interval):
    inactive = dataclasses.replace(snapshot, active=False)
    actions = calculate_actions(inactive, now, interval)

    assert not any(a.type in (ActionType.CREATE, ActionType.BACKOFF) for a in actions)
    assert sorted(deleted_ids(actions)) == sorted(p.id for p in snapshot.running)


@FAST
@given(snapshots(), nows, intervals)
def test_it_emits_no_empty_action(snapshot, now, interval):
    for action in calculate_actions(snapshot, now, interval):
        match action.type:
            case ActionType.CREATE:
                assert action.create > 0
            case ActionType.DELETE:
                assert action.delete_ids
            case ActionType.BACKOFF:
                assert action.backoff_until is not None and now <= action.backoff_until
            case ActionType.CANCEL_PENDING:
                assert action.cancel_count > 0


@FAST
@given(snapshots(), nows, intervals)
def test_it_deletes_oldest_first_within_each_action(snapshot, now, interval):
    created_at = {p.id: p.created_at for p in snapshot.running}

    for action in calculate_actions(snapshot, now, interval):
        keys = [(created_at[i], i) for i in action.delete_ids]
        assert keys == sorted(keys)


@FAST
@given(snapshots(), nows, intervals)
def test_it_never_holds_back_deletions(snapshot, now, interval):
    unrestricted = dataclasses.replace(snapshot, backoff=None, hard_limited=False)

    def deletions(snap: PresetSnapshot) -> list[ReconciliationActions]:
        return [a for a in calculate_actions(snap, now, interval) if a.type is ActionType.DELETE]

    assert deletions(snapshot) == deletions(unrestricted)
