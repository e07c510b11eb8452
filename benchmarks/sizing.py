"""Sizing by a goal, backtested on a seeded synthetic week (simulated time, no servers).

The trace (`synthetic_trace`): five weeks drawn from one model, the first four the history the
`target` policy sizes from, the fifth scored. Weekdays: a Poisson stream peaking at 09:00-17:00
UTC (ramping in at 08:00 and out until 19:00), quiet nights; weekends at a trickle; and every
Monday at 09:0x and Wednesday at 14:0x a burst of 20 requests within one minute (a class, a
team on-boarding). Build durations: log-normal (median 3 min, a long tail: p90 about 6.5 min,
the longest about 20), 200 recorded samples the simulation draws from.

Keys (DESIGN.md section 10): `sizing_hit_rate` (of `target:0.95` over the scored week),
`sizing_fixed_size` (the smallest fixed pool reaching at least that hit rate),
`sizing_idle_ratio` (idle prebuild-hours of `target:0.95` ÷ those of that fixed pool) and
`sizing_trace_requests` (requests in the scored week). Also the smallest fixed pool that
just meets the goal (`sizing_fixed_size_at_goal`, its hit rate and idle hours),
`sizing_target_idle_hours`,
`sizing_fixed_idle_hours`, `sizing_target_misses`, `sizing_fixed_misses` and
`sizing_target_builds`, `sizing_fixed_builds`, to read the ratio by.

Run alone: `python -m benchmarks --only sizing --json`, or `python -m benchmarks.sizing`.
"""

from __future__ import annotations

import json
import math
import random
from datetime import UTC, datetime, timedelta
from typing import Any

from prebuilds.simulation import Policy, PolicyReport, simulate

SEED = 17
INTERVAL = 15.0  # seconds between simulated passes (PREBUILDS_RECONCILIATION_INTERVAL)
# The in-flight caps' defaults (PREBUILDS_MAX_IN_FLIGHT, _PER_PRESET): a pool grows (or refills
# after a burst) at most five builds at a time, as the real reconciler paces it.
MAX_IN_FLIGHT = 10
MAX_IN_FLIGHT_PER_PRESET = 5
WEEK_START = datetime(2026, 11, 30, tzinfo=UTC)  # a Monday: the scored week
HISTORY_WEEKS = 4
TARGET = 0.95
MAX_INSTANCES = 60
BURST = 20
BURSTS = ((0, 9), (2, 14))  # (weekday, hour) of the weekly bursts


def _rate_per_minute(moment: datetime) -> float:
    """Requests per minute of the Poisson stream at `moment` (UTC)."""
    hour = moment.hour + moment.minute / 60
    if moment.weekday() >= 5:
        return 0.02 if 9 <= hour < 18 else 0.002
    if 9 <= hour < 17:
        return 0.6
    if 8 <= hour < 9 or 17 <= hour < 19:
        return 0.2
    return 0.01


def synthetic_trace(seed: int = SEED) -> tuple[list[datetime], list[float]]:
    """(request times over HISTORY_WEEKS + 1 weeks, build durations in seconds)."""
    rng = random.Random(seed)
    start = WEEK_START - timedelta(weeks=HISTORY_WEEKS)
    end = WEEK_START + timedelta(weeks=1)
    requests: list[datetime] = []
    # A non-homogeneous Poisson stream, minute by minute (the rate is constant within a minute).
    minute = start
    while minute < end:
        rate = _rate_per_minute(minute)
        for _ in range(_poisson(rng, rate)):
            requests.append(minute + timedelta(seconds=rng.uniform(0, 60)))
        if (minute.weekday(), minute.hour) in BURSTS and minute.minute == 0:
            burst_at = minute + timedelta(minutes=rng.randint(0, 9), seconds=rng.randint(0, 50))
            requests += [burst_at + timedelta(seconds=i / 2) for i in range(BURST)]
        minute += timedelta(minutes=1)
    builds = [min(rng.lognormvariate(math.log(180), 0.6), 1200.0) for _ in range(200)]
    return sorted(requests), builds


def _poisson(rng: random.Random, mean: float) -> int:
    # Knuth's method: fine for the small means of one minute.
    limit, count, product = math.exp(-mean), 0, rng.random()
    while product > limit:
        count += 1
        product *= rng.random()
    return count


def backtest(seed: int = SEED) -> dict[str, Any]:
    requests, builds = synthetic_trace(seed)
    end = WEEK_START + timedelta(weeks=1)

    def replay(policy: Policy) -> PolicyReport:
        return simulate(
            policy=policy,
            requests=requests,
            build_seconds=builds,
            start=WEEK_START,
            end=end,
            interval=INTERVAL,
            seed=seed,
            max_in_flight=MAX_IN_FLIGHT,
            max_in_flight_per_preset=MAX_IN_FLIGHT_PER_PRESET,
        )

    target = replay(Policy("target", target_hit_rate=TARGET, max_instances=MAX_INSTANCES))
    assert target.hit_rate is not None
    # The smallest fixed pool that serves at least as many requests warm, by bisection: the hit
    # rate of a fixed pool grows with its size (checked: the size below is reported too).
    reports: dict[int, PolicyReport] = {}

    def fixed_at(size: int) -> PolicyReport:
        if size not in reports:
            reports[size] = replay(Policy("fixed", instances=size))
        return reports[size]

    def smallest_reaching(rate: float) -> int:
        low, high = 0, MAX_INSTANCES
        while low < high:
            middle = (low + high) // 2
            if (fixed_at(middle).hit_rate or 0) >= rate:
                high = middle
            else:
                low = middle + 1
        return low

    size = smallest_reaching(target.hit_rate)
    fixed = fixed_at(size)
    below = fixed_at(size - 1) if size > 0 else None
    # A stricter reading too: the smallest fixed pool that just meets the goal (0.95).
    at_goal = fixed_at(smallest_reaching(TARGET))
    return {
        "sizing_hit_rate": round(target.hit_rate, 4),
        "sizing_idle_ratio": round(target.idle_prebuild_hours / fixed.idle_prebuild_hours, 3)
        if fixed.idle_prebuild_hours
        else None,
        "sizing_fixed_size": int(fixed.policy.removeprefix("fixed:")),
        "sizing_trace_requests": target.requests,
        "sizing_fixed_hit_rate": round(fixed.hit_rate or 0, 4),
        "sizing_fixed_below_hit_rate": round(below.hit_rate or 0, 4) if below else None,
        "sizing_target_idle_hours": round(target.idle_prebuild_hours, 1),
        "sizing_fixed_idle_hours": round(fixed.idle_prebuild_hours, 1),
        "sizing_target_misses": target.misses,
        "sizing_fixed_misses": fixed.misses,
        "sizing_fixed_size_at_goal": int(at_goal.policy.removeprefix("fixed:")),
        "sizing_fixed_at_goal_hit_rate": round(at_goal.hit_rate or 0, 4),
        "sizing_fixed_at_goal_idle_hours": round(at_goal.idle_prebuild_hours, 1),
        "sizing_target_builds": target.builds,
        "sizing_fixed_builds": fixed.builds,
    }


def run(*, quick: bool) -> dict[str, Any]:
    """The benchmark's keys; `quick` changes nothing (one simulated week is already quick)."""
    return backtest()


if __name__ == "__main__":
    print(json.dumps(backtest()))
