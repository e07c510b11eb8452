"""Load on the web tier alone: the claim API and the operators' dashboard under many clients.

DESIGN.md section 10 ("Added keys"): every step reports ``_rps``, ``_p50_ms``, ``_p99_ms``,
``_5xx`` and ``_errors``, and ``load_whole_system`` says whether a worker and agents were
running. Here they were not (``load_whole_system: false``): one uvicorn web process (subprocess,
its own ``DATA_DIR`` and broker) on the scratch database and nothing else, so claim builds stay
pending and no agent talks to the server. This measures the web tier; the whole system under
load is ``benchmarks.mixed``.

Set-up, on an emptied scratch database (``scratch_reset``: the dashboard shows exactly these
21 pools, whichever modules ran before): a pooled preset with enough ready prebuilds for every
claim of both rounds (``POOL``), plus 20 more pooled presets so the dashboard has rows to
compute. This process is the load
generator: ``concurrency`` asyncio clients over keep-alive connections, each sending its next
request as soon as the previous answer arrived (a closed loop: the worst case for latency,
since the server is never idle), for a fixed time.

- ``load_claim_<c>_*``: ``POST /api/v2/workspaces`` with the pooled preset, one user and API
  token per client, every name unique; expects a 201 that says ``claimed_prebuild: true``.
  A 201 with a cold build instead (the pool ran dry, and the figures are no longer the claim's)
  is an error of the step (``"201-missed"`` in its statuses), also counted in
  ``load_claim_<c>_missed``.
- ``load_dashboard_<c>_*``: the overview's live poll as the page sends it (``GET /prebuilds/``
  as HTMX with the ``layout``/``known`` versions of the fragment it holds); expects 204 (nothing
  changed) or 200 (the changed pieces). ``load_dashboard_full_<c>_*``: the whole live fragment
  (``GET /prebuilds/`` as HTMX without versions: every row rendered, as for a page load);
  expects 200. Both with a staff session made by signing in over HTTP against the web
  process itself, so its cookie is one the web process accepts (a session signed with another
  process's ``SECRET_KEY`` is redirected to the login page, and an earlier version of this file
  counted those 302s as successes).
- ``load_me_<c>_*``: ``GET /api/v2/users/me`` with an API token, the cheapest authenticated API
  request (rate-limit check, token lookup, a small JSON answer); expects 200: the web tier's
  floor under the same load, against which the others can be read.
- ``load_dashboard_pools``: the pools the dashboard showed (``OTHER_PRESETS`` + 1).

``_errors`` counts every answer whose status is not one the step expects, transport errors
included (a redirect to the login page is an error); ``_5xx`` counts the 5xx answers alone.
"""

from __future__ import annotations

import asyncio
import re
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from benchmarks import scratch_reset
from benchmarks.claim import command_preset, insert_ready_prebuilds, user_with_token
from benchmarks.processes import percentile, session

CONCURRENCY = (20, 100)
POOL = 16_000  # about 15 s at 500 claims a second, for each of the two rounds
OTHER_PRESETS = 20
STAFF_USERNAME = "bench-staff"
STAFF_PASSWORD = "bench-staff-password-not-secret"  # a scratch database, dropped afterwards
TRANSPORT_ERROR = 599  # the status a request that got no answer is counted under
# What a claim step records for a 201 that was a cold build (the pool had run dry): not a claim,
# so an error of the step, listed as "201-missed" in its statuses.
MISSED = -201

# A client's request: (client, n) -> the status of the answer.
Send = Callable[[Any, int], Awaitable[int]]


@dataclass
class StepResult:
    """What one step saw: every request's latency and the status of every answer."""

    latencies: list[float] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    wall: float = 0.0

    def summary(self, prefix: str, expected: Collection[int]) -> dict[str, Any]:
        """The step's keys: ``_rps``, ``_p50_ms``, ``_p99_ms``, ``_5xx``, ``_errors``, and
        ``_requests`` and ``_statuses`` (answers by status) to read them by."""
        latencies = self.latencies or [0.0]
        return {
            f"{prefix}_rps": round(len(self.statuses) / self.wall, 1) if self.wall else 0.0,
            f"{prefix}_p50_ms": round(statistics.median(latencies), 1),
            f"{prefix}_p99_ms": round(percentile(latencies, 99), 1),
            f"{prefix}_5xx": sum(1 for s in self.statuses if 500 <= s < TRANSPORT_ERROR),
            f"{prefix}_errors": sum(1 for s in self.statuses if s not in expected),
            f"{prefix}_requests": len(self.statuses),
            f"{prefix}_statuses": {
                "201-missed" if s == MISSED else str(s): n
                for s, n in sorted(Counter(self.statuses).items())
            },
        }


async def drive(clients: list[tuple[Any, Send]], seconds: float) -> StepResult:
    """Run one closed-loop client per entry of ``clients`` for ``seconds``.

    Each entry is ``(client, send)``: ``send(client, n)`` makes the n-th request of that client
    and answers its status; an exception (no answer) counts as ``TRANSPORT_ERROR``.
    """
    result = StepResult()
    deadline = time.perf_counter() + seconds

    async def loop(client, send: Send) -> None:
        n = 0
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                status = await send(client, n)
            except Exception:  # connection refused, reset, timed out: no answer at all
                status = TRANSPORT_ERROR
            result.latencies.append((time.perf_counter() - started) * 1000)
            result.statuses.append(status)
            n += 1

    started = time.perf_counter()
    await asyncio.gather(*(loop(client, send) for client, send in clients))
    result.wall = time.perf_counter() - started
    return result


async def get_step(
    url: str,
    *,
    concurrency: int,
    seconds: float,
    expected: Collection[int],
    prefix: str,
    headers: dict[str, str] | None = None,
    cookies: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``concurrency`` clients sending ``GET url`` back to back; the step's keys under ``prefix``.

    Redirects are not followed: a redirect is an answer like any other, an error unless
    ``expected`` holds its status.
    """
    import httpx

    limits = httpx.Limits(max_connections=concurrency + 10)
    clients = [
        httpx.AsyncClient(
            timeout=60, limits=limits, headers=headers, cookies=cookies, follow_redirects=False
        )
        for _ in range(concurrency)
    ]

    async def send(client: httpx.AsyncClient, n: int) -> int:
        return (await client.get(url)).status_code

    try:
        result = await drive([(client, send) for client in clients], seconds)
    finally:
        for client in clients:
            await client.aclose()
    return result.summary(prefix, expected)


def staff_sign_in(base: str, *, username: str, password: str) -> dict[str, str]:
    """Sign in through the web process's login form; answer its cookies (session and CSRF).

    The session is the web process's own (its ``SECRET_KEY``, its session store), exactly what
    a browser gets. Raises when the sign-in or a staff page afterwards does not succeed.
    """
    import httpx

    with httpx.Client(base_url=base, timeout=30, follow_redirects=False) as client:
        form = client.get("/login/")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.text)
        if form.status_code != 200 or token is None:
            raise RuntimeError(f"GET /login/: {form.status_code}, no CSRF token")
        answer = client.post(
            "/login/",
            data={
                "username": username,
                "password": password,
                "csrfmiddlewaretoken": token.group(1),
                "next": "/prebuilds/",
            },
        )
        if answer.status_code != 302 or "sessionid" not in client.cookies:
            raise RuntimeError(f"signing in as {username} failed: {answer.status_code}")
        check = client.get("/prebuilds/", headers={"HX-Request": "true"})
        if check.status_code != 200:
            raise RuntimeError(f"GET /prebuilds/ as {username}: {check.status_code}")
        return dict(client.cookies)


def poll_parameters(fragment: str) -> dict[str, str]:
    """What the overview page sends with its poll: ``layout`` and ``known`` (every
    ``data-version`` in page order), as ``static/js/warmstart.js`` collects them."""
    layout = re.search(r'data-layout="(\w+)"', fragment)
    versions = re.findall(r'data-version="(\w+)"', fragment)
    if layout is None or not versions:
        raise RuntimeError("the overview fragment has no versions to poll with")
    return {"layout": layout.group(1), "known": ".".join(versions)}


def seed(*, pool: int, other_presets: int) -> tuple[Any, list[str]]:
    """The pooled preset with ``pool`` ready prebuilds, the other pools, the staff user, and
    one API token per client; answers (preset, tokens)."""
    from django.db import connection

    from accounts.models import User

    preset = command_preset("bench-load", pool)
    insert_ready_prebuilds(preset, pool)
    for index in range(other_presets):
        other = command_preset(f"bench-load-{index}", 3)
        insert_ready_prebuilds(other, 3)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")
    User.objects.create_user(username=STAFF_USERNAME, password=STAFF_PASSWORD, is_staff=True)
    tokens = [user_with_token(f"bench-load-{index}")[1] for index in range(max(CONCURRENCY))]
    return preset, tokens


def measure(
    *,
    seconds: float,
    concurrency: tuple[int, ...] = CONCURRENCY,
    pool: int = POOL,
    other_presets: int = OTHER_PRESETS,
) -> dict[str, Any]:
    """Every step at every concurrency against one web process (no worker, no agents), on an
    emptied scratch database."""
    import httpx

    from prebuilds import dashboard

    # The dashboard steps compute and render every pool there is, and the earlier modules
    # leave 1,000 presets and 26,000 prebuilds behind (the reconcile measurement's, the claim
    # API's): without this, a full run measured a fleet of 1,021 pools and `--only load` 21.
    scratch_reset()
    preset, tokens = seed(pool=pool, other_presets=other_presets)
    results: dict[str, Any] = {
        "load_whole_system": False,
        "load_dashboard_pools": dashboard.overview().preset_count,
    }

    with session("load") as current:
        current.start_web()
        base = current.web_url
        cookies = staff_sign_in(base, username=STAFF_USERNAME, password=STAFF_PASSWORD)
        hx = {"HX-Request": "true"}

        async def round_(index: int, clients: int) -> None:
            limits = httpx.Limits(max_connections=clients + 10)
            token_clients = [
                httpx.AsyncClient(
                    timeout=60,
                    limits=limits,
                    headers={"Authorization": f"Bearer {tokens[i]}"},
                    follow_redirects=False,
                )
                for i in range(clients)
            ]

            async def claim(client: httpx.AsyncClient, n: int) -> int:
                # Names are unique per owner: one prefix per round.
                body = {"name": f"r{index}-{n}", "template_version_preset_id": str(preset.id)}
                response = await client.post(f"{base}/api/v2/workspaces", json=body)
                if response.status_code == 201 and not response.json()["claimed_prebuild"]:
                    return MISSED  # a cold build, not a claim
                return response.status_code

            async def me(client: httpx.AsyncClient, n: int) -> int:
                return (await client.get(f"{base}/api/v2/users/me")).status_code

            try:
                step = await drive([(c, claim) for c in token_clients], seconds)
                results.update(step.summary(f"load_claim_{clients}", {201}))
                results[f"load_claim_{clients}_missed"] = step.statuses.count(MISSED)
                step = await drive([(c, me) for c in token_clients], seconds)
                results.update(step.summary(f"load_me_{clients}", {200}))
            finally:
                for client in token_clients:
                    await client.aclose()
            # The versions of the page as it is now (the claims above changed the pool's row).
            fragment = httpx.get(f"{base}/prebuilds/", headers=hx, cookies=cookies, timeout=30)
            poll = httpx.URL(f"{base}/prebuilds/", params=poll_parameters(fragment.text))
            common = {"concurrency": clients, "seconds": seconds, "headers": hx, "cookies": cookies}
            results.update(
                await get_step(
                    str(poll), expected={204, 200}, prefix=f"load_dashboard_{clients}", **common
                )
            )
            results.update(
                await get_step(
                    f"{base}/prebuilds/",
                    expected={200},
                    prefix=f"load_dashboard_full_{clients}",
                    **common,
                )
            )

        for index, clients in enumerate(concurrency):
            asyncio.run(round_(index, clients))
    results["load_seconds_per_step"] = seconds
    return results


def run(*, quick: bool) -> dict[str, Any]:
    return measure(seconds=5.0 if quick else 15.0)
