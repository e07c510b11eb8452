"""A backtest of pool sizing policies: recorded demand replayed through the real pure core.

Pure (no Django, no database), like `prebuilds.reconciliation` and `prebuilds.sizing`: the
`simulate_prebuilds` command and the sizing benchmark read demand and build durations, and this
module replays them in simulated time as discrete events:

- a **request** takes a ready prebuild if there is one (a hit: it waits 0 s) or misses (it waits
  for a cold build, a duration drawn from the recorded ones);
- a **pass** every `interval` seconds builds a `PresetSnapshot` of the simulated pool and calls
  the real `calculate_actions`: CREATE starts builds (each ready after a drawn duration), paced
  by the real in-flight caps (`prebuilds.pacing`), DELETE removes prebuilds (at once: a
  deleting prebuild serves nobody either way);
- a **build** finishing makes one more prebuild ready.

Events at the same instant run in the order: builds finish, requests, the pass. The pool
starts full (the policy's desired size at the start, all ready): a backtest compares policies
in their steady state, not their first fill.

Policies: `fixed:N`, the preset's `schedule` (its `instances`, timezone and cron schedules) and
`target:R`, which calls `prebuilds.sizing.desired_size` on the demand recorded **before** the
simulated moment (the look-back window, refreshed once per simulated hour: the figures are
hourly anyway), so a backtest never peeks at the demand it is scored on.

Deterministic: the same inputs and seed give the same report. Every policy draws from its own
generator seeded with the same seed, so policies face the same sequence of build durations.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import random
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from prebuilds.pacing import Demand as PacingDemand
from prebuilds.pacing import allowed_creations
from prebuilds.reconciliation import (
    ActionType,
    PrebuildInfo,
    PrebuildSchedule,
    PresetSnapshot,
    calculate_actions,
    calculate_desired_instances,
)
from prebuilds.sizing import Demand, SizingGoal, desired_size, hour_of_week, percentile

LOOKBACK_DAYS = 28


@dataclass(frozen=True)
class Policy:
    """How the simulated pool is sized: `kind` is "fixed", "schedule" or "target"."""

    kind: str
    instances: int = 0  # fixed: the size; schedule and target: the fallback `instances`
    target_hit_rate: float = 0.0
    min_instances: int = 0
    max_instances: int | None = None
    timezone: str = ""
    schedules: tuple[PrebuildSchedule, ...] = ()
    label: str = ""

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        if self.kind == "fixed":
            return f"fixed:{self.instances}"
        if self.kind == "target":
            return f"target:{self.target_hit_rate:g}"
        return self.kind


@dataclass(frozen=True)
class PolicyReport:
    """What one policy did over the scored window (the contract's keys, DESIGN.md section 8)."""

    policy: str
    requests: int
    hit_rate: float | None  # None without requests
    misses: int
    wait_p95_s: float
    idle_prebuild_hours: float
    builds: int

    def as_dict(self) -> dict[str, object]:
        return {
            "policy": self.policy,
            "requests": self.requests,
            "hit_rate": None if self.hit_rate is None else round(self.hit_rate, 4),
            "misses": self.misses,
            "wait_p95_s": round(self.wait_p95_s, 1),
            "idle_prebuild_hours": round(self.idle_prebuild_hours, 2),
            "builds": self.builds,
        }


def parse_policy(text: str) -> Policy:
    """`fixed:N`, `schedule` or `target:R` (0 < R < 1); ValueError with a message otherwise."""
    kind, _, value = text.partition(":")
    if kind == "fixed":
        if not value.isdigit():
            raise ValueError(
                f"fixed needs a whole number of instances, e.g. fixed:3 (got {text!r})"
            )
        return Policy("fixed", instances=int(value))
    if kind == "schedule" and not value:
        return Policy("schedule")
    if kind == "target":
        try:
            rate = float(value)
        except ValueError:
            rate = math.nan
        if not 0 < rate < 1:
            raise ValueError(
                f"target needs a hit rate between 0 and 1, e.g. target:0.95 (got {text!r})"
            )
        return Policy("target", target_hit_rate=rate)
    raise ValueError(f"unknown policy {text!r} (use fixed:N, schedule or target:R)")


class _History:
    """The demand recorded before a simulated moment, as `prebuilds.sizing.Demand`.

    Bursts (one minute, its request count) enter the hour-of-week histogram when their minute is
    over and leave it when they fall out of the look-back window; both pointers only move
    forward, so a whole backtest costs one pass over the bursts.
    """

    def __init__(self, requests: Sequence[datetime], lookback: timedelta) -> None:
        counts: dict[datetime, int] = defaultdict(int)
        for at in requests:
            counts[at.replace(second=0, microsecond=0)] += 1
        self.bursts = sorted(counts.items())
        self.lookback = lookback
        self.first = self.bursts[0][0] if self.bursts else None
        self.histogram: dict[int, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        self.lo = self.hi = 0

    def at(self, now: datetime) -> Demand:
        start = now - self.lookback
        while self.hi < len(self.bursts) and self.bursts[self.hi][0] + timedelta(minutes=1) <= now:
            minute, size = self.bursts[self.hi]
            self.histogram[hour_of_week(minute)][size] += 1
            self.hi += 1
        while self.lo < self.hi and self.bursts[self.lo][0] < start:
            minute, size = self.bursts[self.lo]
            slot = self.histogram[hour_of_week(minute)]
            slot[size] -= 1
            if not slot[size]:
                del slot[size]
            self.lo += 1
        days = 0.0
        if self.first is not None and self.first < now:
            days = (now - max(self.first, start)).total_seconds() / 86400
        return Demand(
            history_days=days,
            bursts={hour: dict(sizes) for hour, sizes in self.histogram.items() if sizes},
        )


def simulate(
    *,
    policy: Policy,
    requests: Sequence[datetime],
    build_seconds: Sequence[float],
    start: datetime,
    end: datetime,
    interval: float = 15.0,
    seed: int = 0,
    lookback: timedelta = timedelta(days=LOOKBACK_DAYS),
    max_in_flight: int = 0,
    max_in_flight_per_preset: int = 0,
) -> PolicyReport:
    """Replay the requests in `[start, end)` under `policy`; earlier requests are history only.

    `build_seconds` are the recorded build durations a build's duration is drawn from (at least
    one). The in-flight caps (`PREBUILDS_MAX_IN_FLIGHT` and `_PER_PRESET`, 0: none) pace
    creations through the reconciler's own `prebuilds.pacing.allowed_creations`, the simulated
    preset being alone in the deployment. Returns the policy's report over `[start, end)`.
    """
    if not build_seconds:
        raise ValueError("at least one build duration is needed")
    if interval <= 0:
        raise ValueError("interval must be positive")
    rng = random.Random(seed)
    durations = list(build_seconds)
    ordered = sorted(requests)
    history = _History(ordered, lookback)
    scored = ordered[bisect.bisect_left(ordered, start) : bisect.bisect_left(ordered, end)]
    preset_id = uuid.UUID(int=0)
    ids = (uuid.UUID(int=n) for n in itertools.count(1))
    sizer = _TargetSizer(policy, history, durations) if policy.kind == "target" else None

    def desired(now: datetime) -> int:
        if sizer is not None:
            return sizer.desired(now)
        if policy.kind == "fixed":
            return policy.instances
        return _scheduled(policy, now)

    # The pool starts full and ready.
    ready: list[PrebuildInfo] = [
        PrebuildInfo(next(ids), start - timedelta(seconds=1), True) for _ in range(desired(start))
    ]
    finishing: list[datetime] = []  # heap of build completion times
    hits = misses = builds = 0
    waits: list[float] = []
    idle_seconds = 0.0
    clock = start
    step = timedelta(seconds=interval)
    next_pass = start
    index = 0

    def advance(to: datetime) -> None:
        nonlocal idle_seconds, clock
        idle_seconds += len(ready) * (to - clock).total_seconds()
        clock = to

    while True:
        # The next event: a build finishing, a request, or a pass (in that order on ties).
        candidates = [next_pass]
        if finishing:
            candidates.append(finishing[0])
        if index < len(scored):
            candidates.append(scored[index])
        moment = min(candidates)
        if moment >= end:
            break
        advance(moment)
        if finishing and finishing[0] == moment:
            heapq.heappop(finishing)
            ready.append(PrebuildInfo(next(ids), moment, True))
            continue
        if index < len(scored) and scored[index] == moment:
            index += 1
            if ready:
                # The claim takes the oldest ready prebuild (the real claim takes any).
                ready.pop(0)
                hits += 1
                waits.append(0.0)
            else:
                misses += 1
                waits.append(rng.choice(durations))
            continue
        snapshot = PresetSnapshot(
            preset_id=preset_id,
            desired_instances=desired(moment),
            running=tuple(ready),
            starting=len(finishing),
        )
        for action in calculate_actions(snapshot, moment, timedelta(0)):
            if action.type is ActionType.CREATE:
                in_flight = len(finishing)
                demand = PacingDemand(
                    key=preset_id,
                    want=action.create,
                    in_flight=in_flight,
                    supply=len(ready) + in_flight,
                )
                count = allowed_creations(
                    [demand],
                    in_flight_total=in_flight,
                    limit=max_in_flight,
                    per_preset_limit=max_in_flight_per_preset,
                )[preset_id]
                for _ in range(count):
                    done = moment + timedelta(seconds=rng.choice(durations))
                    heapq.heappush(finishing, done)
                builds += count
            elif action.type is ActionType.DELETE:
                gone = set(action.delete_ids)
                ready = [prebuild for prebuild in ready if prebuild.id not in gone]
        next_pass = moment + step
    advance(end)
    total = hits + misses
    return PolicyReport(
        policy=policy.name,
        requests=total,
        hit_rate=hits / total if total else None,
        misses=misses,
        wait_p95_s=percentile(waits, 95),
        idle_prebuild_hours=idle_seconds / 3600,
        builds=builds,
    )


class _TargetSizer:
    """`target:R` in simulated time: `desired_size` on the demand recorded before each moment.

    The demand figures are refreshed at each simulated hour; within it, a size is computed once
    per (hour of the week now, one refill ahead, fallback), the only inputs that can change.
    """

    def __init__(self, policy: Policy, history: _History, durations: Sequence[float]) -> None:
        self.policy = policy
        self.history = history
        self.durations = durations
        self.refill = timedelta(seconds=percentile(durations, 90))
        self.goal = SizingGoal(policy.target_hit_rate, policy.min_instances, policy.max_instances)
        self.hour: datetime | None = None
        self.demand = Demand(history_days=0.0)
        self.sizes: dict[tuple[int, int, int], int] = {}

    def desired(self, now: datetime) -> int:
        hour = now.replace(minute=0, second=0, microsecond=0)
        if hour != self.hour:
            self.hour, self.demand = hour, self.history.at(hour)
            self.sizes.clear()
        fallback = _scheduled(self.policy, now)
        key = (hour_of_week(now), hour_of_week(now + self.refill), fallback)
        if key not in self.sizes:
            self.sizes[key] = desired_size(
                goal=self.goal,
                demand=self.demand,
                build_seconds=self.durations,
                now=now,
                fallback=fallback,
            ).desired
        return self.sizes[key]


def _scheduled(policy: Policy, now: datetime) -> int:
    """The `instances`/schedule size at `now`, through the core's own rule."""
    snapshot = PresetSnapshot(
        preset_id=uuid.UUID(int=0),
        desired_instances=policy.instances,
        timezone=policy.timezone,
        schedules=policy.schedules,
    )
    return calculate_desired_instances(snapshot, now)
