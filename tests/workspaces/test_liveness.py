"""Agent liveness (issue 12): the server records when it last heard from each agent.

Against a real ASGI server (uvicorn, its own process) on the test database, with a short
``AGENT_DISCONNECT_TIMEOUT`` (1.5 s: heartbeat interval 0.5 s, writes at most every 0.25 s).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta

import httpx
import pytest
from django.utils import timezone

from accounts.models import SYSTEM_USER_ID
from tests.processes import ROOT, asgi_server
from tests.workspaces.factories import PresetFactory, prebuild
from workspaces import liveness, serializers
from workspaces.models import WorkspaceAgent

pytestmark = pytest.mark.django_db(transaction=True)

TIMEOUT = 1.5
HEARTBEAT = "/api/v2/workspaceagents/me/heartbeat"
REINIT = "/api/v2/workspaceagents/me/reinit"


@pytest.fixture(scope="module")
def server(django_db_setup, django_db_blocker):
    with (
        django_db_blocker.unblock(),
        asgi_server(AGENT_DISCONNECT_TIMEOUT=str(TIMEOUT), REINIT_PING_INTERVAL="0.2") as url,
    ):
        yield url


def _agent(seen_ago: float | None = None) -> WorkspaceAgent:
    """A prebuild's agent, initialised for the system user (no reinit due: waits wait)."""
    agent = prebuild(PresetFactory()).created_agents[0]
    seen = None if seen_ago is None else timezone.now() - timedelta(seconds=seen_ago)
    WorkspaceAgent.objects.filter(id=agent.id).update(
        last_seen_at=seen, initialized_owner_id=SYSTEM_USER_ID
    )
    return agent


def _last_seen(agent: WorkspaceAgent):
    return WorkspaceAgent.objects.get(id=agent.id).last_seen_at


def _auth(agent: WorkspaceAgent) -> dict[str, str]:
    return {"Authorization": f"Bearer {agent.plain_token}"}


def test_a_heartbeat_records_the_agent_and_says_when_to_send_the_next(server):
    agent = _agent(seen_ago=None)

    response = httpx.post(server + HEARTBEAT, headers=_auth(agent), timeout=10)

    assert response.status_code == 200
    assert response.json() == {"heartbeat_interval": TIMEOUT / 3}
    assert _last_seen(agent) is not None


def test_a_fresh_last_seen_is_not_rewritten(server):
    agent = _agent(seen_ago=0.05)  # younger than the write interval (0.25 s)
    before = _last_seen(agent)

    assert httpx.post(server + HEARTBEAT, headers=_auth(agent), timeout=10).status_code == 200

    assert _last_seen(agent) == before


@pytest.mark.parametrize(
    ("method", "headers", "status"),
    [("post", {}, 401), ("post", {"Authorization": "Bearer wsa_x_y"}, 401), ("get", None, 405)],
)
def test_a_heartbeat_without_a_valid_agent_token_changes_nothing(server, method, headers, status):
    agent = _agent(seen_ago=None)
    sent = _auth(agent) if headers is None else headers

    response = httpx.request(method.upper(), server + HEARTBEAT, headers=sent, timeout=10)

    assert response.status_code == status
    assert set(response.json()) == {"error", "detail"}
    assert _last_seen(agent) is None


def test_a_waiting_agent_stays_connected_and_one_that_hung_up_does_not(server, settings):
    """An open reinit long-poll keeps touching the agent (it outlives the timeout here); once
    the client disconnects, the touches stop at once."""
    agent = _agent(seen_ago=None)
    # A raw socket: the long-poll's answer comes only when it ends, so an HTTP client would
    # block until then; closing the socket is what a killed agent's kernel does.
    host, port = server.removeprefix("http://").split(":")
    waiter = socket.create_connection((host, int(port)), timeout=10)
    waiter.sendall(
        f"GET {REINIT}?wait=30 HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {agent.plain_token}\r\n\r\n".encode()
    )
    try:
        time.sleep(0.5)
        first = _last_seen(agent)
        assert first is not None  # recorded at the start of the wait
        time.sleep(TIMEOUT + 0.5)  # longer than the timeout: still touched meanwhile
        later = _last_seen(agent)
        assert later > first
        assert timezone.now() - later < timedelta(seconds=TIMEOUT)
    finally:
        waiter.close()
    time.sleep(0.5)
    gone_at = _last_seen(agent)
    time.sleep(TIMEOUT)
    assert _last_seen(agent) == gone_at  # nobody touches a hung-up agent
    settings.AGENT_DISCONNECT_TIMEOUT = TIMEOUT  # the server's, for judging here
    assert liveness.agent_connection(WorkspaceAgent.objects.get(id=agent.id)) == "disconnected"


def test_an_open_sse_stream_keeps_the_agent_connected(server):
    agent = _agent(seen_ago=None)
    seen = []

    def stream() -> None:
        headers = {**_auth(agent), "Accept": "text/event-stream"}
        with httpx.stream("GET", server + REINIT, headers=headers, timeout=30) as response:
            started = time.monotonic()
            for _ in response.iter_lines():
                if time.monotonic() - started > TIMEOUT + 1:
                    return

    reader = threading.Thread(target=stream)
    reader.start()
    time.sleep(0.5)
    seen.append(_last_seen(agent))
    reader.join(15)
    seen.append(_last_seen(agent))

    assert seen[0] is not None and seen[1] > seen[0]
    assert timezone.now() - seen[1] < timedelta(seconds=TIMEOUT)


def test_the_workspace_json_says_whether_each_agent_is_connected(settings):
    settings.AGENT_DISCONNECT_TIMEOUT = 30
    now = timezone.now()
    agent = WorkspaceAgent(name="main", lifecycle_state="ready", last_seen_at=now)

    assert serializers.agent_json(agent)["connection"] == "connected"
    assert serializers.agent_json(agent)["last_seen_at"] == now.isoformat()
    agent.last_seen_at = now - timedelta(seconds=31)
    assert serializers.agent_json(agent)["connection"] == "disconnected"
    agent.last_seen_at = None
    assert (
        serializers.agent_json(agent)["connection"],
        serializers.agent_json(agent)["last_seen_at"],
    ) == (
        "disconnected",
        None,
    )


def test_the_agent_program_heartbeats_while_its_startup_script_runs(server, tmp_path):
    """A real agent busy in a 3 s startup script (no reinit wait open) stays connected: its
    heartbeats (every 0.3 s, then the 0.5 s the server asks for) keep `last_seen_at` fresh."""
    agent = _agent(seen_ago=None)
    WorkspaceAgent.objects.filter(id=agent.id).update(startup_script="sleep 3")
    env = {**os.environ, "WORKSPACE_AGENT_TOKEN": agent.plain_token, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "workspaces.agent", "--url", server]
    process = subprocess.Popen(
        [*command, "--heartbeat-interval", "0.3"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while WorkspaceAgent.objects.get(id=agent.id).lifecycle_state != "starting":
            assert time.monotonic() < deadline, "the agent never reported starting"
            time.sleep(0.05)
        seen = []
        for _ in range(5):  # 2.5 s into the script
            time.sleep(0.5)
            seen.append(_last_seen(agent))
        assert WorkspaceAgent.objects.get(id=agent.id).lifecycle_state == "starting"
        assert seen == sorted(seen) and len(set(seen)) >= 3  # still being heard from
        assert timezone.now() - seen[-1] < timedelta(seconds=TIMEOUT)
    finally:
        process.terminate()
        process.wait(10)
