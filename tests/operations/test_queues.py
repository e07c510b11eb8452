"""Queues by role under load, with real processes: the production layout of ``make run``.

One web process, and three Celery workers by role (``workspaces.routing``): people's builds,
prebuild builds, and the control plane (passes, refills, sweeps), plus beat. The scenarios are
the ones a busy Monday morning produces: a pool fill of a hundred builds while people claim,
a paced fill, and a claim whose replacement must not wait for the next interval.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import httpx
import pytest

from tests.operations.cluster import Cluster, Setup, wait_until

pytestmark = pytest.mark.slow

# Prebuild builds in flight (pending or running), per preset, from the test process.
IN_FLIGHT_SQL = """
SELECT b.preset_id, count(*)
  FROM workspaces_workspacebuild b
  JOIN workspaces_provisionerjob j ON j.id = b.job_id
 WHERE b.reason = 'prebuild' AND j.status IN ('pending', 'running')
 GROUP BY b.preset_id
"""


def start_roles(cluster: Cluster, *, prebuild_slots: int, beat: bool = True) -> None:
    cluster.web("web")
    cluster.worker("builds", role="builds", concurrency=2)
    cluster.worker("prebuilds", role="prebuilds", concurrency=prebuild_slots)
    cluster.worker("control", role="control", concurrency=2)
    if beat:
        cluster.beat("beat")


def claim(cluster: Cluster, setup: Setup, preset: str, user: dict[str, str]) -> dict:
    response = httpx.post(
        cluster.access_url + "/api/v2/workspaces",
        json={"name": f"dev-{user['username']}", "template_version_preset_id": preset},
        headers={"Authorization": f"Bearer {user['token']}"},
        timeout=30,
    )
    assert response.status_code == 201, response.text
    document = response.json()
    assert document["claimed_prebuild"], document
    return document


def lock_held_passes(cluster: Cluster, since) -> list:
    return [
        started
        for (started,) in cluster.query(
            "SELECT started_at FROM prebuilds_reconciliationpass "
            "WHERE lock_acquired AND started_at >= %s ORDER BY started_at",
            (since,),
        )
    ]


def db_now(cluster: Cluster):
    return cluster.query("SELECT now()")[0][0]


def test_a_claim_starts_first_while_a_hundred_prebuild_builds_wait_and_passes_stay_on_time(
    cluster: Cluster,
):
    """Every prebuild slot busy and a hundred prebuild builds queued (no in-flight cap): a
    claim's build starts before every one of them, the claimed workspace is ready for its owner
    while they still wait, and reconciliation passes keep their interval throughout (the latest
    pass's figures, which ``/metrics`` serves, follow the change within two intervals)."""
    interval = 2.0
    cluster.overrides.update(
        PREBUILDS_RECONCILIATION_INTERVAL=str(interval),
        PREBUILDS_MAX_IN_FLIGHT="0",
        PREBUILDS_MAX_IN_FLIGHT_PER_PRESET="0",
    )
    setup = cluster.setup(slow_step=3, users=1, instances=1)
    alpha, beta, _gamma = setup.presets
    start_roles(cluster, prebuild_slots=2)
    wait_until(
        lambda: cluster.pools_full(setup.presets, 1),
        120,
        what="the pools to fill",
        diagnose=cluster.diagnose,
    )

    cluster.query(
        "UPDATE workspaces_templateversionpreset SET desired_instances = 100 "
        "WHERE id = %s RETURNING id",
        (beta,),
    )

    def backlog() -> tuple[int, int]:
        rows = cluster.query(
            "SELECT count(*) FILTER (WHERE j.status = 'pending'), "
            "       count(*) FILTER (WHERE j.status = 'running') "
            "FROM workspaces_workspacebuild b JOIN workspaces_provisionerjob j ON j.id = b.job_id "
            "WHERE b.reason = 'prebuild' AND b.preset_id = %s",
            (beta,),
        )
        return rows[0]

    wait_until(
        lambda: backlog()[0] >= 90 and backlog()[1] == 2,
        30,
        what="99 prebuild builds queued behind 2 running ones",
        diagnose=lambda: f"backlog {backlog()}\n{cluster.diagnose()}",
    )
    backlogged_at = db_now(cluster)
    # The latest pass saw the new size: /metrics' gauges come from it.
    wait_until(
        lambda: (
            cluster.query(
                "SELECT preset_counts -> %s ->> 0 FROM prebuilds_reconciliationpass "
                "WHERE lock_acquired ORDER BY started_at DESC LIMIT 1",
                (beta,),
            )[0][0]
            == "100"
        ),
        2 * interval,
        what="the latest pass to show the new desired size",
    )

    document = claim(cluster, setup, alpha, setup.users[0])
    [(job_id, created, started)] = wait_until(
        lambda: cluster.query(
            "SELECT j.id, j.created_at, j.started_at FROM workspaces_workspacebuild b "
            "JOIN workspaces_provisionerjob j ON j.id = b.job_id "
            "WHERE b.workspace_id = %s AND b.is_claim AND j.started_at IS NOT NULL",
            (document["id"],),
        ),
        30,
        what="the claim build to start",
        diagnose=cluster.diagnose,
    )
    overtaken = cluster.query(
        "SELECT count(*) FROM workspaces_workspacebuild b "
        "JOIN workspaces_provisionerjob j ON j.id = b.job_id "
        "WHERE b.reason = 'prebuild' AND j.created_at < %s "
        "AND (j.started_at IS NULL OR j.started_at > %s)",
        (created, started),
    )[0][0]
    waited = (started - created).total_seconds()
    assert overtaken >= 85, f"the claim started after the prebuild builds ({overtaken} behind)"
    assert waited < 5, f"the claim build waited {waited:.3f} s for a worker"
    wait_until(
        lambda: cluster.workspaces_ready_for_owner([document["id"]]),
        30,
        what="the claimed workspace to be ready for its owner",
        diagnose=cluster.diagnose,
    )
    assert backlog()[0] >= 80  # still a backlog: all of the above happened behind it

    # Passes on time through the whole backlog, whatever the build queues hold.
    time.sleep(3 * interval)
    passes = lock_held_passes(cluster, backlogged_at)
    gaps = [(b - a).total_seconds() for a, b in zip(passes, passes[1:], strict=False)]
    assert len(passes) >= 4, passes
    assert max(gaps) <= 2 * interval, f"gap between passes: {max(gaps):.2f} s ({gaps})"
    print(f"claim build waited {waited * 1000:.0f} ms; pass gaps max {max(gaps):.2f} s")


def test_the_in_flight_cap_holds_while_pools_fill_and_finished_builds_keep_the_fill_moving(
    cluster: Cluster,
):
    """Caps of 4 in flight (2 per preset), 15 prebuilds to build, and passes only once a
    minute: the caps are never exceeded, and the pools still fill well within that minute,
    because each finished prebuild build asks for the pass that queues the next one."""
    cluster.overrides.update(
        PREBUILDS_RECONCILIATION_INTERVAL="60",
        PREBUILDS_MAX_IN_FLIGHT="4",
        PREBUILDS_MAX_IN_FLIGHT_PER_PRESET="2",
    )
    setup = cluster.setup(slow_step=0.5, instances=5)
    start_roles(cluster, prebuild_slots=4, beat=False)
    peak: Counter[str] = Counter()
    peak_total = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak_total
        while not stop.is_set():
            counts = {str(preset): n for preset, n in cluster.query(IN_FLIGHT_SQL)}
            peak_total = max(peak_total, sum(counts.values()))
            for preset, n in counts.items():
                peak[preset] = max(peak[preset], n)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        started = time.monotonic()
        cluster.manage("reconcile_prebuilds")  # the first pass; no periodic one follows
        wait_until(
            lambda: cluster.pools_full(setup.presets, 5),
            55,
            what="the pools to fill on event-driven passes alone",
            diagnose=lambda: f"peak {peak_total} {dict(peak)}\n{cluster.diagnose()}",
        )
        filled_in = time.monotonic() - started
    finally:
        stop.set()
        sampler.join(10)

    assert peak_total == 4, peak_total  # reached, never exceeded
    assert max(peak.values()) == 2 and len(peak) == 3, peak
    built = cluster.query(
        "SELECT count(*) FROM workspaces_workspacebuild WHERE reason = 'prebuild'"
    )[0][0]
    assert built == 15  # paced, not over-built
    print(f"15 prebuilds, at most 4 in flight, filled in {filled_in:.1f} s")


def test_a_claims_replacement_starts_at_once_not_at_the_next_interval(cluster: Cluster):
    """Passes once a minute; after a claim the replacement's build starts within seconds:
    the claim asked for a pass right after it committed."""
    cluster.overrides.update(PREBUILDS_RECONCILIATION_INTERVAL="60")
    setup = cluster.setup(slow_step=0.2, users=1, instances=2)
    alpha = setup.presets[0]
    start_roles(cluster, prebuild_slots=2, beat=False)
    cluster.manage("reconcile_prebuilds")
    wait_until(
        lambda: cluster.pools_full(setup.presets, 2),
        60,
        what="the pools to fill",
        diagnose=cluster.diagnose,
    )
    before = {
        str(w)
        for (w,) in cluster.query(
            "SELECT workspace_id FROM workspaces_workspacebuild WHERE reason = 'prebuild'"
        )
    }

    document = claim(cluster, setup, alpha, setup.users[0])
    claimed_at = cluster.query(
        "SELECT claimed_at FROM workspaces_workspace WHERE id = %s", (document["id"],)
    )[0][0]

    def replacement_started():
        rows = cluster.query(
            "SELECT b.workspace_id, j.started_at FROM workspaces_workspacebuild b "
            "JOIN workspaces_provisionerjob j ON j.id = b.job_id "
            "WHERE b.reason = 'prebuild' AND b.preset_id = %s AND j.started_at IS NOT NULL",
            (alpha,),
        )
        return [started for workspace, started in rows if str(workspace) not in before]

    [started] = wait_until(replacement_started, 20, what="the replacement's build to start")
    delay = (started - claimed_at).total_seconds()
    assert delay < 10, f"the replacement started {delay:.2f} s after the claim"
    print(f"claim commit -> replacement build started: {delay * 1000:.0f} ms")
    wait_until(
        lambda: cluster.pools_full(setup.presets, 2),
        30,
        what="the pool to refill",
        diagnose=cluster.diagnose,
    )
    # Since the claim: its pass, and the one the replacement's finished build asked for (plus,
    # at most, the one the fill's last build asked for, if that came late).
    assert 2 <= len(lock_held_passes(cluster, claimed_at)) <= 3
