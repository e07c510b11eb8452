"""Whole-system mixed load: claims, then a burst of them, while a large pool fills.

DESIGN.md section 10, ``mixed_*`` keys. Everything runs as it does for a user: the processes
``make run`` starts (``config.launcher``: the uvicorn web process, the Celery worker(s) and
Celery beat), on the scratch database with a broker and ``DATA_DIR`` of their own
(``benchmarks.processes.Session``), the ``local`` provisioner starting real agent processes,
and the demo template (``examples/templates/demo.toml``) with its slow first-time step shortened
from 3 x 2 s to 3 x ``SLOW_STEP_SECONDS`` so a 200-prebuild fill fits in the benchmark's time.

The run:

1. the template is pushed with a pool of ``POOL`` prebuilds (``--quick``: ``QUICK_POOL``) and
   one pass is run at once (as an operator's "Reconcile now" would): the fill starts;
   beat's periodic passes (``PREBUILDS_RECONCILIATION_INTERVAL``) do the rest;
2. once ``START_SHARE`` of the pool is ready (the fill well under way, most of it still
   queued or building), claims arrive at ``CLAIM_RATE`` a second for ``CLAIM_SECONDS``
   (open loop: each at its time, whatever the answers to earlier ones), then ``BURST`` at once,
   each ``POST /api/v2/workspaces`` by a user of its own with the pooled preset;
3. the run lasts until every claim that got a prebuild is ready for its owner and has a
   replacement building, or ``READY_TIMEOUT`` after the burst; meanwhile ``/metrics`` is
   scraped every second.

Keys:

- ``mixed_claim_ready_p50_ms`` / ``_p99_ms``: claim request sent → every current agent of the
  claimed workspace ready *for the new owner* (``lifecycle_state`` ready,
  ``initialized_owner_id`` the owner, changed after ``claimed_at``), from the agents' rows: the
  time the web process recorded the agent's ready report, seen by polling the database every
  ``OBSERVE_INTERVAL`` (no HTTP polling: 50 workspaces polled over HTTP would be load of its
  own). A claim still not ready at the end counts with the time it had waited, so a timeout
  can only make the figures look better than the truth, never hide it
  (``mixed_claim_ready_timeouts`` says how many).
- ``mixed_claims`` (requests sent), ``mixed_missed`` (answered with a cold build: no prebuild
  was eligible; not a claim, so in none of the claim figures), ``mixed_errors`` (answers other
  than 201, transport errors included); ``mixed_claim_api_p50_ms`` / ``_p99_ms``: request sent
  → answer, over the claims that got a prebuild.
- ``mixed_reconcile_gap_max_s``: the longest gap between two passes that held the lock, over
  the run: from the last pass before it to the run's end, so a reconciler that stops running
  shows up even when no pass comes at all.
- ``mixed_refill_start_p50_ms``: claim commit (``claimed_at``) → a replacement's start build
  picked up by a worker (its job's ``started_at``). Replacements are the preset's prebuilds
  created after the first claim, matched to claims in order (the k-th claim's is the first
  unmatched one created after it); claims without a started replacement by the end are
  counted in ``mixed_refill_pending``.
- what limits the refill and the claims' tail: ``mixed_refill_at_cap`` (claims committed
  while the preset already had ``PREBUILDS_MAX_IN_FLIGHT_PER_PRESET`` prebuild builds in
  flight: their replacement waits for one of those to finish), ``mixed_refill_pass_p50_ms``
  (claim commit → the next pass holding the lock: the event-driven refill's own delay),
  ``mixed_claim_build_wait_p50_ms`` / ``_p99_ms`` and ``mixed_cold_build_wait_p50_ms`` (job
  queued → picked up by a worker, for the hits' claim builds and the misses' cold builds,
  which share the people's worker); ``mixed_claim_reinit_p99_ms`` (claim build completed →
  agents ready for the owner: the agents' part of claim → ready).
- ``mixed_metrics_staleness_max_s``: over every scrape of ``/metrics`` after the first pass,
  the scrape's time minus ``prebuilds_reconciliation_last_pass_timestamp_seconds`` (the pass
  the pool gauges come from).
- ``mixed_pool_size``: the pool's desired size.
"""

from __future__ import annotations

import secrets
import statistics
import threading
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from benchmarks import scratch_reset
from benchmarks.claim import DEMO_TEMPLATE, user_with_token
from benchmarks.processes import Session, percentile, session

POOL = 200
QUICK_POOL = 60
CLAIM_RATE = 5.0  # claims a second
CLAIM_SECONDS = 30.0
BURST = 50
START_SHARE = 0.1  # claims start once this share of the pool is ready
SLOW_STEP_SECONDS = 0.3  # the demo's "sleep 2" (three of them), shortened
FILL_START_TIMEOUT = 240.0
READY_TIMEOUT = 90.0  # after the burst
OBSERVE_INTERVAL = 0.05
SCRAPE_INTERVAL = 1.0
LAST_PASS_METRIC = "prebuilds_reconciliation_last_pass_timestamp_seconds"


@dataclass
class Claim:
    """One claim request and what became of it."""

    index: int
    user_id: str
    token: str
    sent_at: float = 0.0  # wall clock (time.time), comparable with the database's timestamps
    latency_ms: float = 0.0
    status: int = 0
    workspace_id: str | None = None
    claimed: bool = False
    # Wall clock at which the web process recorded the last agent's ready report for the owner.
    ready_at: float | None = None


# --- Set-up -----------------------------------------------------------------------------------


def push_mixed_template(*, pool: int):
    """The demo template as ``bench-mixed``, its pooled preset keeping ``pool``; that preset."""
    from accounts.services import organization_default
    from workspaces.template_files import validate_document
    from workspaces.template_services import template_push

    source = DEMO_TEMPLATE.read_text()
    document = tomllib.loads(source)
    document["name"] = "bench-mixed"
    for agent in document["agents"]:
        script = agent["startup_script"]
        agent["startup_script"] = script.replace("sleep 2", f"sleep {SLOW_STEP_SECONDS}")
        if agent["startup_script"] == script:
            raise RuntimeError(f"{DEMO_TEMPLATE}: no `sleep 2` step to shorten")
    document["presets"] = [p for p in document["presets"] if "prebuilds" in p]
    document["presets"][0]["prebuilds"] = {"instances": pool}
    spec = validate_document(document, base_dir=DEMO_TEMPLATE.parent)
    version = template_push(organization=organization_default(), spec=spec, source=source)
    return version.presets.get()


def one_pool_cap() -> int:
    """The per-preset in-flight cap of the mixed run: the global one (a single pool)."""
    from django.conf import settings

    return settings.PREBUILDS_MAX_IN_FLIGHT


def start_system(current: Session, *, metrics_token: str, interval: float | None = None) -> str:
    """Start the whole layout ``make run`` starts in the session (web, the workers by role,
    beat); wait until the web answers and the workers are ready. Answers the web URL."""
    extra = {
        "METRICS_TOKEN": metrics_token,
        # One pool here: its per-preset cap is the deployment's (the default per-preset cap is
        # half of it to leave room for other pools' refills, and there are none).
        "PREBUILDS_MAX_IN_FLIGHT_PER_PRESET": str(one_pool_cap()),
    }
    if interval is not None:
        extra["PREBUILDS_RECONCILIATION_INTERVAL"] = str(interval)
    current.start_layout(**extra)
    return current.web_url


# --- Observation -----------------------------------------------------------------------------

READY_FOR_OWNER_SQL = """
SELECT w.id, EXTRACT(EPOCH FROM MAX(a.lifecycle_changed_at))
  FROM workspaces_workspace w
  JOIN workspaces_workspaceagent a ON a.workspace_id = w.id AND a.retired_at IS NULL
 WHERE w.id = ANY(%s::uuid[]) AND w.claimed_at IS NOT NULL
 GROUP BY w.id
HAVING bool_and(a.lifecycle_state = 'ready' AND a.initialized_owner_id = w.owner_id
                AND a.lifecycle_changed_at > w.claimed_at)
"""


def _ready_now(workspace_ids: list[str]) -> dict[str, float]:
    """Those of the claimed workspaces whose agents are ready for their owner: id → when."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(READY_FOR_OWNER_SQL, [workspace_ids])
        return {str(workspace_id): float(at) for workspace_id, at in cursor.fetchall()}


def _eligible(preset) -> int:
    """The pool's eligible prebuilds, by the reconciler's own rule (a dry run of the preset)."""
    from prebuilds.reconciler import reconcile

    presets = reconcile(dry_run=True, preset_ids=[preset.id]).presets
    return presets[0].state.eligible if presets else 0


class Scraper(threading.Thread):
    """Scrapes ``/metrics`` every ``SCRAPE_INTERVAL``: (scrape time, last pass timestamp)."""

    def __init__(self, url: str, token: str) -> None:
        super().__init__(name="metrics-scraper", daemon=True)
        self.url, self.token = url, token
        self.samples: list[tuple[float, float]] = []
        self.errors = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        headers = {"Authorization": f"Bearer {self.token}"}
        with httpx.Client(timeout=30, headers=headers) as client:
            while not self.stopping.wait(SCRAPE_INTERVAL):
                try:
                    response = client.get(f"{self.url}/metrics")
                    scraped = time.time()
                    response.raise_for_status()
                except httpx.HTTPError:
                    self.errors += 1
                    continue
                for family in text_string_to_metric_families(response.text):
                    if family.name == LAST_PASS_METRIC:
                        self.samples.append((scraped, family.samples[0].value))

    def staleness_max(self, since: float) -> float | None:
        """The largest scrape time − last pass start, over the scrapes that saw a pass
        started at or after ``since``, and every scrape after the first of those."""
        first = next((i for i, (_, last) in enumerate(self.samples) if last >= since), None)
        if first is None:
            return None
        return max(at - last for at, last in self.samples[first:])


# --- The run ---------------------------------------------------------------------------------


def _send_claims(url: str, preset_id: str, claims: list[Claim], *, rate: float, burst: int):
    """Open loop: claims[:-burst] at ``rate`` a second, then the last ``burst`` at once."""
    import httpx

    paced, bursting = claims[: len(claims) - burst], claims[len(claims) - burst :]
    # A thread and a connection per claim: slow answers to earlier claims must never hold
    # back later ones (open loop), nor the burst.
    limits = httpx.Limits(max_connections=len(claims), max_keepalive_connections=len(claims))

    with httpx.Client(timeout=120, limits=limits) as client:

        def send(claim: Claim) -> None:
            body = {"name": f"mixed-{claim.index}", "template_version_preset_id": preset_id}
            headers = {"Authorization": f"Bearer {claim.token}"}
            claim.sent_at = time.time()
            started = time.perf_counter()
            try:
                response = client.post(f"{url}/api/v2/workspaces", json=body, headers=headers)
                claim.status = response.status_code
                if response.status_code == 201:
                    document = response.json()
                    claim.workspace_id = document["id"]
                    claim.claimed = bool(document["claimed_prebuild"])
            except httpx.HTTPError:
                claim.status = 599
            claim.latency_ms = (time.perf_counter() - started) * 1000

        with ThreadPoolExecutor(max_workers=len(claims), thread_name_prefix="claim") as pool:
            start = time.monotonic()
            for index, claim in enumerate(paced):
                delay = start + index / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                pool.submit(send, claim)
            delay = start + len(paced) / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            list(pool.map(send, bursting))  # submitted at once; waits for every answer


def _reconcile_gap_max(run_start: datetime, run_end: datetime) -> tuple[float, int]:
    """Longest gap between passes that held the lock, from the last one before the run to the
    run's end; and how many passes started during the run."""
    from prebuilds.models import ReconciliationPass

    passes = ReconciliationPass.objects.filter(lock_acquired=True)
    before = passes.filter(started_at__lt=run_start).order_by("-started_at").first()
    during = list(
        passes.filter(started_at__gte=run_start, started_at__lte=run_end)
        .order_by("started_at")
        .values_list("started_at", flat=True)
    )
    points = ([before.started_at] if before else [run_start]) + during + [run_end]
    gaps = [(b - a).total_seconds() for a, b in zip(points, points[1:], strict=False)]
    return max(gaps), len(during)


def _refill_starts(preset, hits: list[Claim]) -> tuple[list[float], int]:
    """Claim commit → replacement's build started (ms) per claim, and claims still waiting."""
    from accounts.models import SYSTEM_USER_ID
    from workspaces.models import BuildReason, Workspace, WorkspaceBuild

    committed = sorted(
        Workspace.objects.filter(id__in=[c.workspace_id for c in hits]).values_list(
            "claimed_at", flat=True
        )
    )
    if not committed:
        return [], 0
    replacements = list(
        WorkspaceBuild.objects.filter(
            preset=preset,
            build_number=1,
            initiator_id=SYSTEM_USER_ID,
            reason=BuildReason.PREBUILD,
            workspace__created_at__gt=committed[0],
        )
        .order_by("workspace__created_at", "workspace_id")
        .values_list("workspace__created_at", "job__started_at")
    )
    starts, pending, next_free = [], 0, 0
    for claimed_at in committed:
        while next_free < len(replacements) and replacements[next_free][0] < claimed_at:
            next_free += 1
        if next_free >= len(replacements) or replacements[next_free][1] is None:
            pending += 1
        else:
            starts.append((replacements[next_free][1] - claimed_at).total_seconds() * 1000)
        next_free += 1
    return starts, pending


BUILD_WAITS_SQL = """
SELECT b.is_claim, EXTRACT(EPOCH FROM (j.started_at - j.created_at)) * 1000
  FROM workspaces_workspacebuild b
  JOIN workspaces_provisionerjob j ON j.id = b.job_id
 WHERE b.reason <> 'prebuild' AND b.workspace_id = ANY(%s::uuid[]) AND j.started_at IS NOT NULL
"""

# Per claim: the preset's prebuild builds in flight (queued, not finished) when it committed.
IN_FLIGHT_AT_CLAIMS_SQL = """
SELECT w.id, (SELECT count(*)
                FROM workspaces_workspacebuild b
                JOIN workspaces_provisionerjob j ON j.id = b.job_id
               WHERE b.preset_id = %s AND b.reason = 'prebuild' AND b.build_number = 1
                 AND j.created_at <= w.claimed_at
                 AND (j.completed_at IS NULL OR j.completed_at > w.claimed_at))
  FROM workspaces_workspace w
 WHERE w.id = ANY(%s::uuid[]) AND w.claimed_at IS NOT NULL
"""


def _build_waits(claims: list[Claim]) -> tuple[list[float], list[float]]:
    """Queued → picked up by a worker (ms) of the people's builds the claims caused: (claim
    builds of the hits, first builds of the misses' cold workspaces)."""
    from django.db import connection

    ids = [c.workspace_id for c in claims if c.workspace_id]
    with connection.cursor() as cursor:
        cursor.execute(BUILD_WAITS_SQL, [ids])
        rows = cursor.fetchall()
    return [float(w) for is_claim, w in rows if is_claim], [float(w) for c, w in rows if not c]


CLAIM_BUILDS_DONE_SQL = """
SELECT b.workspace_id, EXTRACT(EPOCH FROM j.completed_at)
  FROM workspaces_workspacebuild b
  JOIN workspaces_provisionerjob j ON j.id = b.job_id
 WHERE b.is_claim AND b.workspace_id = ANY(%s::uuid[]) AND j.completed_at IS NOT NULL
"""


def _reinit_times(hits: list[Claim]) -> list[float]:
    """Claim build completed → the agents ready for the owner (ms): the agents' part (the
    reinit's delivery, the startup script run again, the ready report)."""
    from django.db import connection

    ready = {c.workspace_id: c.ready_at for c in hits if c.ready_at is not None}
    with connection.cursor() as cursor:
        cursor.execute(CLAIM_BUILDS_DONE_SQL, [list(ready)])
        done = {str(workspace_id): float(at) for workspace_id, at in cursor.fetchall()}
    return [(ready[w] - done[w]) * 1000 for w in ready if w in done]


def _claims_at_cap(preset, hits: list[Claim]) -> int:
    """How many claims committed while their preset already had
    ``PREBUILDS_MAX_IN_FLIGHT_PER_PRESET`` prebuild builds in flight: their replacement could
    not start before one of those finished, however soon a pass ran."""
    from django.db import connection

    cap = one_pool_cap()
    if cap <= 0:
        return 0
    with connection.cursor() as cursor:
        cursor.execute(IN_FLIGHT_AT_CLAIMS_SQL, [preset.id, [c.workspace_id for c in hits]])
        return sum(1 for _, in_flight in cursor.fetchall() if in_flight >= cap)


def _claim_to_next_pass(hits: list[Claim]) -> list[float]:
    """Claim commit → the start of the first pass holding the lock after it (ms): how soon the
    event-driven refill ran a pass, whatever that pass could create."""
    from prebuilds.models import ReconciliationPass
    from workspaces.models import Workspace

    committed = sorted(
        Workspace.objects.filter(id__in=[c.workspace_id for c in hits]).values_list(
            "claimed_at", flat=True
        )
    )
    if not committed:
        return []
    starts = list(
        ReconciliationPass.objects.filter(lock_acquired=True, started_at__gt=committed[0])
        .order_by("started_at")
        .values_list("started_at", flat=True)
    )
    found, index = [], 0
    for claimed_at in committed:
        while index < len(starts) and starts[index] <= claimed_at:
            index += 1
        if index < len(starts):
            found.append((starts[index] - claimed_at).total_seconds() * 1000)
    return found


def measure(
    *,
    pool: int,
    claim_seconds: float = CLAIM_SECONDS,
    rate: float = CLAIM_RATE,
    burst: int = BURST,
    ready_timeout: float = READY_TIMEOUT,
    interval: float | None = None,
) -> dict[str, Any]:
    """One run (see the module docstring); ``interval`` overrides the processes'
    ``PREBUILDS_RECONCILIATION_INTERVAL`` (default: the project's setting)."""
    from django.conf import settings
    from django.db import connection
    from django.utils import timezone

    from prebuilds.reconciler import reconcile

    preset = push_mixed_template(pool=pool)
    count = int(claim_seconds * rate) + burst
    claims = []
    for index in range(count):
        user, token = user_with_token(f"bench-mixed-{index}")
        claims.append(Claim(index=index, user_id=str(user.id), token=token))
    metrics_token = secrets.token_urlsafe(24)
    began = time.monotonic()

    with session("mixed") as current:
        url = start_system(current, metrics_token=metrics_token, interval=interval)
        scraper = Scraper(url, metrics_token)
        run_start = timezone.now()
        scraper.start()
        reconcile()  # the fill starts now; beat's passes carry it on
        deadline = time.monotonic() + FILL_START_TIMEOUT
        while (ready := _eligible(preset)) < max(1, int(pool * START_SHARE)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {ready} of {pool} prebuilds ready: the fill stalled")
            time.sleep(0.5)
        fill_ready_at_start = ready

        sender = threading.Thread(
            target=_send_claims,
            args=(url, str(preset.id), claims),
            kwargs={"rate": rate, "burst": burst},
            name="claims",
        )
        sender.start()
        # Watch the claimed workspaces until each is ready for its owner and has a replacement
        # building, or time is up.
        end_deadline = None
        while True:
            sending = sender.is_alive()
            waiting = [c for c in claims if c.claimed and c.ready_at is None]
            if waiting:
                found = _ready_now([c.workspace_id for c in waiting])
                for claim in waiting:
                    if claim.workspace_id in found:
                        claim.ready_at = found[claim.workspace_id]
            pause = OBSERVE_INTERVAL
            if not sending:
                end_deadline = end_deadline or time.monotonic() + ready_timeout
                hits = [c for c in claims if c.claimed]
                if all(c.ready_at is not None for c in hits):
                    if not _refill_starts(preset, hits)[1] or time.monotonic() > end_deadline:
                        break
                    pause = 0.5  # only replacements left to wait for: a slower look
                elif time.monotonic() > end_deadline:
                    break
            time.sleep(pause)
        sender.join()
        run_end = timezone.now()
        scraper.stopping.set()
        scraper.join(timeout=35)
        eligible_at_end = _eligible(preset)
        agents_stopped = current.stop_agents()
    connection.close()

    hits = [c for c in claims if c.claimed]
    timeouts = [c for c in hits if c.ready_at is None]
    end = run_end.timestamp()
    ready_ms = [((c.ready_at or end) - c.sent_at) * 1000 for c in hits]
    gap_max, passes = _reconcile_gap_max(run_start, run_end)
    refills, refill_pending = _refill_starts(preset, hits)
    next_pass = _claim_to_next_pass(hits)
    claim_waits, cold_waits = _build_waits(claims)
    at_cap = _claims_at_cap(preset, hits)
    reinits = _reinit_times(hits)
    # The claim API's latency over the answers that were claims (a miss is a cold build).
    answered = [c.latency_ms for c in hits]
    staleness = scraper.staleness_max(run_start.timestamp())

    def rounded(value: float | None, digits: int = 1) -> float | None:
        return None if value is None else round(value, digits)

    return {
        "mixed_claim_ready_p50_ms": rounded(statistics.median(ready_ms)) if ready_ms else None,
        "mixed_claim_ready_p99_ms": rounded(percentile(ready_ms, 99)) if ready_ms else None,
        "mixed_claim_ready_samples": len(ready_ms),
        "mixed_claim_ready_timeouts": len(timeouts),
        "mixed_claims": len(claims),
        "mixed_missed": sum(1 for c in claims if c.status == 201 and not c.claimed),
        "mixed_errors": sum(1 for c in claims if c.status != 201),
        "mixed_claim_api_p50_ms": rounded(statistics.median(answered)) if answered else None,
        "mixed_claim_api_p99_ms": rounded(percentile(answered, 99)) if answered else None,
        "mixed_reconcile_gap_max_s": rounded(gap_max),
        "mixed_reconcile_passes": passes,
        "mixed_reconcile_interval_s": float(
            interval if interval is not None else settings.PREBUILDS_RECONCILIATION_INTERVAL
        ),
        "mixed_refill_start_p50_ms": rounded(statistics.median(refills)) if refills else None,
        "mixed_refill_start_samples": len(refills),
        "mixed_refill_pending": refill_pending,
        # What limits the two figures above (README "Benchmarks"): claims made while the
        # preset's in-flight cap was reached; how soon a pass followed a claim; how long the
        # claims' builds and the misses' cold builds waited for a people's-worker thread.
        "mixed_refill_at_cap": at_cap,
        "mixed_refill_pass_p50_ms": rounded(statistics.median(next_pass)) if next_pass else None,
        "mixed_claim_build_wait_p50_ms": (
            rounded(statistics.median(claim_waits)) if claim_waits else None
        ),
        "mixed_claim_build_wait_p99_ms": (
            rounded(percentile(claim_waits, 99)) if claim_waits else None
        ),
        "mixed_claim_reinit_p99_ms": rounded(percentile(reinits, 99)) if reinits else None,
        "mixed_cold_build_wait_p50_ms": (
            rounded(statistics.median(cold_waits)) if cold_waits else None
        ),
        "mixed_metrics_staleness_max_s": rounded(staleness),
        "mixed_metrics_scrapes": len(scraper.samples),
        "mixed_metrics_scrape_errors": scraper.errors,
        "mixed_pool_size": pool,
        "mixed_pool_ready_at_first_claim": fill_ready_at_start,
        "mixed_pool_ready_at_end": eligible_at_end,
        "mixed_agents_stopped": agents_stopped,
        "mixed_seconds": round(time.monotonic() - began, 1),
    }


def run(*, quick: bool) -> dict[str, Any]:
    try:
        return measure(pool=QUICK_POOL if quick else POOL)
    finally:
        # The modules after this one seed pools of their own; the periodic passes of a later
        # measurement would otherwise refill (or, were it removed, delete) this module's pool.
        scratch_reset()
