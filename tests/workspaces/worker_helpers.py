"""Helpers for tests that run real processes: bounded waits, pid checks, templates, workers."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from config.embedded import pid_alive  # noqa: F401  (the worker tests import it from here)
from tests.processes import process_env
from tests.workspaces.factories import TemplateFactory
from workspaces import routing
from workspaces.models import Template

REPO_ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T], *, timeout: float = 10.0, interval: float = 0.05, what: str = ""
) -> T:
    """Poll ``predicate`` until it answers something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what or predicate}")
        time.sleep(interval)


def proc_cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def proc_environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
    return dict(item.split("=", 1) for item in raw if "=" in item)


def kill_group(pid: int) -> None:
    """SIGKILL a process group (cleanup in ``finally``; never fails)."""
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)


def closed_port_url() -> str:
    """An http URL on which nothing listens (agents retry against it; that is fine)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def write_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def command_template(command: list[str], *, agents: list[dict] | None = None) -> Template:
    """A template whose active version uses the command provisioner with ``command``."""
    return TemplateFactory(
        with_version__provisioner="command",
        with_version__provisioner_config={"command": command},
        with_version__agents=agents
        if agents is not None
        else [{"name": "main", "startup_script": "echo hi"}],
    )


@contextlib.contextmanager
def celery_worker(data_dir: Path, *, heartbeat_interval: float = 0.3) -> Iterator[Worker]:
    """A real ``celery worker --pool solo`` on every queue (``routing.worker_queues()``), always
    killed."""
    env = process_env(
        DATA_DIR=str(data_dir),
        ACCESS_URL=closed_port_url(),
        PROVISIONER_HEARTBEAT_INTERVAL=str(heartbeat_interval),
    )
    log_path = data_dir / "worker.log"
    queues = ",".join(routing.worker_queues())
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "config",
                "worker",
                "--pool",
                "solo",
                "--queues",
                queues,
                "--loglevel",
                "INFO",
                "--hostname",
                f"test-{os.getpid()}@%h",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
            ],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    worker = Worker(process, log_path)
    try:
        yield worker
    finally:
        worker.kill()


class Worker:
    def __init__(self, process: subprocess.Popen, log_path: Path) -> None:
        self.process = process
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        kill_group(self.process.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
