"""Reinit delivery: how long after a claim build commits does its waiting agent hear of it?

One uvicorn web process on the scratch database (its one ``LISTEN`` connection fans
notifications out). We bulk-insert ``WAITERS`` (1,000) ready prebuilt workspaces of one preset,
each with one agent initialised for the system user, and keep their plain agent tokens. A
client in this process (its own thread running an asyncio loop, ``httpx.AsyncClient`` with room
for every connection) opens one ``GET /api/v2/workspaceagents/me/reinit?wait=60`` per agent, all
at once, and re-polls on a 204 as the agent program does. We wait until the web process holds
them all: every TCP connection is established (``/proc/net/tcp``), and twice in a row the web
process has been quiet for half a second (under 10% of a CPU) with no query running in the
database: every request authenticated, checked and parked.

Then, one at a time, ``CLAIMS`` workspaces are claimed directly in the database the way a
claim request and a worker do it: ``claim_prebuild`` (owner change plus claim build in one
transaction), then ``jobs.job_acquire`` and ``jobs.job_complete`` (whose transaction sends the
``pg_notify`` of ``on_claim_build_succeeded``). The commit time is read when ``job_complete``
returns; the delivery time when the client holds the 200. ``reinit_delivery_p99_ms`` is the
99th percentile of (delivery - commit) over the claims (nearest rank: with 20 samples, the
maximum). ``reinit_spurious`` counts 200s for workspaces that were not claimed, and second 200s
for one that was (must be 0). ``reinit_web_rss_mb`` is the web process's ``VmRSS`` while it
holds every waiter; ``reinit_errors`` counts non-200/204 answers and transport errors.
"""

from __future__ import annotations

import asyncio
import resource
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.claim import command_preset, insert_ready_prebuilds, user_with_token
from benchmarks.processes import percentile, rss_mb, session

WAITERS = 1000
WAIT_SECONDS = 60
SETTLE_TIMEOUT = 60.0
DELIVERY_TIMEOUT = 5.0


class Waiters:
    """Long-polls of every agent, run by an asyncio loop in a thread of its own."""

    def __init__(self, base_url: str, agents: list[tuple[str, str]]) -> None:
        self.base_url = base_url
        self.agents = agents  # (workspace id, agent token)
        self.delivered: dict[str, list[float]] = {}
        self.errors = 0
        self.requests_sent = 0
        self.loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="reinit-waiters", daemon=True)
        self._done = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._done.wait(30)
        self._thread.join(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._main())
        finally:
            self.loop.close()
            self._done.set()

    async def _main(self) -> None:
        import httpx

        self._stop = asyncio.Event()
        limits = httpx.Limits(max_connections=len(self.agents) + 10, max_keepalive_connections=0)
        timeout = httpx.Timeout(WAIT_SECONDS + 30, connect=60, pool=60)
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
            tasks = [
                asyncio.create_task(self._wait(client, workspace_id, token))
                for workspace_id, token in self.agents
            ]
            await self._stop.wait()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _wait(self, client, workspace_id: str, token: str) -> None:
        import httpx

        url = f"{self.base_url}/api/v2/workspaceagents/me/reinit"
        headers = {"Authorization": f"Bearer {token}"}
        while True:
            self.requests_sent += 1
            try:
                response = await client.get(url, params={"wait": WAIT_SECONDS}, headers=headers)
            except httpx.HTTPError:
                self.errors += 1
                await asyncio.sleep(0.5)
                continue
            if response.status_code == 200:
                self.delivered.setdefault(workspace_id, []).append(time.perf_counter())
                return  # a real agent now re-fetches its manifest; we are done with it
            if response.status_code != 204:
                self.errors += 1
                await asyncio.sleep(0.5)


def _established(port: int) -> int:
    """Established TCP connections whose local port is ``port`` (the server's side)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                count += 1
    return count


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks (USER_HZ)


def _busy_backends() -> int:
    """Queries running in the scratch database now, other than this one."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND state = 'active' AND pid <> pg_backend_pid()"
        )
        return cursor.fetchone()[0]


def _settle(pid: int, port: int, expected: int) -> float:
    """Wait until ``expected`` connections are established and every request is parked.

    Parked: the web process is idle (under 10% of a CPU for half a second) *and* no query is
    running in the database, twice in a row. Web CPU alone is not enough: while the first
    checks wait on a busy database the web process is idle too, and a claim made then would
    be answered only when its agent's queued first check runs (seconds later, on a slow
    machine), which is not the delivery this measures.
    """
    started = time.monotonic()
    deadline = started + SETTLE_TIMEOUT
    while _established(port) < expected:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {_established(port)} of {expected} connections established")
        time.sleep(0.1)
    quiet = 0
    while quiet < 2 and time.monotonic() < deadline:
        before = _cpu_seconds(pid)
        time.sleep(0.5)
        idle = _cpu_seconds(pid) - before < 0.05 and _busy_backends() == 0
        quiet = quiet + 1 if idle else 0
    return time.monotonic() - started


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def measure(*, waiters: int, claims: int) -> dict[str, Any]:
    """``waiters`` parked long-polls, ``claims`` of them claimed one at a time; see the module."""
    from prebuilds.claims import claim_prebuild
    from workspaces import jobs
    from workspaces.models import WorkspaceBuild

    _raise_fd_limit(2 * waiters + 1024)  # the web process inherits it too
    preset = command_preset("bench-reinit", waiters)
    agents = insert_ready_prebuilds(preset, waiters)
    user, _ = user_with_token("bench-reinit")
    worker = "benchmark:reinit"

    latencies: list[float] = []
    claimed: set[str] = set()
    with session("reinit") as current:
        web = current.start_web()
        port = int(current.web_url.rsplit(":", 1)[1])
        polls = Waiters(current.web_url, [(str(w), token) for w, _, token in agents])
        polls.start()
        try:
            settle_seconds = _settle(web.pid, port, waiters)
            held = _established(port)
            web_rss = rss_mb(web.pid)
            for index in range(claims):
                workspace = claim_prebuild(user, preset, f"reinit-{index}")
                if workspace is None:
                    raise RuntimeError("no eligible prebuild left to claim")
                key = str(workspace.id)
                claimed.add(key)
                job_id = (
                    WorkspaceBuild.objects.filter(workspace_id=workspace.id, is_claim=True)
                    .values_list("job_id", flat=True)
                    .get()
                )
                jobs.job_acquire(job_id, worker=worker)
                jobs.job_complete(job_id, worker=worker, succeeded=True)
                committed = time.perf_counter()
                deadline = time.monotonic() + DELIVERY_TIMEOUT
                while key not in polls.delivered and time.monotonic() < deadline:
                    time.sleep(0.001)
                if key in polls.delivered:
                    latencies.append((polls.delivered[key][0] - committed) * 1000)
                time.sleep(0.05)  # one claim at a time
            time.sleep(1.0)  # room for any late (spurious) answer to arrive
            held_rss = rss_mb(web.pid)
            spurious = sum(
                len(times) if key not in claimed else len(times) - 1
                for key, times in polls.delivered.items()
            )
        finally:
            polls.stop()
    missed = claims - len(latencies)
    return {
        "reinit_delivery_p99_ms": round(percentile(latencies, 99), 1) if latencies else None,
        "reinit_delivery_p50_ms": round(statistics.median(latencies), 1) if latencies else None,
        "reinit_delivery_max_ms": round(max(latencies), 1) if latencies else None,
        "reinit_waiters": min(held, waiters),
        "reinit_claims": claims,
        "reinit_missed": missed,
        "reinit_spurious": spurious,
        "reinit_errors": polls.errors,
        "reinit_requests": polls.requests_sent,
        "reinit_settle_s": round(settle_seconds, 1),
        "reinit_web_rss_mb": max(filter(None, (web_rss, held_rss)), default=None),
    }


def run(*, quick: bool) -> dict[str, Any]:
    return measure(waiters=WAITERS, claims=20 if quick else 50)
