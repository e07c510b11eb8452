"""The physical floors: what the database alone costs, measured on the same server and database.

Every other figure of the run can be read as a multiple of these:

- ``claim_floor_p50_ms``: median wall time of one claim done as raw SQL with psycopg (no Django,
  no HTTP): in one transaction, ``UPDATE … SET owner_id = … WHERE id = (SELECT … FOR UPDATE SKIP
  LOCKED LIMIT 1) RETURNING id``, then ``SELECT pg_notify(…)``, then ``COMMIT`` — three round
  trips plus the commit's WAL flush, on a small dedicated table of ready rows (a partial index
  on the unclaimed ones, like a pool). Timed from before the ``UPDATE`` until ``COMMIT`` returns.
- ``claim_floor_one_statement_p50_ms`` (extra): the same claim and notification as a single
  autocommitted statement (a data-modifying CTE): one round trip, the absolute floor.
- ``notify_floor_p99_ms``: 99th percentile of raw ``NOTIFY`` delivery: one connection runs
  ``NOTIFY`` (autocommit), a ``LISTEN``-ing connection in another thread receives it; the latency
  is the time from just before the sender's ``execute`` until the listener thread holds the
  notification (both read from the same monotonic clock). Samples are sent one at a time.
"""

from __future__ import annotations

import queue
import statistics
import threading
import time
import uuid
from typing import Any

from benchmarks.processes import percentile, psycopg_params

TABLE = "bench_claim_floor"
CHANNEL = "bench_notify_floor"

CLAIM_SQL = f"""
UPDATE {TABLE} SET owner_id = %(owner)s, claimed_at = now()
WHERE id = (
    SELECT id FROM {TABLE} WHERE owner_id IS NULL ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED
)
RETURNING id
"""

CLAIM_ONE_STATEMENT_SQL = f"""
WITH claimed AS ({CLAIM_SQL})
SELECT pg_notify('{CHANNEL}_claim', claimed.id::text) FROM claimed
"""


def _connect(*, autocommit: bool):
    import psycopg

    return psycopg.connect(**psycopg_params(), autocommit=autocommit)


def claim_floor(samples: int) -> dict[str, Any]:
    """Median (and p99) of the raw-SQL claim transaction, and of its one-statement form."""
    with _connect(autocommit=True) as setup:
        setup.execute(f"DROP TABLE IF EXISTS {TABLE}")
        setup.execute(
            f"CREATE TABLE {TABLE} (id bigserial PRIMARY KEY, owner_id uuid, "
            "claimed_at timestamptz, created_at timestamptz NOT NULL DEFAULT now())"
        )
        setup.execute(f"CREATE INDEX ON {TABLE} (id) WHERE owner_id IS NULL")
        setup.execute(
            f"INSERT INTO {TABLE} (owner_id) SELECT NULL FROM generate_series(1, %s)",
            [2 * samples + 100],
        )
        setup.execute(f"ANALYZE {TABLE}")
    transaction_ms: list[float] = []
    statement_ms: list[float] = []
    try:
        with _connect(autocommit=False) as conn, _connect(autocommit=True) as auto:
            for index in range(samples + 10):  # the first 10 warm the caches and are dropped
                owner = uuid.uuid4()
                started = time.perf_counter()
                with conn.cursor() as cursor:
                    cursor.execute(CLAIM_SQL, {"owner": owner})
                    (claimed,) = cursor.fetchone()
                    cursor.execute("SELECT pg_notify(%s, %s)", [CHANNEL + "_claim", str(claimed)])
                conn.commit()
                elapsed = (time.perf_counter() - started) * 1000
                started = time.perf_counter()
                row = auto.execute(CLAIM_ONE_STATEMENT_SQL, {"owner": uuid.uuid4()}).fetchone()
                one = (time.perf_counter() - started) * 1000
                if row is None:
                    raise RuntimeError("the claim floor table ran dry")
                if index >= 10:
                    transaction_ms.append(elapsed)
                    statement_ms.append(one)
    finally:
        with _connect(autocommit=True) as cleanup:
            cleanup.execute(f"DROP TABLE IF EXISTS {TABLE}")
    return {
        "claim_floor_p50_ms": round(statistics.median(transaction_ms), 2),
        "claim_floor_p99_ms": round(percentile(transaction_ms, 99), 2),
        "claim_floor_one_statement_p50_ms": round(statistics.median(statement_ms), 2),
    }


def notify_floor(samples: int) -> dict[str, Any]:
    """p50/p99 of raw NOTIFY → LISTEN delivery between two connections of this process."""
    received: queue.Queue[tuple[str, float]] = queue.Queue()
    listening = threading.Event()
    stop = threading.Event()

    def listen() -> None:
        with _connect(autocommit=True) as conn:
            conn.execute(f"LISTEN {CHANNEL}")
            listening.set()
            while not stop.is_set():
                for notify in conn.notifies(timeout=0.2):
                    received.put((notify.payload, time.perf_counter()))

    thread = threading.Thread(target=listen, name="notify-floor-listener", daemon=True)
    thread.start()
    if not listening.wait(10):
        raise RuntimeError("the LISTEN connection did not start")
    latencies: list[float] = []
    lost = 0
    try:
        with _connect(autocommit=True) as sender:
            for index in range(samples + 10):
                payload = str(index)
                sent = time.perf_counter()
                sender.execute(f"NOTIFY {CHANNEL}, '{payload}'")
                try:
                    got, at = received.get(timeout=5)
                except queue.Empty:
                    lost += 1
                    continue
                if got != payload:
                    raise RuntimeError(f"notification out of order: {got!r} for {payload!r}")
                if index >= 10:
                    latencies.append((at - sent) * 1000)
                time.sleep(0.002)  # one at a time, like claims arriving apart
    finally:
        stop.set()
        thread.join(5)
    return {
        "notify_floor_p50_ms": round(statistics.median(latencies), 2),
        "notify_floor_p99_ms": round(percentile(latencies, 99), 2),
        "notify_floor_lost": lost,
    }


def run(*, quick: bool) -> dict[str, Any]:
    samples = 300 if quick else 2000
    results = claim_floor(samples)
    results.update(notify_floor(samples))
    results["floor_samples"] = samples
    return results
