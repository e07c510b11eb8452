"""Table tests of the sizing arithmetic (`prebuilds.sizing`): pure, no database."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from prebuilds.sizing import Demand, SizingGoal, desired_size, hit_share, hour_of_week, percentile

# A Monday, 10:00 UTC: hour of the week 10.
MONDAY_10 = datetime(2026, 12, 7, 10, 0, tzinfo=UTC)
BUILDS = [240.0, 270.0, 300.0]  # p90 = 300 s = 5 min


def _erlang_b(servers: int, load: float) -> float:
    # The textbook recursion, independent of the code under test.
    blocking = 1.0
    for k in range(1, servers + 1):
        blocking = load * blocking / (k + load * blocking)
    return blocking


@pytest.mark.parametrize(
    ("pool", "load"), [(1, 1.0), (2, 1.0), (5, 3.0), (9, 5.0), (12, 5.0), (0, 2.0)]
)
def test_it_is_erlang_b_for_single_requests(pool, load):
    assert hit_share(pool, load, {1: 1.0}, 1.0) == pytest.approx(1 - _erlang_b(pool, load))


def test_it_charges_a_burst_only_the_hits_it_gets():
    # One slot, bursts of 2 at load 1: the burst finds the slot free with probability 1/2 and then
    # gets one hit of two requests, so 1/4 of requests are served.
    assert hit_share(1, 1.0, {2: 1.0}, 1.0) == pytest.approx(0.25)


def test_it_grows_with_the_pool():
    shares = [hit_share(pool, 0.5, {1: 0.8, 20: 0.2}, 5.0) for pool in range(80)]
    assert shares == sorted(shares)
    assert shares[0] == 0 and shares[-1] > 0.95


@pytest.mark.parametrize(
    ("values", "pct", "expected"),
    [([], 90, 0.0), ([5.0], 90, 5.0), ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 90, 9), ([3, 1, 2], 50, 2)],
)
def test_percentile_is_nearest_rank(values, pct, expected):
    assert percentile(values, pct) == expected


def test_hour_of_week_is_utc_monday_based():
    assert hour_of_week(MONDAY_10) == 10
    assert hour_of_week(datetime(2026, 12, 13, 23, 59, tzinfo=UTC)) == 167
    with pytest.raises(ValueError):
        hour_of_week(datetime(2026, 12, 7))


def _slot(per_week: dict[int, int], weeks: int = 4) -> dict[int, int]:
    return {size: count * weeks for size, count in per_week.items()}


# One request a minute during Monday 10:00 for 4 weeks; refill 5 min → load 5, Erlang B(9, 5) =
# 0.037 ≤ 0.05 < B(8, 5) = 0.070, so 95 % needs 9.
STEADY = Demand(28.0, {10: _slot({1: 60})})

CASES = [
    # id, goal, demand, builds, fallback, desired, policy, words in the reason
    (
        "steady",
        SizingGoal(0.95, 1, 20),
        STEADY,
        BUILDS,
        3,
        9,
        "target",
        ["1.0 requests/min", "5.0 min refill (p90)", "95 % needs 9", "240 requests over 28 days"],
    ),
    ("looser target", SizingGoal(0.8, 0, 20), STEADY, BUILDS, 3, 6, "target", ["80 % needs 6"]),
    (
        "capped",
        SizingGoal(0.95, 1, 4),
        STEADY,
        BUILDS,
        3,
        4,
        "target",
        ["needs 9", "capped at max_instances 4"],
    ),
    (
        "raised",
        SizingGoal(0.95, 12, 20),
        STEADY,
        BUILDS,
        3,
        12,
        "target",
        ["needs 9", "raised to min_instances 12"],
    ),
    (
        "zero demand",
        SizingGoal(0.95, 2, 20),
        Demand(28.0, {}),
        BUILDS,
        3,
        2,
        "target",
        ["no requests"],
    ),
    (
        "demand in other hours only",
        SizingGoal(0.95, 0, 20),
        Demand(28.0, {50: _slot({1: 60})}),
        BUILDS,
        3,
        0,
        "target",
        ["no requests"],
    ),
    (
        "short history",
        SizingGoal(0.95, 1, 20),
        Demand(3.5, {10: {1: 100}}),
        BUILDS,
        3,
        3,
        "fallback",
        ["history too short", "3.5 of 7 days"],
    ),
    (
        "short history, fallback clamped",
        SizingGoal(0.95, 1, 2),
        Demand(0.0),
        BUILDS,
        5,
        2,
        "fallback",
        ["history too short", "capped at max_instances 2"],
    ),
    (
        "too few builds",
        SizingGoal(0.95, 1, 20),
        STEADY,
        [300.0],
        3,
        3,
        "fallback",
        ["1 of 3 build durations"],
    ),
    # Demand just ahead: 10:58 with a 5-minute refill looks at 11:00 too.
    (
        "looks one refill ahead",
        SizingGoal(0.95, 0, 20),
        Demand(28.0, {11: _slot({1: 60})}),
        BUILDS,
        3,
        9,
        "target",
        ["needs 9"],
    ),
]


@pytest.mark.parametrize(
    ("goal", "demand", "builds", "fallback", "desired", "policy", "words"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_desired_size(goal, demand, builds, fallback, desired, policy, words):
    # Every case is judged at Monday 10:00 except the look-ahead one, at 10:58.
    now = MONDAY_10.replace(minute=58) if 11 in demand.bursts else MONDAY_10
    sizing = desired_size(
        goal=goal, demand=demand, build_seconds=builds, now=now, fallback=fallback
    )
    assert (sizing.desired, sizing.policy) == (desired, policy)
    assert sizing.reason.startswith(f"desired {desired}:")
    for word in words:
        assert word in sizing.reason


def test_a_pool_at_the_answer_reaches_the_target_and_one_less_does_not():
    demand = Demand(28.0, {10: _slot({1: 59, 20: 1})})
    sizing = desired_size(
        goal=SizingGoal(0.95, 0, 100),
        demand=demand,
        build_seconds=BUILDS,
        now=MONDAY_10,
        fallback=0,
    )
    bursts = 60 * 4
    sizes = {1: 59 / 60, 20: 1 / 60}
    rate = bursts / (4 * 3600)
    assert hit_share(sizing.desired, rate, sizes, 300) >= 0.95
    assert hit_share(sizing.desired - 1, rate, sizes, 300) < 0.95


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_hit_rate": 0},
        {"target_hit_rate": 1},
        {"target_hit_rate": 0.9, "min_instances": -1},
        {"target_hit_rate": 0.9, "min_instances": 5, "max_instances": 4},
    ],
)
def test_goal_refuses_bad_values(kwargs):
    with pytest.raises(ValueError):
        SizingGoal(**kwargs)


def test_a_recurring_burst_makes_the_pool_absorb_most_of_it():
    # A burst of 20 every Monday at 10:00 beside one request a minute: a steady-only pool (9) would
    # miss most of the burst; 95 % of all requests needs most of the burst served warm.
    sizing = desired_size(
        goal=SizingGoal(0.95, 1, 40),
        demand=Demand(28.0, {10: _slot({1: 59, 20: 1})}),
        build_seconds=BUILDS,
        now=MONDAY_10,
        fallback=3,
    )
    assert 20 <= sizing.desired <= 40
    assert "bursts up to 20" in sizing.reason
    assert f"95 % needs {sizing.desired};" in sizing.reason


def test_a_quiet_hour_reads_as_a_small_rate_not_zero():
    # Two requests in this hour over four weeks: 0.5 an hour, 0.0083 a minute.
    sizing = desired_size(
        goal=SizingGoal(0.95, 0, 5),
        demand=Demand(28.0, {10: {1: 2}}),
        build_seconds=BUILDS,
        now=MONDAY_10,
        fallback=0,
    )
    assert "0.0083 requests/min" in sizing.reason
