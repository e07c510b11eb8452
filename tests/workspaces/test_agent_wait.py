"""A start build succeeds when its agents are ready, and fails when their startup fails.

Real agent processes (local provisioner) talk to a real ASGI server on the test database.
"""

from __future__ import annotations

import pytest

from tests.accounts.factories import UserFactory
from tests.processes import asgi_server
from tests.workspaces.factories import TemplateFactory
from tests.workspaces.worker_helpers import closed_port_url
from workspaces import jobs
from workspaces.models import AgentLifecycle, ProvisionerJob, Workspace
from workspaces.services import build_create, workspace_create

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(scope="module")
def server(django_db_setup, django_db_blocker):
    with django_db_blocker.unblock(), asgi_server() as url:
        yield url


@pytest.fixture
def waiting(settings, tmp_path, server):
    settings.DATA_DIR = tmp_path
    settings.ACCESS_URL = server
    settings.PROVISIONER_AGENT_READY_TIMEOUT = 30
    settings.PROVISIONER_HEARTBEAT_INTERVAL = 0.2
    return settings


def _run_start(script: str, *, agents: int = 1):
    template = TemplateFactory(
        with_version__agents=[
            {"name": f"agent{i}", "startup_script": script} for i in range(agents)
        ]
    )
    workspace = workspace_create(owner=UserFactory(), template=template, name="dev")
    build = workspace.builds.get()
    jobs.job_execute(build.job_id, worker="test")
    return workspace, ProvisionerJob.objects.get(id=build.job_id)


def _delete(workspace: Workspace) -> None:
    build = build_create(workspace=workspace, transition="delete", initiator=workspace.owner)
    jobs.job_execute(build.job_id, worker="test")
    assert ProvisionerJob.objects.get(id=build.job_id).status == "succeeded"


def test_it_succeeds_once_every_agent_is_ready(waiting):
    workspace, job = _run_start("echo preparing; sleep 0.5; echo done", agents=2)
    try:
        assert job.status == "succeeded", job.logs
        assert "agent agent0: ready" in job.logs and "agent agent1: ready" in job.logs
        states = set(workspace.agents.values_list("lifecycle_state", flat=True))
        assert states == {AgentLifecycle.READY}
    finally:
        _delete(workspace)


def test_it_fails_when_a_startup_script_fails(waiting):
    workspace, job = _run_start("echo about to fail; echo boom >&2; exit 3")
    try:
        assert job.status == "failed"
        assert "startup script of agent(s) agent0 failed" in job.error
        assert "boom" in job.logs, "the agent's log tail is in the build log"
    finally:
        _delete(workspace)


def test_it_fails_when_agents_never_report(waiting):
    waiting.ACCESS_URL = closed_port_url()
    waiting.PROVISIONER_AGENT_READY_TIMEOUT = 1
    workspace, job = _run_start("true")
    try:
        assert job.status == "failed"
        assert "did not report ready within 1 s" in job.error
        assert waiting.ACCESS_URL in job.error
    finally:
        _delete(workspace)
