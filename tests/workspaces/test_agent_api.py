"""Agent endpoints: manifest and lifecycle, and the real agent program against a live server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import pytest
import time_machine
from django.utils import timezone

from tests.accounts.factories import UserFactory
from tests.workspaces.factories import (
    AgentFactory,
    BuildFactory,
    PresetFactory,
    TemplateFactory,
    WorkspaceFactory,
    prebuild,
)
from workspaces.models import AgentLifecycle, WorkspaceAgent

MANIFEST = "/api/v2/workspaceagents/me/manifest"
LIFECYCLE = "/api/v2/workspaceagents/me/lifecycle"
REPO_ROOT = Path(__file__).resolve().parents[2]

T = TypeVar("T")


def bearer(agent: WorkspaceAgent) -> dict[str, str]:
    return {"HTTP_AUTHORIZATION": f"Bearer {agent.plain_token}"}


def report(client, agent: WorkspaceAgent, body, **headers):
    data = body if isinstance(body, str) else json.dumps(body)
    return client.post(
        LIFECYCLE, data=data, content_type="application/json", **(headers or bearer(agent))
    )


@pytest.fixture
def agent(db) -> WorkspaceAgent:
    alice = UserFactory(username="alice")
    template = TemplateFactory()
    workspace = WorkspaceFactory(owner=alice, template=template, name="dev")
    build = BuildFactory(workspace=workspace, parameters={"repo": "https://x.invalid/r.git"})
    return AgentFactory(
        build=build,
        name="main",
        startup_script="echo hello",
        lifecycle_state=AgentLifecycle.CREATED,
        last_seen_at=None,  # never heard from yet
    )


# -- manifest -----------------------------------------------------------------------------


@pytest.mark.django_db
def test_it_serves_the_manifest(client, agent):
    workspace = agent.workspace

    response = client.get(MANIFEST, **bearer(agent))

    assert response.status_code == 200
    assert response.json() == {
        "agent_id": str(agent.id),
        "agent_name": "main",
        "workspace_id": str(workspace.id),
        "workspace_name": "dev",
        "owner": {"id": str(workspace.owner_id), "username": "alice"},
        "is_prebuild": False,
        "startup_script": "echo hello",
        "environment": {
            "WORKSPACE_ID": str(workspace.id),
            "WORKSPACE_NAME": "dev",
            "WORKSPACE_OWNER": "alice",
            "WORKSPACE_IS_PREBUILD": "false",
            "WORKSPACE_AGENT_NAME": "main",
            "PARAM_REPO": "https://x.invalid/r.git",
        },
    }


@pytest.mark.django_db
def test_it_records_the_owner_the_agent_initialised_for(client, agent):
    now = timezone.now()

    with time_machine.travel(now, tick=False):
        client.get(MANIFEST, **bearer(agent))

    agent.refresh_from_db()
    assert agent.initialized_owner_id == agent.workspace.owner_id
    assert agent.initialized_at == now
    assert agent.last_seen_at == now
    assert agent.lifecycle_state == AgentLifecycle.CREATED  # the manifest changes no lifecycle


@pytest.mark.django_db
def test_it_marks_a_prebuild_manifest_and_uses_the_latest_builds_parameters(client):
    template = TemplateFactory()
    preset = PresetFactory(template_version=template.active_version)
    workspace = prebuild(preset, agents=0)
    BuildFactory(
        workspace=workspace,
        template_version=preset.template_version,
        preset=preset,
        parameters={"repo": "new", "python-version": "3.11"},
    )
    agent = AgentFactory(build=workspace.builds.latest("build_number"), name="main")

    body = client.get(MANIFEST, **bearer(agent)).json()

    assert body["is_prebuild"] is True
    assert body["owner"]["username"] == "prebuilds"
    assert body["environment"]["WORKSPACE_IS_PREBUILD"] == "true"
    assert body["environment"]["WORKSPACE_OWNER"] == "prebuilds"
    assert body["environment"]["PARAM_REPO"] == "new"
    assert body["environment"]["PARAM_PYTHON_VERSION"] == "3.11"
    agent.refresh_from_db()
    assert agent.initialized_owner_id == workspace.owner_id


@pytest.mark.django_db
def test_it_serves_the_new_owner_after_a_claim(client, agent):
    bob = UserFactory(username="bob")
    client.get(MANIFEST, **bearer(agent))
    agent.workspace.owner = bob
    agent.workspace.save()

    body = client.get(MANIFEST, **bearer(agent)).json()

    assert body["owner"]["username"] == "bob"
    agent.refresh_from_db()
    assert agent.initialized_owner == bob


# -- lifecycle ------------------------------------------------------------------------------


@pytest.mark.django_db
def test_it_records_lifecycle_transitions(client, agent):
    start = timezone.now()
    with time_machine.travel(start, tick=False):
        assert report(client, agent, {"state": "starting"}).status_code == 204
    agent.refresh_from_db()
    assert (agent.lifecycle_state, agent.lifecycle_changed_at) == ("starting", start)
    assert agent.ready_at is None

    with time_machine.travel(start + timedelta(seconds=5), tick=False):
        response = report(client, agent, {"state": "ready"})
    assert response.status_code == 204
    assert response.content == b""
    agent.refresh_from_db()
    ready = start + timedelta(seconds=5)
    assert (agent.lifecycle_state, agent.lifecycle_changed_at, agent.ready_at) == (
        "ready",
        ready,
        ready,
    )
    assert agent.last_seen_at == ready

    for state in ("shutting_down", "off"):
        assert report(client, agent, {"state": state}).status_code == 204
    agent.refresh_from_db()
    assert agent.lifecycle_state == "off"
    assert agent.ready_at == ready


@pytest.mark.django_db
def test_it_keeps_timestamps_when_a_state_is_repeated(client, agent):
    first = timezone.now()
    with time_machine.travel(first, tick=False):
        report(client, agent, {"state": "ready"})
    later = first + timedelta(seconds=30)

    with time_machine.travel(later, tick=False):
        report(client, agent, {"state": "ready"})

    agent.refresh_from_db()
    assert (agent.lifecycle_changed_at, agent.ready_at, agent.last_seen_at) == (first, first, later)


@pytest.mark.django_db
def test_it_reports_start_errors(client, agent):
    assert report(client, agent, {"state": "start_error"}).status_code == 204

    agent.refresh_from_db()
    assert agent.lifecycle_state == "start_error"
    assert agent.ready_at is None


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"state": "created"}, "invalid_state"),
        ({"state": "READY"}, "invalid_state"),
        ({"state": 1}, "invalid_state"),
        ({}, "invalid_state"),
        ({"state": "ready", "extra": 1}, "unknown_fields"),
        ("{nope", "invalid_json"),
        ('"ready"', "invalid_json"),
    ],
)
def test_it_refuses_bad_lifecycle_reports(client, agent, body, error):
    response = report(client, agent, body)

    assert response.status_code == 400
    assert response.json()["error"] == error
    agent.refresh_from_db()
    assert agent.lifecycle_state == AgentLifecycle.CREATED
    assert agent.last_seen_at is None


# -- authentication -------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(
    "header",
    [None, "Bearer garbage", "Bearer wsa_0011223344556677_secret", "Basic abc", "Bearer "],
)
def test_it_answers_401_without_a_valid_agent_token(client, agent, header):
    headers = {"HTTP_AUTHORIZATION": header} if header is not None else {}

    manifest = client.get(MANIFEST, **headers)
    lifecycle = client.post(
        LIFECYCLE, data='{"state": "ready"}', content_type="application/json", **headers
    )

    assert (manifest.status_code, lifecycle.status_code) == (401, 401)
    assert manifest.json()["error"] == "unauthorized"
    agent.refresh_from_db()
    assert agent.initialized_owner_id is None
    assert agent.lifecycle_state == AgentLifecycle.CREATED


@pytest.mark.django_db
def test_it_answers_401_to_a_wrong_secret(client, agent):
    token = agent.plain_token[:-3] + ("abc" if not agent.plain_token.endswith("abc") else "xyz")

    assert client.get(MANIFEST, HTTP_AUTHORIZATION=f"Bearer {token}").status_code == 401


@pytest.mark.django_db
def test_it_answers_401_to_an_api_token(client, agent):
    from accounts.services import api_token_create

    token = api_token_create(user=agent.workspace.owner)

    assert client.get(MANIFEST, HTTP_AUTHORIZATION=f"Bearer {token}").status_code == 401


@pytest.mark.django_db
def test_it_answers_401_to_a_retired_agent(client, agent):
    agent.retired_at = timezone.now()
    agent.save()

    assert client.get(MANIFEST, **bearer(agent)).status_code == 401
    assert report(client, agent, {"state": "ready"}).status_code == 401


@pytest.mark.django_db
def test_it_answers_401_to_an_agent_of_a_deleted_workspace(client, agent):
    agent.workspace.deleted = True
    agent.workspace.save()

    assert client.get(MANIFEST, **bearer(agent)).status_code == 401
    assert report(client, agent, {"state": "off"}).status_code == 401


@pytest.mark.django_db
def test_it_does_not_let_a_user_session_stand_in_for_an_agent_token(client, agent):
    client.force_login(agent.workspace.owner)

    assert client.get(MANIFEST).status_code == 401


@pytest.mark.django_db
def test_it_answers_405_to_wrong_methods(client, agent):
    assert client.post(MANIFEST, **bearer(agent)).status_code == 405
    assert client.get(LIFECYCLE, **bearer(agent)).status_code == 405


# -- the real agent program ------------------------------------------------------------------


def wait_until(predicate: Callable[[], T], *, timeout: float, describe: Callable[[], str]) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s\n{describe()}")
        time.sleep(0.05)


REINIT_WAIT = 1  # seconds; the agent takes whole seconds


@pytest.mark.timeout(60)
@pytest.mark.django_db(transaction=True)
def test_the_agent_program_gets_ready_and_reports_off_against_the_live_server(
    live_server, tmp_path
):
    alice = UserFactory(username="alice")
    workspace = WorkspaceFactory(owner=alice, template=TemplateFactory(), name="dev")
    build = BuildFactory(workspace=workspace, parameters={"repo": "r"})
    agent = AgentFactory(
        build=build,
        name="main",
        lifecycle_state=AgentLifecycle.CREATED,
        startup_script='printf "%s:%s" "$WORKSPACE_OWNER" "$PARAM_REPO" > owner.txt',
    )
    log = tmp_path / "agent.log"
    environment = {**os.environ, "WORKSPACE_AGENT_TOKEN": agent.plain_token}
    command = [
        sys.executable,
        "-m",
        "workspaces.agent",
        "--url",
        live_server.url,
        "--backoff-base",
        "0.05",
        "--backoff-max",
        "0.2",
        "--reinit-wait",
        str(REINIT_WAIT),
    ]
    with log.open("wb") as output:
        process = subprocess.Popen(
            command, cwd=tmp_path, env=environment, stdout=output, stderr=subprocess.STDOUT
        )
    try:

        def state() -> str:
            agent.refresh_from_db()
            return agent.lifecycle_state

        def describe() -> str:
            return f"lifecycle={state()}\n--- agent output ---\n{log.read_text()}"

        wait_until(lambda: state() == "ready", timeout=20, describe=describe)
        assert agent.initialized_owner_id == alice.id
        assert agent.ready_at is not None
        assert (tmp_path / "owner.txt").read_text() == "alice:r"

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
        assert state() == "off", describe()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        # The live server goes on serving the agent's last long-poll for up to REINIT_WAIT
        # seconds after the agent left (a threaded server cannot see the client go); let it
        # end, or it touches the database after the test and blocks its teardown.
        time.sleep(REINIT_WAIT + 0.5)
