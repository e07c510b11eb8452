"""Load: the claim API and the operators' dashboard fragment under many concurrent clients.

DESIGN.md names no keys for this; issue "Production operation" asks for throughput and p50/p99
at 20 and 100 concurrent clients with zero 5xx, driven from a separate process over loopback.

Set-up: one uvicorn web process (subprocess, its own ``DATA_DIR`` and broker, no worker: claim
builds stay pending, we measure the web tier) on the scratch database; a pooled preset with
enough ready prebuilds for every claim of both steps (``POOL``), plus 20 more pooled presets
so the dashboard has rows to compute. This process is the load generator: ``concurrency``
asyncio clients over keep-alive connections, each sending its next request as soon as the
previous answer arrived (a closed loop: the worst case for latency, since the server is never
idle), for a fixed time.

- ``load_claim_<c>_*``: ``POST /api/v2/workspaces`` with the pooled preset, one user and API
  token per client, every name unique. ``load_claim_<c>_missed`` counts answers that were not
  claims (a cold build instead: the pool ran dry, and the figures are no longer the claim's).
- ``load_dashboard_<c>_*``: ``GET /prebuilds/`` as HTMX (the live fragment the overview
  polls), with a staff session.
- ``load_me_<c>_*``: ``GET /api/v2/users/me`` with an API token, the cheapest authenticated API
  request (rate-limit check, token lookup, a small JSON answer): the web tier's floor under the
  same load, against which the claim's figures can be read.

Each gives ``_rps`` (answers per second), ``_p50_ms``, ``_p99_ms`` and ``_5xx`` (5xx answers plus
transport errors; the goal is 0).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

from benchmarks.claim import command_preset, insert_ready_prebuilds, user_with_token
from benchmarks.processes import percentile, session

CONCURRENCY = (20, 100)
POOL = 16_000  # about 15 s at 500 claims a second, for each of the two steps


def _staff_session_cookie() -> str:
    """A session key of a new staff user, made the way Django's login makes one."""
    from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY
    from django.contrib.sessions.backends.db import SessionStore

    from accounts.models import User

    user = User.objects.create_user(username="bench-staff", is_staff=True)
    store = SessionStore()
    store[SESSION_KEY] = str(user.pk)
    store[BACKEND_SESSION_KEY] = "accounts.backends.UserBackend"
    store[HASH_SESSION_KEY] = user.get_session_auth_hash()
    store.create()
    return store.session_key


async def _drive(requests: list, seconds: float) -> tuple[list[float], int, float]:
    """Run one closed-loop client per entry of ``requests`` for ``seconds``.

    Each entry is ``(client, send)``: ``send(client, n)`` makes the n-th request of that client
    and answers its status. Returns the latencies (ms), the error count and the wall time.
    """
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def loop(client, send) -> None:
        nonlocal errors
        n = 0
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                status = await send(client, n)
            except Exception:  # transport errors count as failures, like a 5xx
                status = 599
            latencies.append((time.perf_counter() - started) * 1000)
            if status >= 500:
                errors += 1
            n += 1

    started = time.perf_counter()
    await asyncio.gather(*(loop(client, send) for client, send in requests))
    return latencies, errors, time.perf_counter() - started


def _summary(prefix: str, latencies: list[float], errors: int, wall: float) -> dict[str, Any]:
    return {
        f"{prefix}_rps": round(len(latencies) / wall, 1),
        f"{prefix}_p50_ms": round(statistics.median(latencies), 1),
        f"{prefix}_p99_ms": round(percentile(latencies, 99), 1),
        f"{prefix}_5xx": errors,
    }


def run(*, quick: bool) -> dict[str, Any]:
    import httpx
    from django.db import connection

    seconds = 5.0 if quick else 15.0
    preset = command_preset("bench-load", POOL)
    insert_ready_prebuilds(preset, POOL)
    for index in range(20):
        other = command_preset(f"bench-load-{index}", 3)
        insert_ready_prebuilds(other, 3)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")
    tokens = [user_with_token(f"bench-load-{index}")[1] for index in range(max(CONCURRENCY))]
    cookie = _staff_session_cookie()
    results: dict[str, Any] = {}

    with session("load") as current:
        current.start_web()
        base = current.web_url
        limits = httpx.Limits(max_connections=max(CONCURRENCY) + 10)

        missed = 0

        async def claim(client: httpx.AsyncClient, n: int) -> int:
            nonlocal missed
            body = {"name": f"n{n}", "template_version_preset_id": str(preset.id)}
            response = await client.post(f"{base}/api/v2/workspaces", json=body)
            if response.status_code == 201 and not response.json()["claimed_prebuild"]:
                missed += 1
            return response.status_code

        async def dashboard(client: httpx.AsyncClient, n: int) -> int:
            response = await client.get(f"{base}/prebuilds/", headers={"HX-Request": "true"})
            return response.status_code

        async def me(client: httpx.AsyncClient, n: int) -> int:
            response = await client.get(f"{base}/api/v2/users/me")
            return response.status_code

        async def measure(concurrency: int, round_: int) -> None:
            clients = [
                httpx.AsyncClient(
                    timeout=60,
                    limits=limits,
                    headers={"Authorization": f"Bearer {tokens[index]}"},
                    # Names must be unique per owner: prefix them per round.
                    base_url=base,
                )
                for index in range(concurrency)
            ]
            staff = [
                httpx.AsyncClient(timeout=60, limits=limits, cookies={"sessionid": cookie})
                for _ in range(concurrency)
            ]
            try:

                async def claim_round(client, n):
                    return await claim(client, round_ * 100_000 + n)

                nonlocal missed
                missed = 0
                summary = await _drive([(c, claim_round) for c in clients], seconds)
                results.update(_summary(f"load_claim_{concurrency}", *summary))
                results[f"load_claim_{concurrency}_missed"] = missed
                summary = await _drive([(c, dashboard) for c in staff], seconds)
                results.update(_summary(f"load_dashboard_{concurrency}", *summary))
                summary = await _drive([(c, me) for c in clients], seconds)
                results.update(_summary(f"load_me_{concurrency}", *summary))
            finally:
                for client in clients + staff:
                    await client.aclose()

        for round_, concurrency in enumerate(CONCURRENCY):
            asyncio.run(measure(concurrency, round_))
    results["load_seconds_per_step"] = seconds
    return results
