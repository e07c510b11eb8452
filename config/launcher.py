"""``make run``: one command for a whole single-machine Warmstart.

Starts (or reuses) the embedded PostgreSQL and Redis unless ``DATABASE_URL`` /
``CELERY_BROKER_URL`` are set, migrates, loads the demo template, makes sure an admin account
exists (printing its password once, when it is created), then runs the ASGI web server,
Celery workers by role (people's builds, prebuild builds, the control plane) and Celery beat as
child processes. Ctrl-C (or SIGTERM) stops all of them, and the embedded servers with them.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import django

DEMO_TEMPLATE = Path(__file__).resolve().parent.parent / "examples" / "templates" / "demo.toml"


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


def _children(env: dict[str, str]) -> list[tuple[str, list[str]]]:
    from django.conf import settings

    from workspaces.routing import worker_queues

    python = sys.executable
    port = env["PORT"]
    data_dir = env["DATA_DIR"]
    return [
        (
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
        (
            "worker",
            _worker_command(python, "worker", worker_queues("builds"), concurrency=4),
        ),
        (
            "prebuild-worker",
            # As many threads as prebuild builds may be in flight: created builds start at once.
            _worker_command(
                python,
                "prebuild-worker",
                worker_queues("prebuilds"),
                concurrency=settings.PREBUILDS_MAX_IN_FLIGHT or 10,
            ),
        ),
        (
            "control",
            # Passes, refills and sweeps; two threads so a sweep never waits for a long pass.
            _worker_command(python, "control", worker_queues("control"), concurrency=2),
        ),
        (
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


def main() -> int:
    env = _prepare()
    processes: dict[str, subprocess.Popen] = {}
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    for name, command in _children(env):
        # Own process group: Ctrl-C reaches us once, and we stop the children in order.
        processes[name] = subprocess.Popen(command, env=env, start_new_session=True)
    print(f"Warmstart is running on http://127.0.0.1:{env['PORT']}/ (Ctrl-C stops it)")
    exit_code = 0
    while not stopping:
        for name, process in processes.items():
            if process.poll() is not None:
                print(f"{name} exited with status {process.returncode}; stopping everything.")
                exit_code, stopping = 1, True
                break
        time.sleep(0.5)
    for process in processes.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    for process in processes.values():
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            process.kill()
    print("Stopped.")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
