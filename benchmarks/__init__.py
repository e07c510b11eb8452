"""`python -m benchmarks [--quick] --json`: the measurements of DESIGN.md section 10.

The harness creates a scratch database (`warmstart_bench`) on the same PostgreSQL server the
project uses (`DATABASE_URL`, else the embedded server under `DATA_DIR`), migrates it, runs
every measurement module against it, and drops it at the end, so a benchmark never touches
real data. Each module in `MODULES` has `run(*, quick: bool) -> dict` and answers some of the
contract's keys; keys no module answers yet are reported as null.
"""

from __future__ import annotations

import importlib
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
SCRATCH_DATABASE = "warmstart_bench"

# Measurement modules, run in this order. The whole-system mixed load goes first, on an empty
# database (beat's passes would otherwise reconcile every other module's pools meanwhile), and
# empties it again. The reconcile measurement comes next so that its counts see only its own
# presets; the claim module's seeded pools and templates come later.
MODULES = (
    "benchmarks.mixed",
    "benchmarks.reconcile",
    "benchmarks.floors",
    "benchmarks.claim",
    "benchmarks.reinit",
    "benchmarks.load",
    "benchmarks.sizing",  # simulated time only: no servers, no database
)

CONTRACT_KEYS = (
    "claim_ready_p50_ms",
    "cold_ready_p50_ms",
    "ready_speedup",
    "claim_api_p50_ms",
    "claim_api_p99_ms",
    "double_claims",
    "reinit_delivery_p99_ms",
    "reinit_waiters",
    "reconcile_pass_ms",
    "reconcile_presets",
    "reconcile_workspaces",
    "reconcile_queries",
    "claim_floor_p50_ms",
    "notify_floor_p99_ms",
    "machine",
    "database",
    "mixed_claim_ready_p50_ms",
    "mixed_claim_ready_p99_ms",
    "mixed_claims",
    "mixed_missed",
    "mixed_reconcile_gap_max_s",
    "mixed_refill_start_p50_ms",
    "mixed_metrics_staleness_max_s",
    "mixed_pool_size",
    "load_whole_system",
    "sizing_hit_rate",
    "sizing_idle_ratio",
    "sizing_fixed_size",
    "sizing_trace_requests",
)


def server_url() -> str:
    """A URL of the project's PostgreSQL server (its own database name is replaced later)."""
    url = os.environ.get("DATABASE_URL", "")
    if url:
        return url
    from config import embedded

    data_dir = Path(os.environ.get("DATA_DIR", ".data"))
    if not data_dir.is_absolute():
        data_dir = ROOT / data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    return embedded.database_url(data_dir)


def _with_database(url: str, name: str) -> str:
    return urlsplit(url)._replace(path=f"/{name}").geturl()


def _admin_connect(url: str):
    """An autocommit psycopg connection to the server's `postgres` database."""
    import dj_database_url
    import psycopg

    params = dj_database_url.parse(url)
    return psycopg.connect(
        dbname="postgres",
        user=params.get("USER") or None,
        password=params.get("PASSWORD") or None,
        host=params.get("HOST") or None,
        port=params.get("PORT") or None,
        autocommit=True,
    )


@contextmanager
def scratch_database() -> Iterator[str]:
    """Create (fresh) and migrate the scratch database, point Django at it; drop it at the end."""
    base = server_url()
    with _admin_connect(base) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{SCRATCH_DATABASE}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{SCRATCH_DATABASE}"')
    url = _with_database(base, SCRATCH_DATABASE)
    os.environ["DATABASE_URL"] = url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    # Pools at the scale of the goals (10,000 prebuilds; one preset of 16,000) are far above
    # the default bounds on pool sizes, which guard operators' input, not the benchmarks.
    os.environ.setdefault("PREBUILDS_MAX_INSTANCES_PER_PRESET", "1000000")
    os.environ.setdefault("PREBUILDS_MAX_INSTANCES_PER_ORGANIZATION", "100000000")
    # Pooled prebuilds inserted as rows (benchmarks.claim, .load) have no agent process to
    # report for them: they must stay connected for the run (an hour), in this process and in
    # the web processes it starts. Real agents (the mixed run) are unaffected.
    os.environ.setdefault("AGENT_DISCONNECT_TIMEOUT", "3600")
    try:
        import django
        from django.core.management import call_command

        django.setup()
        call_command("migrate", verbosity=0)
        yield url
    finally:
        from django.db import connections

        connections.close_all()
        with _admin_connect(base) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{SCRATCH_DATABASE}" WITH (FORCE)')


def scratch_reset() -> None:
    """Empty every table and put the system rows back: the scratch database as migrated.

    For a module whose figures depend on what the database holds (the dashboard computes
    every pool there is) or whose leftovers would disturb the next module (a pool that beat's
    passes would keep refilling).
    """
    from django.core.management import call_command

    from accounts.services import system_rows_ensure

    call_command("flush", interactive=False, verbosity=0)
    system_rows_ensure()


def machine_info() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu_model": model}


def database_info() -> str:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version")
        return f"PostgreSQL {cursor.fetchone()[0]}"


def run(*, quick: bool, only: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run every module (or those named in ``only``, e.g. ``("mixed", "load")``) in a scratch
    database; answer the contract's keys (null when unmeasured)."""
    results: dict[str, Any] = dict.fromkeys(CONTRACT_KEYS)
    with scratch_database():
        results["machine"] = machine_info()
        results["database"] = database_info()
        for name in MODULES:
            if only and name.removeprefix("benchmarks.") not in only:
                continue
            results.update(importlib.import_module(name).run(quick=quick))
    return results
