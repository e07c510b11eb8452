"""The backtest's event loop (`prebuilds.simulation`) against hand-computed traces: pure, no
database."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from prebuilds.reconciliation import PrebuildSchedule
from prebuilds.simulation import Policy, parse_policy, simulate

T = datetime(2026, 11, 30, 10, 0, tzinfo=UTC)  # a Monday


def at(*seconds: float) -> list[datetime]:
    return [T + timedelta(seconds=s) for s in seconds]


def run(policy: Policy, requests, *, end: float = 400, builds=(100.0,), **kwargs):
    return simulate(
        policy=policy,
        requests=requests,
        build_seconds=builds,
        start=T,
        end=T + timedelta(seconds=end),
        interval=10,
        **kwargs,
    ).as_dict()


def test_a_small_trace_by_hand():
    # Pool of 1, full at T. 5 s: hit (pool empty). Pass at 10 s: one build, ready at 110 s.
    # 50 s: miss, waits a cold build (100 s). 300 s: hit; the pass at 310 s starts a build that
    # ends after the window. Idle: 1 prebuild for 0-5 s and for 110-300 s = 195 s.
    report = run(Policy("fixed", instances=1), at(5, 50, 300))
    assert report == {
        "policy": "fixed:1",
        "requests": 3,
        "hit_rate": round(2 / 3, 4),
        "misses": 1,
        "wait_p95_s": 100.0,
        "idle_prebuild_hours": round(195 / 3600, 2),
        "builds": 2,
    }


def test_a_build_ending_as_a_request_arrives_serves_it_and_a_pass_follows_the_request():
    # 10 s: the request and a pass at the same moment: the request takes the prebuild first,
    # then the pass refills (build ends at 110 s), and the request at 110 s finds it.
    report = run(Policy("fixed", instances=1), at(10, 110), end=200)
    assert (report["misses"], report["builds"]) == (0, 2)


def test_creations_are_paced_by_the_in_flight_caps():
    # Ten claims empty a pool of ten in the first 10 s; the pass at 10 s wants ten builds. With
    # at most five in flight per preset, five start, and no more until one finishes (100 s).
    requests = at(*range(0, 10))
    paced = run(Policy("fixed", instances=10), requests, end=60, max_in_flight_per_preset=5)
    global_cap = run(Policy("fixed", instances=10), requests, end=60, max_in_flight=3)
    free = run(Policy("fixed", instances=10), requests, end=60)
    assert (paced["builds"], global_cap["builds"], free["builds"]) == (5, 3, 10)


def test_requests_before_the_window_are_history_only():
    report = run(Policy("fixed", instances=1), [T - timedelta(hours=1), *at(5)])
    assert report["requests"] == 1


def test_the_pool_grows_and_shrinks_with_a_schedule():
    # 2 prebuilds from 10:00 to 10:59 UTC, none outside: at 10:00 the pool starts with 2; at
    # 11:00 the pass deletes both. Idle: 2 × 3600 s = 2 h, no builds.
    policy = Policy(
        "schedule",
        instances=0,
        timezone="UTC",
        schedules=(PrebuildSchedule(cron="* 10 * * *", instances=2),),
    )
    report = run(policy, [], end=7200)
    assert (report["idle_prebuild_hours"], report["builds"]) == (2.0, 0)


def test_target_without_history_falls_back_to_instances():
    requests = at(*range(5, 3600, 60))
    fixed = run(Policy("fixed", instances=2), requests, end=3600)
    target = run(
        Policy("target", target_hit_rate=0.9, instances=2, max_instances=9), requests, end=3600
    )
    assert {**target, "policy": "fixed:2"} == fixed


def test_target_sizes_from_the_history_before_the_window():
    # Four Mondays before, one request a minute 10:00-10:59; this Monday the same. Builds take
    # 300 s: Erlang B(9, 5) ≤ 5 % < B(8, 5), so 95 % needs 9 and the pool starts at 9.
    history = [
        T - timedelta(weeks=week) + timedelta(minutes=m, seconds=1)
        for week in range(1, 5)
        for m in range(60)
    ]
    now = [T + timedelta(minutes=m, seconds=1) for m in range(60)]
    report = run(
        Policy("target", target_hit_rate=0.95, max_instances=20),
        history + now,
        end=3600,
        builds=(300.0, 300.0, 300.0),
    )
    # One claim a minute each refilled in 5 min (plus ≤ 10 s to the pass): at most ~6 are
    # refilling at once, so 9 never run dry.
    assert report["misses"] == 0
    assert report["builds"] == 60
    assert report["idle_prebuild_hours"] > 3  # ≥ 9 - 6 ready all hour


def test_it_is_deterministic_with_a_seed_and_draws_build_durations():
    rng = random.Random(7)
    requests = sorted(T + timedelta(seconds=rng.uniform(0, 7200)) for _ in range(200))
    builds = (30.0, 60.0, 120.0, 600.0, 1200.0)

    def report(seed):
        return run(Policy("fixed", instances=3), requests, end=7200, builds=builds, seed=seed)

    assert report(1) == report(1)
    assert len({str(report(seed)) for seed in range(5)}) > 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("fixed:3", Policy("fixed", instances=3)),
        ("schedule", Policy("schedule")),
        ("target:0.95", Policy("target", target_hit_rate=0.95)),
    ],
)
def test_it_parses_policies(text, expected):
    assert parse_policy(text) == expected


@pytest.mark.parametrize(
    "text",
    ["fixed", "fixed:-1", "fixed:x", "target:1", "target:0", "target:abc", "cold", "schedule:2"],
)
def test_it_refuses_bad_policies(text):
    with pytest.raises(ValueError):
        parse_policy(text)
