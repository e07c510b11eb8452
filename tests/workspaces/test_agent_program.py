"""The workspace agent program, run as a real subprocess against a fake control plane.

These tests check the program's own behaviour — lifecycle order, the startup
script's environment, retries, reinit, signals, exit statuses — so the fake
control plane is a small ``ThreadingHTTPServer`` the tests script. Tests
against the live Django server live elsewhere.
"""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

import pytest

from config.embedded import pid_alive
from workspaces.agent.agent import Backoff, Manifest, script_environment

pytestmark = pytest.mark.timeout(30)

REPO_ROOT = Path(__file__).resolve().parents[2]
TOKEN = "agent-token-7c1e"
AGENT_PATH = "/api/v2/workspaceagents/me/"
PREBUILDS_OWNER = {"id": "c42fdf75-3097-471c-8c33-fb52454d81c0", "username": "prebuilds"}
ALICE = {"id": "0d7d6a1e-36a4-4d47-9a37-2d0c2bbd8d55", "username": "alice"}
# Fast retries and a short shutdown so the whole file runs in seconds.
FAST = ["--backoff-base", "0.02", "--backoff-max", "0.1", "--shutdown-timeout", "2"]
SCRIPT_PREFIX = "[startup_script] "

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T], *, timeout: float = 5.0, describe: Callable[[], str] = str
) -> T:
    """Poll ``predicate`` until it is truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s\n{describe()}")
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# -- the fake control plane -----------------------------------------------------


@dataclass
class Recorded:
    method: str
    endpoint: str  # "manifest", "lifecycle", "reinit", or the unknown path
    query: dict[str, list[str]]
    authorization: str | None
    body: Any
    status: int | None = None  # None while the answer is pending (a long-poll)


class FakeControlPlane:
    """Answers the agent endpoints of DESIGN.md §7 and records every request.

    Scripting: ``manifest`` is served as is; ``fail(endpoint, *statuses)``
    answers the next requests to that endpoint with those statuses;
    ``claim(owner)`` gives the workspace a new owner and answers the pending
    (or next) reinit poll with 200. Reinit polls otherwise hold for
    ``reinit_hold`` seconds and answer 204, like a short long-poll.
    """

    def __init__(self) -> None:
        self.token = TOKEN
        self.manifest: dict[str, Any] = {
            "agent_id": "a9f3c2d4-8d2b-4a0e-9d8c-5a4e3b2c1d0e",
            "agent_name": "main",
            "workspace_id": "5b1c7e2a-1f3d-4c5b-8a9e-0d1f2e3c4b5a",
            "workspace_name": "prebuild-abcdefgh",
            "owner": PREBUILDS_OWNER,
            "is_prebuild": True,
            "startup_script": "",
            "environment": {},
        }
        self.reinit_hold = 0.2
        self.requests: list[Recorded] = []
        self.port = 0
        self._failures: dict[str, list[int]] = {}
        self._reinit_events: list[dict[str, str]] = []
        self._cond = threading.Condition()
        self._closing = False
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, port: int = 0) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler_class())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def fail(self, endpoint: str, *statuses: int) -> None:
        with self._cond:
            self._failures.setdefault(endpoint, []).extend(statuses)

    def claim(self, owner: dict[str, str]) -> None:
        with self._cond:
            self.manifest = {**self.manifest, "owner": owner, "is_prebuild": False}
            self._reinit_events.append(
                {
                    "workspace_id": self.manifest["workspace_id"],
                    "owner_id": owner["id"],
                    "reason": "prebuild_claimed",
                }
            )
            self._cond.notify_all()

    def answered(self, endpoint: str, status: int | None = None) -> list[Recorded]:
        with self._cond:
            return [
                r
                for r in self.requests
                if r.endpoint == endpoint
                and r.status is not None
                and (status is None or r.status == status)
            ]

    def states(self) -> list[str]:
        """The lifecycle states the control plane accepted, in order."""
        return [r.body["state"] for r in self.answered("lifecycle", 204)]

    def _answer(self, record: Recorded) -> tuple[int, Any]:
        with self._cond:
            self.requests.append(record)
            failures = self._failures.get(record.endpoint)
            if failures:
                return failures.pop(0), {"error": "unavailable", "detail": "scripted failure"}
            if record.authorization != f"Bearer {self.token}":
                return 401, {"error": "unauthenticated", "detail": "invalid agent token"}
            if record.endpoint == "manifest" and record.method == "GET":
                return 200, copy.deepcopy(self.manifest)
            if record.endpoint == "lifecycle" and record.method == "POST":
                return 204, None
            if record.endpoint == "reinit" and record.method == "GET":
                self._cond.wait_for(
                    lambda: self._reinit_events or self._closing, timeout=self.reinit_hold
                )
                if self._reinit_events:
                    return 200, self._reinit_events.pop(0)
                return 204, None
            return 404, {"error": "not_found", "detail": record.endpoint}

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self._serve()

            def do_POST(self) -> None:
                self._serve()

            def _serve(self) -> None:
                url = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                record = Recorded(
                    method=self.command,
                    endpoint=url.path.removeprefix(AGENT_PATH),
                    query=parse_qs(url.query),
                    authorization=self.headers.get("Authorization"),
                    body=json.loads(raw) if raw else None,
                )
                status, document = fake._answer(record)
                payload = b"" if document is None else json.dumps(document).encode()
                self.send_response(status)
                if payload:
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                with fake._cond:
                    record.status = status

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


# -- the agent process -----------------------------------------------------------


class AgentProcess:
    """``python -m workspaces.agent`` with its stdout and stderr collected line by line."""

    def __init__(self, args: list[str], *, cwd: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workspaces.agent", *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._pumps = [
            threading.Thread(target=self._pump, args=(stream, lines), daemon=True)
            for stream, lines in ((self.proc.stdout, self.stdout), (self.proc.stderr, self.stderr))
        ]
        for pump in self._pumps:
            pump.start()

    @staticmethod
    def _pump(stream: Any, lines: list[str]) -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))

    def describe(self) -> str:
        return (
            "agent stderr:\n"
            + "\n".join(self.stderr)
            + "\nagent stdout:\n"
            + "\n".join(self.stdout)
        )

    def wait(self, timeout: float = 5.0) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            message = f"agent still running after {timeout}s\n{self.describe()}"
            raise AssertionError(message) from exc
        for pump in self._pumps:
            pump.join(1)
        return code

    def is_running(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.is_running():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def control_plane() -> Iterator[FakeControlPlane]:
    fake = FakeControlPlane()
    fake.start()
    yield fake
    fake.close()


@pytest.fixture
def agent_env() -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if key != "WORKSPACE_AGENT_TOKEN" and "proxy" not in key.lower()
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["WORKSPACE_AGENT_TOKEN"] = TOKEN
    env["INHERITED_VAR"] = "from-the-agent"
    return env


@pytest.fixture
def start_agent(
    tmp_path: Path, control_plane: FakeControlPlane, agent_env: dict[str, str]
) -> Iterator[Callable[..., AgentProcess]]:
    started: list[AgentProcess] = []

    def start(*args: str, url: str | None = None, env: dict[str, str] | None = None):
        agent = AgentProcess(
            ["--url", url or control_plane.url, *FAST, *args],
            cwd=tmp_path,
            env=agent_env if env is None else env,
        )
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.stop()


def wait_for_states(
    control_plane: FakeControlPlane, agent: AgentProcess, expected: list[str]
) -> None:
    wait_until(
        lambda: control_plane.states() == expected,
        describe=lambda: f"states {control_plane.states()} != {expected}\n{agent.describe()}",
    )


# -- start-up ----------------------------------------------------------------------


def test_it_fetches_the_manifest_reports_starting_runs_the_script_and_reports_ready(
    control_plane: FakeControlPlane, start_agent: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    control_plane.manifest["environment"] = {
        "PARAM_X": "x-value",
        "WORKSPACE_OWNER": "spoofed",  # the manifest's own fields win
    }
    control_plane.manifest["startup_script"] = "\n".join(
        [
            "echo 'hello from the script'",
            "{",
            '  echo "owner=$WORKSPACE_OWNER"',
            '  echo "id=$WORKSPACE_ID"',
            '  echo "name=$WORKSPACE_NAME"',
            '  echo "prebuild=$WORKSPACE_IS_PREBUILD"',
            '  echo "param=$PARAM_X"',
            '  echo "inherited=$INHERITED_VAR"',
            '  echo "token=${WORKSPACE_AGENT_TOKEN-unset}"',
            "} > env.txt",
        ]
    )
    agent = start_agent()

    wait_for_states(control_plane, agent, ["starting", "ready"])
    wait_until(lambda: control_plane.answered("reinit"), describe=agent.describe)

    endpoints = [(r.endpoint, r.body) for r in control_plane.requests]
    assert endpoints[:4] == [
        ("manifest", None),
        ("lifecycle", {"state": "starting"}),
        ("lifecycle", {"state": "ready"}),
        ("reinit", None),
    ]
    assert {r.authorization for r in control_plane.requests} == {f"Bearer {TOKEN}"}
    assert control_plane.answered("reinit")[0].query == {"wait": ["30"]}
    # Relative path: the script ran in the agent's working directory.
    assert (tmp_path / "env.txt").read_text().splitlines() == [
        "owner=prebuilds",
        f"id={control_plane.manifest['workspace_id']}",
        "name=prebuild-abcdefgh",
        "prebuild=true",
        "param=x-value",
        "inherited=from-the-agent",
        "token=unset",
    ]
    assert f"{SCRIPT_PREFIX}hello from the script" in agent.stdout
    assert any("lifecycle: ready" in line for line in agent.stderr)
    assert agent.is_running()


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("true", "ready"),
        ("", "ready"),
        ("  \n", "ready"),
        ("echo failing; exit 7", "start_error"),
        ("kill -KILL $$", "start_error"),
    ],
)
def test_it_reports_the_script_result(
    control_plane: FakeControlPlane,
    start_agent: Callable[..., AgentProcess],
    script: str,
    expected: str,
) -> None:
    control_plane.manifest["startup_script"] = script
    agent = start_agent()

    wait_for_states(control_plane, agent, ["starting", expected])
    # Whatever the result, the agent stays and waits for a claim.
    wait_until(lambda: control_plane.answered("reinit"), describe=agent.describe)
    assert agent.is_running()


# -- resilience --------------------------------------------------------------------


def test_it_retries_until_the_control_plane_comes_up(
    start_agent: Callable[..., AgentProcess],
) -> None:
    port = free_port()
    agent = start_agent(url=f"http://127.0.0.1:{port}")
    late = FakeControlPlane()
    try:
        # Start the control plane only once the agent has demonstrably failed
        # to reach it twice.
        wait_until(
            lambda: sum("fetch manifest failed" in line for line in agent.stderr) >= 2,
            describe=agent.describe,
        )
        late.start(port)

        wait_for_states(late, agent, ["starting", "ready"])
        assert [r.status for r in late.answered("manifest")] == [200]
    finally:
        agent.stop()
        late.close()


def test_it_retries_5xx_answers_and_never_drops_a_lifecycle_state(
    control_plane: FakeControlPlane, start_agent: Callable[..., AgentProcess]
) -> None:
    control_plane.fail("manifest", 503, 503)
    control_plane.fail("lifecycle", 503, 502, 500)
    control_plane.fail("reinit", 503)
    agent = start_agent()

    wait_for_states(control_plane, agent, ["starting", "ready"])
    wait_until(lambda: control_plane.answered("reinit", 204), describe=agent.describe)

    assert [r.status for r in control_plane.answered("manifest")] == [503, 503, 200]
    assert [(r.body["state"], r.status) for r in control_plane.answered("lifecycle")] == [
        ("starting", 503),
        ("starting", 502),
        ("starting", 500),
        ("starting", 204),
        ("ready", 204),
    ]


def test_it_exits_3_when_the_token_is_rejected(
    control_plane: FakeControlPlane, start_agent: Callable[..., AgentProcess]
) -> None:
    control_plane.token = "a-different-token"
    agent = start_agent()

    assert agent.wait() == 3
    assert [r.status for r in control_plane.answered("manifest")] == [401]
    assert control_plane.answered("lifecycle") == []
    assert any("token" in line and "ERROR" in line for line in agent.stderr)


# -- reinit ------------------------------------------------------------------------


RECORD_RUN = 'echo "$WORKSPACE_OWNER $WORKSPACE_IS_PREBUILD" >> runs.txt'


def test_it_reinitialises_for_the_new_owner_after_a_claim(
    control_plane: FakeControlPlane, start_agent: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    control_plane.manifest["startup_script"] = RECORD_RUN
    agent = start_agent()
    wait_for_states(control_plane, agent, ["starting", "ready"])

    control_plane.claim(ALICE)

    wait_for_states(control_plane, agent, ["starting", "ready", "starting", "ready"])
    assert (tmp_path / "runs.txt").read_text().splitlines() == ["prebuilds true", "alice false"]
    sequence = [(r.endpoint, r.status, (r.body or {}).get("state")) for r in control_plane.requests]
    claim_answer = sequence.index(("reinit", 200, None))
    assert sequence[claim_answer + 1 : claim_answer + 4] == [
        ("manifest", 200, None),
        ("lifecycle", 204, "starting"),
        ("lifecycle", 204, "ready"),
    ]
    assert any("reinit" in line and "prebuild_claimed" in line for line in agent.stderr)


def test_it_reinitialises_only_on_a_200_from_reinit(
    control_plane: FakeControlPlane, start_agent: Callable[..., AgentProcess], tmp_path: Path
) -> None:
    control_plane.manifest["startup_script"] = RECORD_RUN
    control_plane.fail("reinit", 500, 404, 503)
    agent = start_agent()
    wait_for_states(control_plane, agent, ["starting", "ready"])

    wait_until(lambda: len(control_plane.answered("reinit", 204)) >= 3, describe=agent.describe)

    assert [r.status for r in control_plane.answered("reinit")][:3] == [500, 404, 503]
    assert len(control_plane.answered("manifest")) == 1
    assert control_plane.states() == ["starting", "ready"]
    assert (tmp_path / "runs.txt").read_text().splitlines() == ["prebuilds true"]


# -- shutdown ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("signum", "trap"),
    [
        (signal.SIGTERM, ""),
        (signal.SIGINT, ""),
        # The script and its children ignore SIGTERM: the group is SIGKILLed.
        (signal.SIGTERM, "trap '' TERM"),
    ],
)
def test_it_reports_shutting_down_and_off_and_kills_the_script_on_a_signal(
    control_plane: FakeControlPlane,
    start_agent: Callable[..., AgentProcess],
    tmp_path: Path,
    signum: int,
    trap: str,
) -> None:
    control_plane.manifest["startup_script"] = "\n".join(
        [
            trap,
            "echo $$ > shell.pid",
            "sleep 60 &",
            "echo $! > child.pid",
            "echo started",
            "wait",
        ]
    )
    agent = start_agent()
    wait_until(lambda: f"{SCRIPT_PREFIX}started" in agent.stdout, describe=agent.describe)
    pids = [int((tmp_path / name).read_text()) for name in ("shell.pid", "child.pid")]
    assert all(pid_alive(pid) for pid in pids)

    agent.proc.send_signal(signum)

    assert agent.wait() == 0
    assert control_plane.states() == ["starting", "shutting_down", "off"]
    wait_until(lambda: not any(pid_alive(pid) for pid in pids), timeout=2)


def test_it_shuts_down_promptly_during_a_reinit_long_poll(
    control_plane: FakeControlPlane, start_agent: Callable[..., AgentProcess]
) -> None:
    control_plane.reinit_hold = 60
    agent = start_agent()
    wait_for_states(control_plane, agent, ["starting", "ready"])
    wait_until(
        lambda: any(r.endpoint == "reinit" for r in control_plane.requests),
        describe=agent.describe,
    )

    agent.proc.send_signal(signal.SIGTERM)

    assert agent.wait(timeout=3) == 0
    assert control_plane.states() == ["starting", "ready", "shutting_down", "off"]


# -- the token ---------------------------------------------------------------------


def without_token(env: dict[str, str]) -> dict[str, str]:
    return {key: value for key, value in env.items() if key != "WORKSPACE_AGENT_TOKEN"}


def test_it_reads_the_token_from_token_file(
    control_plane: FakeControlPlane,
    start_agent: Callable[..., AgentProcess],
    agent_env: dict[str, str],
    tmp_path: Path,
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"{TOKEN}\n")
    agent = start_agent("--token-file", str(token_file), env=without_token(agent_env))

    wait_for_states(control_plane, agent, ["starting", "ready"])
    assert {r.authorization for r in control_plane.requests} == {f"Bearer {TOKEN}"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "WORKSPACE_AGENT_TOKEN"),
        (["--token-file", "does-not-exist"], "does-not-exist"),
        (["--token-file", "empty-token"], "empty"),
        # Never on the command line, not even as an abbreviation of --token-file.
        (["--token", TOKEN], "unrecognized arguments"),
    ],
)
def test_it_exits_2_without_a_usable_token(
    control_plane: FakeControlPlane,
    start_agent: Callable[..., AgentProcess],
    agent_env: dict[str, str],
    tmp_path: Path,
    args: list[str],
    message: str,
) -> None:
    (tmp_path / "empty-token").write_text("\n")
    agent = start_agent(*args, env=without_token(agent_env))

    assert agent.wait() == 2
    assert any(message in line for line in agent.stderr), agent.describe()
    assert control_plane.requests == []


# -- the program's own constraints -------------------------------------------------


def test_the_agent_imports_only_the_standard_library() -> None:
    # -S: no site-packages, as in a workspace with a bare Python.
    code = "\n".join(
        [
            "import sys",
            "before = set(sys.modules)",
            "import workspaces.agent.agent, workspaces.agent.client",
            "loaded = {name.partition('.')[0] for name in set(sys.modules) - before}",
            "print(sorted(loaded - set(sys.stdlib_module_names) - {'workspaces'}))",
        ]
    )
    result = subprocess.run(
        [sys.executable, "-S", "-c", code],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    assert result.stdout.strip() == "[]"


def test_backoff_doubles_up_to_the_cap_with_jitter() -> None:
    backoff = Backoff(0.5, 10.0, random.Random(1))
    caps = [0.5, 1, 2, 4, 8, 10, 10, 10]
    delays = [backoff.next_delay() for _ in caps]

    assert all(cap / 2 <= delay <= cap for cap, delay in zip(caps, delays, strict=True))
    assert len(set(delays[-3:])) == 3  # jittered, not lockstep


def test_script_environment_lets_manifest_fields_win_and_drops_the_token() -> None:
    manifest = Manifest.from_json(
        {
            "agent_id": "a",
            "agent_name": "main",
            "workspace_id": "w",
            "workspace_name": "dev",
            "owner": ALICE,
            "is_prebuild": False,
            "startup_script": None,
            "environment": {"WORKSPACE_ID": "spoofed", "PARAM_N": 3, "SHARED": "manifest"},
        }
    )
    base = {"SHARED": "agent", "HOME": "/home/x", "WORKSPACE_AGENT_TOKEN": "secret"}

    assert script_environment(manifest, base) == {
        "HOME": "/home/x",
        "SHARED": "manifest",
        "PARAM_N": "3",
        "WORKSPACE_ID": "w",
        "WORKSPACE_NAME": "dev",
        "WORKSPACE_OWNER": "alice",
        "WORKSPACE_IS_PREBUILD": "false",
    }
