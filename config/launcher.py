"""``make run``: one command for a whole single-machine Warmstart, supervised.

Starts (or reuses) the embedded PostgreSQL and Redis unless ``DATABASE_URL`` /
``CELERY_BROKER_URL`` are set, migrates, loads the demo template, makes sure an admin account
exists (printing its password once, when it is created), then runs the processes of
``process_specs`` (the ASGI web server, Celery workers by role: people's builds, with threads
kept for claim builds, prebuild builds and the control plane, and Celery beat) as child
processes.

Supervision (one log line per event):

- A child that exits is started again after a back-off (``RESTART_DELAYS``: quick at first,
  slower while it keeps crashing; reset once it has run ``STABLE_AFTER`` seconds). Whatever
  its process group left behind (a killed Celery worker's pool processes) is killed first.
- The embedded PostgreSQL and Redis are checked every ``POLL`` seconds by their pid files and
  started again after a crash on the same data directory and unix socket, so every client
  reconnects on its own (config.embedded). After Redis restarts, every pending job is enqueued
  again at once (builds requested while it was down start now, not after the periodic sweep).
- Ctrl-C (or SIGTERM) stops every child (SIGTERM, then SIGKILL of its process group after
  ``STOP_TIMEOUT``), then the embedded servers, found by their pid files, so a server restarted
  meanwhile is stopped too — unless another process outside the launcher still uses them.

Workspace processes (agents and what their startup scripts started) are not children of the
launcher: they outlive it, like machines outlive their control plane, and reconnect when it is
back. ``python manage.py stop_workspaces`` stops them (README "Reliability").
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import django
from django.core.exceptions import ImproperlyConfigured

DEMO_TEMPLATE = Path(__file__).resolve().parent.parent / "examples" / "templates" / "demo.toml"
POLL = 0.5
# Seconds before restart number 1, 2, 3, … of a child that keeps crashing (then the last one).
RESTART_DELAYS = (0.5, 1, 2, 5, 10, 30)
# A child that ran this long before exiting crashed afresh: its back-off starts over.
STABLE_AFTER = 60.0
STOP_TIMEOUT = 15.0
SERVICE_RETRY = 2.0  # seconds between attempts to restart an embedded server that fails to start


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} launcher: {message}", flush=True)


def _prepare() -> dict[str, str]:
    """Migrate, seed, and return the environment every child process runs with."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    django.setup()
    from django.conf import settings
    from django.core.management import call_command, get_commands

    call_command("migrate", interactive=False, verbosity=0)
    _ensure_admin()
    if DEMO_TEMPLATE.exists() and "push_template" in get_commands():
        from workspaces.models import Template

        if not Template.objects.filter(name="demo").exists():
            call_command("push_template", str(DEMO_TEMPLATE))

    from config.env import database_url_of

    env = dict(os.environ)
    # Children talk to the servers this process started instead of each running the embedded
    # start-up dance; this process owns the embedded servers and stops them last.
    env["DATABASE_URL"] = database_url_of(settings.DATABASES["default"])
    env["CELERY_BROKER_URL"] = settings.CELERY_BROKER_URL
    env["PORT"] = str(settings.PORT)
    env["DATA_DIR"] = str(settings.DATA_DIR)
    return env


def _ensure_admin() -> None:
    from accounts.models import User

    if User.objects.filter(is_superuser=True).exists():
        print("Admin account exists (its password was printed when it was created).")
        return
    password = secrets.token_urlsafe(12)
    User.objects.create_superuser("admin", "admin@example.com", password)
    print("=" * 60)
    print("Created the admin account (shown only this once):")
    print("  username: admin")
    print(f"  password: {password}")
    print("=" * 60)


def _worker_command(python: str, name: str, queues: list[str], *, concurrency: int) -> list[str]:
    """A Celery worker on ``queues``; threads: builds mostly wait (for agents, for commands)."""
    return [
        python,
        "-m",
        "celery",
        "-A",
        "config",
        "worker",
        "--loglevel",
        "INFO",
        "--pool",
        "threads",
        "--concurrency",
        str(concurrency),
        "--hostname",
        f"{name}@{socket.gethostname()}",
        "--queues",
        ",".join(queues),
    ]


@dataclass(frozen=True)
class ProcessSpec:
    """One supervised child: its name in the log and its command line (run with the launcher's
    environment, in a session of its own)."""

    name: str
    command: list[str]


def process_specs(env: dict[str, str]) -> list[ProcessSpec]:
    """What ``make run`` runs and keeps running; add a process here and it is supervised."""
    from django.conf import settings

    from workspaces.routing import host_queue, worker_queues

    python = sys.executable
    port = env["PORT"]
    data_dir = env["DATA_DIR"]
    return [
        ProcessSpec(
            "web",
            [
                python,
                "-m",
                "uvicorn",
                "config.asgi:application",
                "--host",
                "127.0.0.1",
                "--port",
                port,
                "--no-access-log",
                # Agents hold reinit long-polls open; don't wait 30 s for them on Ctrl-C.
                "--timeout-graceful-shutdown",
                "3",
            ],
        ),
        # Three workers by role (workspaces.routing): people's builds, prebuild builds and the
        # control plane, so neither a claim nor a reconciliation pass waits behind a pool fill.
        # Each serves its shared queue and this host's queue of its role (the later builds of
        # the local workspaces whose processes live here).
        ProcessSpec(
            "worker",
            _worker_command(python, "worker", worker_queues("builds"), concurrency=4),
        ),
        ProcessSpec(
            "claim-worker",
            # This host's people's queue alone, where the claim builds of its prebuilds go (a
            # ~50 ms handover; and the later builds of its local workspaces). When the pool runs
            # dry, misses become cold builds that hold every thread of `worker` for as long as
            # a first build takes; a claim build then waited for one (seconds in the mixed
            # benchmark, minutes with a real template). These threads no cold build can take.
            _worker_command(python, "claim-worker", [host_queue()], concurrency=2),
        ),
        ProcessSpec(
            "prebuild-worker",
            # As many threads as prebuild builds may be in flight: created builds start at once.
            _worker_command(
                python,
                "prebuild-worker",
                worker_queues("prebuilds"),
                concurrency=settings.PREBUILDS_MAX_IN_FLIGHT or 10,
            ),
        ),
        ProcessSpec(
            "control",
            # Passes, refills and sweeps; two threads so a sweep never waits for a long pass.
            _worker_command(python, "control", worker_queues("control"), concurrency=2),
        ),
        ProcessSpec(
            "beat",
            [
                python,
                "-m",
                "celery",
                "-A",
                "config",
                "beat",
                "--loglevel",
                "INFO",
                "--schedule",
                str(Path(data_dir) / "celerybeat-schedule"),
            ],
        ),
    ]


@dataclass
class Child:
    """A supervised child process and its restart bookkeeping."""

    spec: ProcessSpec
    env: dict[str, str]
    popen: subprocess.Popen | None = None
    started_at: float = 0.0
    crashes: int = 0  # consecutive exits without a stable run in between
    restart_at: float | None = None

    def start(self, now: float) -> None:
        # Own session and process group: Ctrl-C reaches only the launcher, which stops the
        # children in order; and the group is what a restart cleans up.
        self.popen = subprocess.Popen(self.spec.command, env=self.env, start_new_session=True)
        self.started_at = now
        self.restart_at = None

    def check(self, now: float) -> None:
        """Notice an exit (schedule the restart) or start it again when its time has come."""
        if self.restart_at is not None:
            if now >= self.restart_at:
                self.start(now)
                log(f"{self.spec.name} restarted (pid {self.popen.pid})")
            return
        if self.popen is None or self.popen.poll() is None:
            return
        status = self.popen.returncode
        _kill_group(self.popen.pid)  # leftovers of the crashed process (a worker's pool)
        self.crashes = 1 if now - self.started_at >= STABLE_AFTER else self.crashes + 1
        delay = RESTART_DELAYS[min(self.crashes, len(RESTART_DELAYS)) - 1]
        self.restart_at = now + delay
        log(
            f"{self.spec.name} (pid {self.popen.pid}) exited with status {status}; "
            f"restart #{self.crashes} in {delay:g} s"
        )

    def terminate(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)

    def wait_stopped(self, deadline: float) -> None:
        if self.popen is None:
            return
        try:
            self.popen.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            log(f"{self.spec.name} did not stop in time; killing it")
        _kill_group(self.popen.pid)
        self.popen.wait()


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


@dataclass
class Service:
    """An embedded server the launcher watches by its pid file and restarts after a crash."""

    name: str
    running: Callable[[], int | None]
    restart: Callable[[], None]
    stop: Callable[[], None]
    in_use_elsewhere: Callable[[], bool]
    after_restart: Callable[[], None] | None = None
    retry_at: float = 0.0
    down_since: float | None = field(default=None)

    def check(self, now: float) -> None:
        if self.running() is not None or now < self.retry_at:
            return
        if self.down_since is None:
            self.down_since = now
            log(f"{self.name} (embedded) is not running; restarting it")
        try:
            self.restart()
        except Exception as exc:
            self.retry_at = now + SERVICE_RETRY
            log(f"{self.name} did not start ({exc!r}); retrying in {SERVICE_RETRY:g} s")
            return
        pid = self.running()
        if pid is None:
            # The crashed process is not reaped yet (its pid file still names it): try again.
            return
        took = time.monotonic() - self.down_since
        log(f"{self.name} restarted (pid {pid}), {took:.1f} s after it was found down")
        self.down_since = None
        if self.after_restart is not None:
            self.after_restart()


def services(data_dir: Path, names: set[str]) -> list[Service]:
    """The embedded servers this launcher runs: ``names`` of postgres and redis."""
    from config import embedded

    found = []
    if "postgres" in names:
        found.append(
            Service(
                "postgres",
                running=lambda: embedded.postgres_pid(data_dir),
                restart=lambda: embedded.restart_postgres(data_dir),
                stop=lambda: embedded.stop_postgres(data_dir),
                in_use_elsewhere=lambda: embedded.postgres_used_elsewhere(data_dir),
            )
        )
    if "redis" in names:
        found.append(
            Service(
                "redis",
                running=lambda: embedded.redis_pid(data_dir),
                restart=lambda: embedded.restart_redis(data_dir),
                stop=lambda: embedded.stop_redis(data_dir),
                in_use_elsewhere=lambda: embedded.redis_used_elsewhere(data_dir),
                after_restart=_requeue_pending_jobs,
            )
        )
    return found


def _requeue_pending_jobs() -> None:
    """After a broker crash: hand every pending job to the broker again now.

    Redis lost the messages since its last save, and jobs enqueued while it was down never
    reached it; the periodic sweep would find them only after 30-60 s. A job whose message did
    survive is now delivered twice, which is harmless (``jobs.job_acquire``: one delivery runs).
    """
    from datetime import timedelta

    from django.db import close_old_connections, connection

    from workspaces import jobs

    try:
        close_old_connections()
        requeued = jobs.jobs_requeue_pending(older_than=timedelta(0))
    except Exception as exc:  # the database may be down too; the sweep will do it later
        log(f"could not re-enqueue pending jobs ({exc!r}); the periodic sweep will")
        return
    finally:
        connection.close()  # back to the pool until the next time
    log(f"re-enqueued {len(requeued)} pending job(s) after the broker's restart")


def main() -> int:
    # The embedded servers this process starts, and so watches, restarts and stops; external
    # ones (DATABASE_URL / CELERY_BROKER_URL set) are someone else's to supervise.
    embedded_names = {
        name
        for name, variable in (("postgres", "DATABASE_URL"), ("redis", "CELERY_BROKER_URL"))
        if not os.environ.get(variable)
    }
    try:
        env = _prepare()
    except ImproperlyConfigured as exc:
        print(f"make run: {exc}", file=sys.stderr)
        return 2
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    watched = services(Path(env["DATA_DIR"]), embedded_names)
    children = [Child(spec, env) for spec in process_specs(env)]
    for child in children:
        child.start(time.monotonic())
    print(f"Warmstart is running on http://127.0.0.1:{env['PORT']}/ (Ctrl-C stops it)", flush=True)
    while not stopping:
        now = time.monotonic()
        # Servers first: a child restarted meanwhile finds its database there.
        for service in watched:
            service.check(now)
        for child in children:
            child.check(now)
        time.sleep(POLL)
    log("stopping")
    for child in children:
        child.terminate()
    deadline = time.monotonic() + STOP_TIMEOUT
    for child in children:
        child.wait_stopped(deadline)
    for service in watched:
        if service.in_use_elsewhere():
            log(f"{service.name} is still used by another process; leaving it running")
        else:
            service.stop()
    _mention_workspaces(Path(env["DATA_DIR"]))
    print("Stopped.", flush=True)
    return 0


def _mention_workspaces(data_dir: Path) -> None:
    """Workspaces outlive the launcher by design; say so, and how to stop them."""
    from workspaces.stopping import workspace_processes

    count = len(workspace_processes(data_dir))
    if count:
        log(
            f"{count} workspace process(es) keep running and reconnect when Warmstart is back; "
            "`python manage.py stop_workspaces` stops them"
        )


if __name__ == "__main__":
    sys.exit(main())
