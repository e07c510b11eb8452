"""Pool sizing by a goal: the smallest pool that serves a target share of claim requests warm.

Pure arithmetic (no Django, no database), like `prebuilds.reconciliation`: the snapshot supplies
the recorded demand (`Demand`) and build durations, `desired_size` answers with a size and a
sentence saying why. The reconciler and `simulate_prebuilds` both call it, so a backtest runs the
same rule as production.

The model (documented in the README, "Sizing pools by a goal"):

- Every claim takes one prebuild and the reconciler starts its replacement, which is ready one
  *refill time* R later (the p90 of recent prebuild build durations: a high percentile so a
  slow tail does not leave the pool short). A pool of N prebuilds is therefore N "slots", each
  busy refilling for R after a claim; a request that finds every slot refilling is a miss (it
  gets a cold build and does not consume a slot). That is a *loss system* (Erlang's M/G/N/N).
- Requests arrive in *bursts*: all requests of one preset in the same minute are one burst. Bursts
  arrive as a Poisson stream whose rate, and burst-size histogram, are read from the same hour
  of the week over the look-back window. Single requests are bursts of size 1, and then the
  answer is exactly Erlang B.
- The **hit share** is the expected share of *requests* served warm,
  ``E[hits per burst] / E[burst size]``, where an arriving burst sees the long-run distribution of
  busy slots (Poisson arrivals see time averages). This is deliberately not ``P(no miss during
  one refill)`` (``P(arrivals in R <= N)``): that answers "how often is a refill window perfect",
  which over-sizes pools and is not the figure the operator sets or the dashboards measure.
- Busy slots: a birth-death chain with batch births. The long-run distribution is computed by
  the level-crossing recursion (the chain only steps *down* one at a time), in O(N^2), exact for
  exponential refill times and a close approximation otherwise (for single requests Erlang B
  is exact for any refill-time distribution).
- The pool is sized for the busier of the current hour of the week and the hour one refill
  ahead, so it grows *before* a peak starts rather than one refill into it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

HOURS_PER_WEEK = 168
# Below these, the recorded figures say too little: the preset falls back to `instances` or its
# schedule. A week covers every hour of the week once.
MIN_HISTORY_DAYS = 7.0
MIN_BUILD_SAMPLES = 3
REFILL_PERCENTILE = 90


@dataclass(frozen=True)
class SizingGoal:
    """What the preset declares: serve `target_hit_rate` of requests warm, within the bounds."""

    target_hit_rate: float
    min_instances: int = 0
    max_instances: int | None = None

    def __post_init__(self) -> None:
        if not 0 < self.target_hit_rate < 1:
            raise ValueError(
                f"target_hit_rate must be between 0 and 1 (got {self.target_hit_rate})"
            )
        if self.min_instances < 0:
            raise ValueError(f"min_instances must be >= 0 (got {self.min_instances})")
        if self.max_instances is not None and self.max_instances < self.min_instances:
            raise ValueError(
                f"max_instances ({self.max_instances}) must be >= min_instances "
                f"({self.min_instances})"
            )

    def clamp(self, size: int) -> int:
        size = max(size, self.min_instances)
        return size if self.max_instances is None else min(size, self.max_instances)


@dataclass(frozen=True)
class Demand:
    """Recorded claim requests of one preset over a look-back window.

    `bursts[hour_of_week]` maps a burst size to the number of minutes of that hour of the week
    (Monday 00:00-00:59 UTC is 0) in which exactly that many requests arrived. `history_days` is
    how much of the window the record covers (from the first recorded request, at most the
    window): the number of times each hour of the week was observed is `history_days / 7`.
    """

    history_days: float
    bursts: Mapping[int, Mapping[int, int]] = field(default_factory=dict)

    @property
    def requests(self) -> int:
        return sum(size * count for slot in self.bursts.values() for size, count in slot.items())

    def slot_requests(self, hour_of_week: int) -> int:
        return sum(size * count for size, count in self.bursts.get(hour_of_week, {}).items())


@dataclass(frozen=True)
class Sizing:
    """The answer: the desired pool size, the policy that gave it and why, in one sentence."""

    desired: int
    policy: str  # "target" (derived from demand) or "fallback" (history too short)
    reason: str


def hour_of_week(moment: datetime) -> int:
    """0 for Monday 00:00-00:59 UTC, 167 for Sunday 23:00-23:59 UTC."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"moment must be timezone-aware, got naive {moment.isoformat()}")
    utc = moment.astimezone(UTC)
    return utc.weekday() * 24 + utc.hour


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (an observed value, never an interpolation); 0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(math.ceil(pct / 100 * len(ordered)), 1)
    return ordered[rank - 1]


def hit_share(
    pool: int, burst_rate: float, burst_sizes: Mapping[int, float], refill: float
) -> float:
    """Long-run share of requests served warm by a pool of `pool` slots.

    `burst_rate`: bursts per unit of time; `burst_sizes`: probability of each burst size;
    `refill`: mean time a slot stays busy after a claim (same unit). 1.0 without demand.
    """
    for size, share in enumerate(_hit_shares(burst_rate, burst_sizes, refill)):
        if size == pool:
            return share
    raise AssertionError("unreachable: the generator is endless")


def _hit_shares(
    burst_rate: float, burst_sizes: Mapping[int, float], refill: float
) -> Iterator[float]:
    """`hit_share` for the pool sizes 0, 1, 2, ... (endless): the n-th costs O(n + burst sizes),
    so a search that stops at the answer N costs O(N^2)."""
    mean_size = sum(size * p for size, p in burst_sizes.items())
    if burst_rate <= 0 or refill <= 0 or mean_size <= 0:
        while True:
            yield 1.0
    load = burst_rate * refill  # bursts arriving during one refill
    largest = max(burst_sizes)

    def tail(k: int) -> float:  # P(size > k)
        return sum(p for size, p in burst_sizes.items() if size > k) if k < largest else 0.0

    # Level crossing between i and i+1 busy slots: the up-flow from every j <= i whose burst
    # reaches past i equals the down-flow of (i+1) refills ending. These unnormalised weights
    # (pi_0 = 1) do not depend on the pool size: a pool of N truncates the chain at N, and the
    # flow into N is everything that would have crossed past N-1.
    tails = [tail(k) for k in range(largest + 1)]
    # E[min(size, k)] = P(size > 0) + ... + P(size > k-1): what a burst gets from k free slots.
    expected_min = [0.0]
    weights = [1.0]
    yield 0.0
    pool = 0
    while True:
        i = pool
        up = load * sum(weights[j] * tails[i - j] for j in range(max(0, i - largest), i + 1))
        weights.append(up / (i + 1))
        pool += 1
        expected_min.append(expected_min[-1] + (tails[pool - 1] if pool - 1 <= largest else 0.0))
        total = sum(weights)
        if total > 1e200:  # only ratios matter: rescale before floats overflow
            weights = [weight / total for weight in weights]
            total = 1.0
        served = sum(weights[busy] * expected_min[pool - busy] for busy in range(pool))
        yield served / total / mean_size


def desired_size(
    *,
    goal: SizingGoal,
    demand: Demand,
    build_seconds: Sequence[float],
    now: datetime,
    fallback: int,
) -> Sizing:
    """The smallest pool within the goal's bounds whose hit share reaches the target.

    Falls back to `fallback` (the preset's `instances` or schedule at `now`), clamped to the
    bounds, while the demand covers less than `MIN_HISTORY_DAYS` or fewer than
    `MIN_BUILD_SAMPLES` build durations are known. With no requests in the hours considered, the
    answer is `min_instances`. Deterministic: the same inputs give the same size and reason.
    """
    if demand.history_days < MIN_HISTORY_DAYS or len(build_seconds) < MIN_BUILD_SAMPLES:
        size = goal.clamp(fallback)
        missing = (
            f"{demand.history_days:.1f} of {MIN_HISTORY_DAYS:.0f} days of requests"
            if demand.history_days < MIN_HISTORY_DAYS
            else f"{len(build_seconds)} of {MIN_BUILD_SAMPLES} build durations"
        )
        return Sizing(
            size,
            "fallback",
            f"desired {size}: history too short ({missing}); "
            f"using instances/schedule ({fallback}){_bounds_note(goal, fallback, size)}",
        )

    refill = percentile(build_seconds, REFILL_PERCENTILE)
    weeks = demand.history_days / 7
    hours = (hour_of_week(now), hour_of_week(now + timedelta(seconds=refill)))
    # The busier of the two hours decides (more requests per minute; ties: the current hour).
    slot = max(dict.fromkeys(hours), key=demand.slot_requests)
    histogram = demand.bursts.get(slot, {})
    bursts = sum(histogram.values())
    requests = demand.slot_requests(slot)
    history = f"from {demand.requests:,} requests over {demand.history_days:.0f} days"
    pct = f"{goal.target_hit_rate * 100:g} %"
    if requests == 0:
        size = goal.clamp(0)
        return Sizing(
            size, "target", f"desired {size}: no requests in this hour of the week; {history}"
        )

    burst_rate = bursts / (weeks * 3600)  # per second
    sizes = {size: count / bursts for size, count in histogram.items()}
    needed = _smallest_pool(goal, burst_rate, sizes, refill)
    size = goal.clamp(needed)
    per_minute = requests / (weeks * 60)
    largest = max(histogram)
    burst_note = f" (bursts up to {largest})" if largest > 1 else ""
    reason = (
        f"desired {size}: {_rate(per_minute)} requests/min{burst_note} × {refill / 60:.1f} min "
        f"refill (p{REFILL_PERCENTILE}) → {pct} needs {needed}; {history}"
        f"{_bounds_note(goal, needed, size)}"
    )
    return Sizing(size, "target", reason)


def _smallest_pool(
    goal: SizingGoal, burst_rate: float, sizes: Mapping[int, float], refill: float
) -> int:
    # The search goes past max_instances on purpose: the reason then says what the goal would
    # need ("needs 9 (capped at max_instances 4)"). The share grows with the pool and reaches
    # any target below 1; the ceiling (the largest burst plus ten times the requests of one
    # refill, or max_instances) only guards against a pathological input.
    load = burst_rate * refill * sum(size * p for size, p in sizes.items())
    ceiling = max(goal.max_instances or 0, max(sizes) + math.ceil(10 * load) + 10)
    for pool, share in enumerate(_hit_shares(burst_rate, sizes, refill)):
        if share >= goal.target_hit_rate or pool >= ceiling:
            return pool
    raise AssertionError("unreachable: the generator is endless")


def _rate(per_minute: float) -> str:
    # One decimal reads well at busy hours; a quiet hour keeps two significant digits
    # ("0.012"), never a misleading "0.0".
    return f"{per_minute:.1f}" if per_minute >= 0.1 else f"{per_minute:.2g}"


def _bounds_note(goal: SizingGoal, needed: int, size: int) -> str:
    if size > needed:
        return f" (raised to min_instances {goal.min_instances})"
    if size < needed:
        return f" (capped at max_instances {goal.max_instances})"
    return ""
