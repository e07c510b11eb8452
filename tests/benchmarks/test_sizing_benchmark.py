"""The sizing benchmark's synthetic trace has the shape the README claims, and the benchmark
answers its keys (simulated time only: no database, no servers)."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

from benchmarks import sizing


def test_the_trace_has_weekday_peaks_quiet_nights_and_weekends_and_bursts_of_20():
    requests, builds = sizing.synthetic_trace()
    week = [at for at in requests if at >= sizing.WEEK_START]
    peak = sum(1 for at in week if at.weekday() < 5 and 9 <= at.hour < 17)
    night = sum(1 for at in week if at.weekday() < 5 and at.hour < 7)
    weekend = sum(1 for at in week if at.weekday() >= 5)
    assert peak > 10 * (night + weekend)
    per_minute = Counter(at.replace(second=0, microsecond=0) for at in week)
    bursts = [minute for minute, count in per_minute.items() if count >= sizing.BURST]
    assert [(m.weekday(), m.hour) for m in sorted(bursts)] == list(sizing.BURSTS)
    # Long-tailed build durations: the slowest are several times the median.
    ordered = sorted(builds)
    assert ordered[-1] > 3 * ordered[len(ordered) // 2]
    assert requests == sorted(requests)
    assert min(requests) < sizing.WEEK_START - timedelta(weeks=3)  # history before the week


def test_the_trace_is_the_same_for_a_seed():
    assert sizing.synthetic_trace(5) == sizing.synthetic_trace(5)
    assert sizing.synthetic_trace(5) != sizing.synthetic_trace(6)


def test_the_benchmark_answers_its_keys():
    results = sizing.run(quick=True)
    assert 0 < results["sizing_hit_rate"] <= 1
    assert results["sizing_fixed_size"] >= 1
    assert results["sizing_trace_requests"] > 0
    # The fixed pool reported is the smallest reaching the target policy's hit rate.
    assert results["sizing_fixed_hit_rate"] >= results["sizing_hit_rate"]
    assert results["sizing_fixed_below_hit_rate"] < results["sizing_hit_rate"]
    # (The idle hours are reported rounded to 0.1 h, the ratio from the exact figures.)
    ratio = results["sizing_target_idle_hours"] / results["sizing_fixed_idle_hours"]
    assert abs(results["sizing_idle_ratio"] - ratio) < 0.01
