"""The benchmark modules run end to end at a tiny scale and answer their keys with the right types.

Real processes against the test database (transactional: the subprocesses must see committed
rows). The numbers are not checked — only that each measurement ran, found no correctness
problem (double claims, spurious reinits, errors) and left no process behind.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks import claim, floors, reinit

pytestmark = pytest.mark.django_db(transaction=True)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


def _bench_processes() -> list[int]:
    """Live processes still tied to a benchmark session directory that is already gone.

    Web and worker carry ``DATA_DIR=/tmp/warmstart-bench-…`` in their environment, agents run
    in a workspace directory under it. A session removes its directory when it ends, so a
    process pointing into a removed one is a leftover (a concurrent run's live ones are not).
    """
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            places = [os.readlink(entry / "cwd").encode()]
            places += (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for place in places:
            start = place.find(b"/tmp/warmstart-bench-")
            if start < 0:
                continue
            session_dir = place[start:].split(b"/")[:3]
            if not Path(b"/".join(session_dir).decode(errors="replace")).exists():
                found.append(int(entry.name))
                break
    return found


def test_floors_answer_their_keys():
    results = floors.claim_floor(20) | floors.notify_floor(20)
    for key in ("claim_floor_p50_ms", "notify_floor_p99_ms", "claim_floor_one_statement_p50_ms"):
        assert _number(results[key]), key
    assert results["notify_floor_lost"] == 0


def test_claim_api_answers_its_keys_without_double_claims():
    results = claim.measure_api(per_client=2, clients=3)
    for key in ("claim_api_p50_ms", "claim_api_p99_ms", "claim_api_rps"):
        assert _number(results[key]), key
    assert results["claim_api_requests"] == 6
    assert results["double_claims"] == 0
    assert results["claim_api_errors"] == 0
    assert results["claim_api_not_claimed"] == 0
    assert not _bench_processes()


def test_reinit_delivers_each_claim_once_and_nothing_else():
    results = reinit.measure(waiters=20, claims=3)
    assert _number(results["reinit_delivery_p99_ms"])
    assert results["reinit_waiters"] == 20
    assert results["reinit_missed"] == 0
    assert results["reinit_spurious"] == 0
    assert results["reinit_errors"] == 0
    assert not _bench_processes()


@pytest.mark.slow
def test_ready_cold_and_claimed_with_real_processes():
    results = claim.measure_ready(claims=1, colds=1)
    for key in ("claim_ready_p50_ms", "cold_ready_p50_ms", "ready_speedup"):
        assert _number(results[key]), key
    assert results["claim_ready_samples"] == 1
    assert results["cold_ready_samples"] == 1
    assert not _bench_processes()


@pytest.mark.slow
def test_mixed_load_runs_the_whole_system_and_answers_its_keys():
    from benchmarks import mixed

    results = mixed.measure(
        pool=4, claim_seconds=1.0, rate=2.0, burst=2, ready_timeout=60, interval=2.0
    )

    assert results["mixed_claims"] == 4
    assert results["mixed_errors"] == 0
    assert results["mixed_pool_size"] == 4
    hits = results["mixed_claims"] - results["mixed_missed"]
    assert hits >= 1  # the claims start once a prebuild is ready
    assert results["mixed_claim_ready_samples"] == hits
    assert results["mixed_claim_ready_timeouts"] == 0
    for key in (
        "mixed_claim_ready_p50_ms",
        "mixed_claim_ready_p99_ms",
        "mixed_reconcile_gap_max_s",
    ):
        assert _number(results[key]), key
    assert results["mixed_refill_start_samples"] == hits  # the passes replaced every claim
    assert results["mixed_refill_pending"] == 0
    assert results["mixed_metrics_scrape_errors"] == 0
    assert not _bench_processes()
