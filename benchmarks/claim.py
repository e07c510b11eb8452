"""Claiming a prebuild: the API under concurrency, and the user-visible time to a ready workspace.

Two measurements, each in a ``benchmarks.processes.Session`` of its own (temporary
``DATA_DIR``, broker of its own, real subprocesses on the scratch database):

**Ready** (``claim_ready_p50_ms``, ``cold_ready_p50_ms``, ``ready_speedup``) — end to end with
real parts: the processes ``make run`` starts (``Session.start_layout``: the uvicorn web process,
the Celery workers by role — people's builds, prebuild builds, control plane — and beat), the
local provisioner starting real agent processes, and the demo template
(``examples/templates/demo.toml``: a 6 s first-time step cached on disk, then a fast per-owner
step), pushed with ``template_push`` under another name with its pool sized to the number of
claim samples. The reconciler (called in-process) fills the pool; once every prebuild is ready:

- *cold*: ``POST /api/v2/workspaces`` with the preset that keeps no prebuilds, then
  ``GET /api/v2/workspaces/<id>`` every 25 ms until every agent says ``lifecycle_state ==
  "ready"``. The time is from just before the POST to the answer of the GET that showed it.
- *claim*: the same POST with the pooled preset (the answer must say ``claimed_prebuild:
  true``), then the same polling until every agent is ``ready`` *and* ``initialized_owner_id`` is
  the new owner — the agent re-initialised: claim transaction → claim build queued → the worker
  runs it → ``pg_notify`` → the web process wakes the agent's reinit long-poll → the agent
  re-fetches its manifest, reports ``starting``, re-runs the script (cached step skipped) and
  reports ``ready``. A poll only counts when the agent's ``lifecycle_changed_at`` is also later
  than the claim (checked in the database), so a stale ``ready`` from before the claim can
  never end the timer early, whatever the server does between manifest fetch and ``starting``.

Each claim triggers a refill (``prebuilds.refill``), so its replacement builds while the next
claims are measured, on the prebuild worker as in production; with one worker on every queue the
claim builds would wait behind the replacements (README "Benchmarks").

``ready_speedup`` is cold ÷ claim (medians). ``claim_ready_recorded_p50_ms`` (extra) is the
product's own claim-to-ready figure (``PrebuildClaim.ready_at - requested_at``).

**API** (``claim_api_p50_ms``, ``claim_api_p99_ms``, ``double_claims``, ``claim_api_errors``) —
one uvicorn web process and *no* worker (claim builds stay pending; we measure the API, not
provisioning). A preset with a pool of ready prebuilds (bulk-inserted: system-owned workspaces
whose latest build is a succeeded start with one ready agent), larger than the number of
requests. 20 client threads, each with its own user, API token and keep-alive
``http.client.HTTPConnection`` (``claim_api_client_cpu_ms``: their CPU per request), send two
warm-up claims each (a token's first use goes through the Django view, which writes its
``last_used_at``; the second warms the fast path, ``workspaces.fast_claim``), then start
together and each send ``POST /api/v2/workspaces {"name", "template_version_preset_id"}`` one
after another; every request's wall time is a sample. ``claim_api_errors`` counts 5xx
answers and transport errors; ``double_claims`` counts workspaces handed to more than one request
plus workspaces with more than one claim build (must be 0); every answer must be a 201 with
``claimed_prebuild: true`` (``claim_api_not_claimed`` counts the others).
"""

from __future__ import annotations

import http.client
import json
import statistics
import threading
import time
import tomllib
import uuid
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

from benchmarks.processes import (
    ROOT,
    cpu_seconds,
    database_backends,
    percentile,
    rss_mb,
    session,
)

DEMO_TEMPLATE = ROOT / "examples" / "templates" / "demo.toml"
POLL_INTERVAL = 0.025
READY_TIMEOUT = 90.0
POOL_TIMEOUT = 180.0

API_CLIENTS = 20
BATCH = 2000


# --- Seeding ---------------------------------------------------------------------------------


def user_with_token(username: str):
    """A new user (member of the default organization) and a plain API token for it."""
    from accounts.models import User
    from accounts.services import api_token_create

    user = User.objects.create_user(username=username)
    return user, api_token_create(user=user, name="benchmark")


def command_preset(name: str, desired: int):
    """A template (``command`` provisioner) whose active version has one preset keeping a pool."""
    from accounts.services import organization_default
    from workspaces.models import Template, TemplateVersion, TemplateVersionPreset

    template = Template.objects.create(organization=organization_default(), name=name)
    version = TemplateVersion.objects.create(
        template=template,
        number=1,
        name="v1",
        provisioner="command",
        provisioner_config={"command": ["/bin/true"]},
        parameters=[{"name": "repo", "default": "https://example.invalid/bench"}],
        agents=[{"name": "main", "startup_script": "true"}],
    )
    template.active_version = version
    template.save(update_fields=["active_version"])
    return TemplateVersionPreset.objects.create(
        template_version=version,
        name="pool",
        parameters={"repo": "https://example.invalid/bench"},
        desired_instances=desired,
    )


def insert_ready_prebuilds(preset, count: int) -> list[tuple[uuid.UUID, uuid.UUID, str]]:
    """Bulk-insert ``count`` ready prebuilds of ``preset``; answer (workspace, agent, token).

    Each is owned by the system user, its only build a succeeded ``start`` of the preset, with
    one agent that is ``ready`` and initialised for the system user, whose plain agent token is
    returned (the database keeps its hash, as ``agent_create`` does).
    """
    from django.db import transaction
    from django.utils import timezone

    from accounts import tokens
    from accounts.models import SYSTEM_USER_ID
    from workspaces.models import (
        AgentLifecycle,
        BuildReason,
        JobStatus,
        ProvisionerJob,
        Workspace,
        WorkspaceAgent,
        WorkspaceBuild,
    )
    from workspaces.services import AGENT_TOKEN_PREFIX

    version = preset.template_version
    now = timezone.now()
    rows: dict[type, list] = {Workspace: [], ProvisionerJob: [], WorkspaceBuild: []}
    agents, answer = [], []
    for _ in range(count):
        workspace = Workspace(
            id=uuid.uuid4(),
            organization_id=version.template.organization_id,
            template_id=version.template_id,
            owner_id=SYSTEM_USER_ID,
            name=f"prebuild-{uuid.uuid4().hex[:16]}",
            created_at=now,
        )
        job = ProvisionerJob(
            id=uuid.uuid4(),
            organization_id=workspace.organization_id,
            status=JobStatus.SUCCEEDED,
            started_at=now,
            completed_at=now,
        )
        build = WorkspaceBuild(
            id=uuid.uuid4(),
            workspace=workspace,
            build_number=1,
            transition="start",
            template_version=version,
            preset=preset,
            parameters=dict(preset.parameters),
            initiator_id=SYSTEM_USER_ID,
            reason=BuildReason.PREBUILD,
            job=job,
        )
        token = tokens.generate(AGENT_TOKEN_PREFIX)
        agent = WorkspaceAgent(
            id=uuid.uuid4(),
            workspace=workspace,
            build=build,
            name="main",
            token_key_id=token.key_id,
            token_secret_hash=token.secret_hash,
            lifecycle_state=AgentLifecycle.READY,
            lifecycle_changed_at=now,
            ready_at=now,
            last_seen_at=now,  # connected (see AGENT_DISCONNECT_TIMEOUT in scratch_database)
            initialized_owner_id=SYSTEM_USER_ID,
            initialized_at=now,
        )
        rows[Workspace].append(workspace)
        rows[ProvisionerJob].append(job)
        rows[WorkspaceBuild].append(build)
        agents.append(agent)
        answer.append((workspace.id, agent.id, token.token))
    with transaction.atomic():
        for model, items in rows.items():
            model.objects.bulk_create(items, batch_size=BATCH)
        WorkspaceAgent.objects.bulk_create(agents, batch_size=BATCH)
    return answer


# --- API under concurrency -------------------------------------------------------------------


def measure_api(*, per_client: int, clients: int = API_CLIENTS) -> dict[str, Any]:
    """``clients`` concurrent clients claiming through ``POST /api/v2/workspaces`` (no worker)."""
    from django.db import connection

    # Two warm-up requests per client: a token's first use goes through the Django view (it
    # writes the token's ``last_used_at``), the second warms the fast path (workspaces.fast_claim).
    warmup = 2
    pool = clients * (per_client + warmup) + 20  # never runs dry
    preset = command_preset("bench-claim-api", pool)
    insert_ready_prebuilds(preset, pool)
    with connection.cursor() as cursor:
        # Let the database settle first: the earlier modules bulk-inserted tens of thousands
        # of rows, and the autovacuum they trigger would otherwise run inside this window
        # (it doubled the database's CPU per claim in a full run).
        cursor.execute("VACUUM ANALYZE")
    tokens = [user_with_token(f"bench-api-{index}")[1] for index in range(clients)]

    with session("api") as current:
        current.start_web()
        address = urlsplit(f"{current.web_url}/api/v2/workspaces")
        barrier = threading.Barrier(clients)
        latencies: list[float] = []
        answers: list[tuple[int, dict | None]] = []
        lock = threading.Lock()

        def client(index: int, token: str) -> None:
            # The standard library's keep-alive HTTP client, not httpx: on a 2-core machine the
            # load generator shares the CPU with the server, and httpx spent ~1.9 ms of CPU per
            # request (a third of the claim's whole budget) against ~0.4 ms for http.client.
            headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
            mine: list[float] = []
            got: list[tuple[int, dict | None]] = []
            connection_ = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
            try:
                for round_ in range(warmup + per_client):
                    if round_ == warmup:
                        barrier.wait()  # everyone warm, then all start together
                    body = json.dumps(
                        {"name": f"c{index}-{round_}", "template_version_preset_id": str(preset.id)}
                    )
                    started = time.perf_counter()
                    try:
                        connection_.request("POST", address.path, body=body, headers=headers)
                        response = connection_.getresponse()
                        status, payload = response.status, response.read()
                    except (OSError, http.client.HTTPException):
                        connection_.close()  # reconnects on the next request
                        status, payload = 599, b""
                    elapsed = (time.perf_counter() - started) * 1000
                    document = None
                    if status < 500:
                        try:
                            document = json.loads(payload)
                        except ValueError:
                            document = None
                    got.append((status, document))
                    if round_ >= warmup:
                        mine.append(elapsed)
            finally:
                connection_.close()
            with lock:
                latencies.extend(mine)
                answers.extend(got)

        threads = [
            threading.Thread(target=client, args=(index, token), name=f"claim-client-{index}")
            for index, token in enumerate(tokens)
        ]
        web = current.processes[0].pid
        # Everything on the machine that serves a claim: the web process and the database
        # backends (those the pool opens during the run count from their start).
        cpu_before = cpu_seconds([web, *database_backends()])
        client_cpu_before = time.process_time()  # this process: the 20 client threads
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
        cpu_after = cpu_seconds([web, *database_backends()])
        client_cpu = time.process_time() - client_cpu_before
        used = {pid: cpu_after[pid] - cpu_before.get(pid, 0.0) for pid in cpu_after}
        web_rss = rss_mb(web)

    errors = sum(1 for status, _ in answers if status >= 500)
    not_claimed = sum(
        1
        for status, document in answers
        if status != 201 or not (document or {}).get("claimed_prebuild")
    )
    handed = Counter(document["id"] for status, document in answers if status == 201 and document)
    double_claims = sum(1 for count in handed.values() if count > 1)
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT count(*) FROM (
                SELECT workspace_id FROM workspaces_workspacebuild
                WHERE is_claim GROUP BY workspace_id HAVING count(*) > 1
            ) doubled
            """
        )
        double_claims += cursor.fetchone()[0]
    return {
        "claim_api_p50_ms": round(statistics.median(latencies), 1),
        "claim_api_p99_ms": round(percentile(latencies, 99), 1),
        "claim_api_max_ms": round(max(latencies), 1),
        "claim_api_requests": len(latencies),
        "claim_api_clients": clients,
        "claim_api_rps": round(len(answers) / wall, 1),
        "claim_api_errors": errors,
        "claim_api_not_claimed": not_claimed,
        "claim_api_web_rss_mb": web_rss,
        # CPU spent per request by the web process and by the database server's backends
        # (None when the server is not on this machine): where a claim's cost lies.
        "claim_api_web_cpu_ms": round(used.get(web, 0.0) * 1000 / len(latencies), 2),
        "claim_api_db_cpu_ms": (
            round(sum(v for k, v in used.items() if k != web) * 1000 / len(latencies), 2)
            if len(used) > 1
            else None
        ),
        "claim_api_client_cpu_ms": round(client_cpu * 1000 / len(latencies), 2),
        "double_claims": double_claims,
    }


# --- Ready, end to end ------------------------------------------------------------------------


def push_demo_template(*, pool: int):
    """Push the demo template as ``bench-demo`` with a pool of ``pool``; (pooled, cold) presets."""
    from accounts.services import organization_default
    from workspaces.template_files import validate_document
    from workspaces.template_services import template_push

    source = DEMO_TEMPLATE.read_text()
    document = tomllib.loads(source)
    document["name"] = "bench-demo"
    pooled = cold = None
    for preset in document["presets"]:
        if "prebuilds" in preset:
            preset["prebuilds"] = {"instances": pool}
    spec = validate_document(document, base_dir=DEMO_TEMPLATE.parent)
    version = template_push(organization=organization_default(), spec=spec, source=source)
    for preset in version.presets.all():
        if preset.desired_instances:
            pooled = preset
        else:
            cold = preset
    if pooled is None or cold is None:
        raise RuntimeError(f"{DEMO_TEMPLATE} needs a preset with prebuilds and one without")
    return pooled, cold


def fill_pool(preset, count: int) -> float:
    """Run the reconciler until ``count`` prebuilds of ``preset`` are ready; answer seconds."""
    from django.conf import settings
    from django.db import connection

    from prebuilds import eligibility
    from prebuilds.reconciler import reconcile

    started = time.monotonic()
    deadline = started + POOL_TIMEOUT
    params = eligibility.params(disconnect_timeout=settings.AGENT_DISCONNECT_TIMEOUT)
    last_pass = 0.0
    while True:
        if time.monotonic() - last_pass > 5:
            reconcile()
            last_pass = time.monotonic()
        with connection.cursor() as cursor:
            # Claimable as the claim judges it (prebuilds.eligibility), per preset.
            cursor.execute(eligibility.CLAIMABLE_COUNTS_SQL, params)
            ready = dict(cursor.fetchall()).get(preset.id, 0)
        if ready >= count:
            return time.monotonic() - started
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {ready} of {count} prebuilds became ready")
        time.sleep(0.25)


def _agent_changed_after_claim(workspace_id: str) -> bool:
    """Whether every current agent changed lifecycle after the workspace was claimed."""
    from django.db.models import F

    from workspaces.models import WorkspaceAgent

    agents = WorkspaceAgent.objects.filter(workspace_id=workspace_id, retired_at__isnull=True)
    stale = agents.exclude(lifecycle_changed_at__gt=F("workspace__claimed_at"))
    return agents.exists() and not stale.exists()


def time_to_ready(http, base: str, body: dict, *, owner_id: str | None) -> tuple[float, dict]:
    """POST a workspace, poll it until ready (for ``owner_id``, when given); (ms, POST answer)."""
    started = time.perf_counter()
    response = http.post(f"{base}/api/v2/workspaces", json=body)
    if response.status_code != 201:
        raise RuntimeError(f"POST /api/v2/workspaces: {response.status_code} {response.text}")
    created = response.json()
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        document = http.get(f"{base}/api/v2/workspaces/{created['id']}").json()
        elapsed = (time.perf_counter() - started) * 1000
        agents = document.get("agents") or []
        ready = bool(agents) and all(a["lifecycle_state"] == "ready" for a in agents)
        if ready and owner_id is not None:
            ready = all(a["initialized_owner_id"] == owner_id for a in agents)
            ready = ready and _agent_changed_after_claim(created["id"])
        if ready:
            return elapsed, created
        if time.monotonic() > deadline:
            raise RuntimeError(f"workspace {created['id']} not ready in time: {document}")
        time.sleep(POLL_INTERVAL)


def measure_ready(*, claims: int, colds: int) -> dict[str, Any]:
    """Cold build vs claim, each timed until the user's workspace is ready (real processes)."""
    import httpx
    from django.db.models import F

    from prebuilds.models import PrebuildClaim

    pooled, cold_preset = push_demo_template(pool=claims)
    user, token = user_with_token("bench-ready")
    cold_ms: list[float] = []
    claim_ms: list[float] = []
    with session("ready") as current:
        current.start_layout()
        fill_seconds = fill_pool(pooled, claims)
        base = current.web_url
        with httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
            for index in range(colds):
                body = {"name": f"cold-{index}", "template_version_preset_id": str(cold_preset.id)}
                elapsed, created = time_to_ready(http, base, body, owner_id=None)
                if created["claimed_prebuild"]:
                    raise RuntimeError("a cold build came from a pool")
                cold_ms.append(elapsed)
            claimed_ids = []
            for index in range(claims):
                time.sleep(0.2)
                body = {"name": f"claim-{index}", "template_version_preset_id": str(pooled.id)}
                elapsed, created = time_to_ready(http, base, body, owner_id=str(user.id))
                if not created["claimed_prebuild"]:
                    raise RuntimeError("the pool was empty: the claim sample was a cold build")
                claim_ms.append(elapsed)
                claimed_ids.append(created["id"])
        agents_stopped = current.stop_agents()
    recorded = [
        delta.total_seconds() * 1000
        for delta in PrebuildClaim.objects.filter(
            workspace_id__in=claimed_ids, ready_at__isnull=False
        )
        .annotate(took=F("ready_at") - F("requested_at"))
        .values_list("took", flat=True)
    ]
    claim_p50 = statistics.median(claim_ms)
    cold_p50 = statistics.median(cold_ms)
    return {
        "claim_ready_p50_ms": round(claim_p50, 1),
        "claim_ready_max_ms": round(max(claim_ms), 1),
        "claim_ready_samples": len(claim_ms),
        "claim_ready_recorded_p50_ms": round(statistics.median(recorded), 1) if recorded else None,
        "cold_ready_p50_ms": round(cold_p50, 1),
        "cold_ready_samples": len(cold_ms),
        "ready_speedup": round(cold_p50 / claim_p50, 1),
        "ready_pool_fill_s": round(fill_seconds, 1),
        "ready_agents_stopped": agents_stopped,
    }


def run(*, quick: bool) -> dict[str, Any]:
    # Ready first: it runs the reconciler, which must not meet the API measurement's pool.
    results = measure_ready(claims=5 if quick else 15, colds=3 if quick else 5)
    results.update(measure_api(per_client=10 if quick else 50))
    return results
