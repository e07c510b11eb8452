"""A start build succeeds when its agents are ready, and fails when their startup fails.

Real agent processes (local provisioner) talk to a real ASGI server on the test database.
"""

from __future__ import annotations

import re
from datetime import timedelta
from urllib.parse import urlsplit
from uuid import uuid4

import pytest
import redis
from django.conf import settings
from django.utils import timezone

from accounts.services import system_user
from config.embedded import pid_alive
from tests.accounts.factories import UserFactory
from tests.processes import asgi_server
from tests.workspaces.factories import PresetFactory, TemplateFactory
from tests.workspaces.worker_helpers import closed_port_url, kill_group
from workspaces import jobs, routing, tasks
from workspaces.models import (
    AgentLifecycle,
    BuildReason,
    FailureKind,
    ProvisionerJob,
    Workspace,
)
from workspaces.provisioners import LocalProvisioner
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


def _run_prebuild_start(script: str):
    """A reconciler's start build of a fresh prebuild of a one-agent template, executed here."""
    template = TemplateFactory(with_version__agents=[{"name": "main", "startup_script": script}])
    preset = PresetFactory(template_version=template.active_version)
    system = system_user()
    workspace = workspace_create(
        owner=system,
        template=template,
        name=f"prebuild-{uuid4().hex[:8]}",
        preset=preset,
        initiator=system,
        reason=BuildReason.PREBUILD,
    )
    build = workspace.builds.get()
    jobs.job_execute(build.job_id, worker="test")
    return workspace, ProvisionerJob.objects.get(id=build.job_id)


def _agent_pid(job: ProvisionerJob) -> int:
    match = re.search(r"starting agent main \(pid (\d+)\)", job.logs)
    assert match, job.logs
    return int(match.group(1))


def test_a_failed_prebuild_start_leaves_no_process_and_keeps_its_evidence(waiting, tmp_path):
    workspace, job = _run_prebuild_start("echo about to fail; exit 3")
    pid = _agent_pid(job)
    try:
        assert (job.status, job.failure_kind) == ("failed", FailureKind.TEMPLATE)
        assert not pid_alive(pid), "the failed prebuild's agent still runs"
        assert "stopping the processes of this failed prebuild" in job.logs
        assert f"stopping agent main (pid {pid})" in job.logs
        # Evidence: the record, the build log, the directory and the agent's own log stay.
        workspace.refresh_from_db()
        assert not workspace.deleted
        agent_log = tmp_path / "workspaces" / str(workspace.id) / ".warmstart/agent-main.log"
        assert "about to fail" in agent_log.read_text()
    finally:
        kill_group(pid)


def test_a_failed_start_of_a_user_s_workspace_keeps_its_agent(waiting):
    # A user decides what happens to their own workspace (look inside, start it again).
    workspace, job = _run_start("exit 3")
    try:
        assert job.status == "failed"
        pid = int(
            (waiting.DATA_DIR / "workspaces" / str(workspace.id) / ".warmstart/agent-agent0.pid")
            .read_text()
            .strip()
        )
        assert pid_alive(pid)
        assert "failed prebuild" not in job.logs
    finally:
        _delete(workspace)


def test_a_lost_prebuild_start_has_its_processes_stopped_on_its_host(waiting, tmp_path):
    # The worker that started the agent dies: the agent keeps running (its own session). The
    # sweep fails the job as an infrastructure failure and queues the stop on the host's
    # queue; a worker of that host runs it (here: the task, called as a worker would).
    waiting.ACCESS_URL = closed_port_url()  # the agent keeps retrying: it stays alive
    template = TemplateFactory()
    preset = PresetFactory(template_version=template.active_version)
    system = system_user()
    workspace = workspace_create(
        owner=system,
        template=template,
        name=f"prebuild-{uuid4().hex[:8]}",
        preset=preset,
        initiator=system,
        reason=BuildReason.PREBUILD,
    )
    build = workspace.builds.get()
    jobs.job_acquire(build.job_id, worker="dead")
    request = jobs.job_prepare(build, worker="dead")
    LocalProvisioner(data_dir=tmp_path).apply(request, lambda line: None, lambda: False)
    pid_file = tmp_path / "workspaces" / str(workspace.id) / ".warmstart/agent-main.pid"
    pid = int(pid_file.read_text())
    ProvisionerJob.objects.filter(id=build.job_id).update(
        heartbeat_at=timezone.now() - timedelta(minutes=5)
    )
    try:
        assert jobs.jobs_fail_stale(timeout=timedelta(seconds=60)) == [build.job_id]
        job = ProvisionerJob.objects.get(id=build.job_id)
        assert (job.status, job.failure_kind) == ("failed", FailureKind.INFRASTRUCTURE)
        assert pid_alive(pid)

        assert tasks.stop_failed_prebuild(str(build.job_id)) is True

        assert not pid_alive(pid)
        job.refresh_from_db()
        assert "stopping the processes of this failed prebuild" in job.logs
        assert f"stopping agent main (pid {pid})" in job.logs
        assert (tmp_path / "workspaces" / str(workspace.id)).is_dir()
        # A duplicate message finds nothing left to stop, and does no harm.
        assert tasks.stop_failed_prebuild(str(build.job_id)) is True
    finally:
        kill_group(pid)
        client = redis.Redis(unix_socket_path=urlsplit(settings.CELERY_BROKER_URL).path)
        client.delete(routing.host_queue())


def test_the_stop_leaves_a_prebuild_that_moved_on_alone(waiting):
    template = TemplateFactory()
    preset = PresetFactory(template_version=template.active_version)
    system = system_user()
    workspace = workspace_create(
        owner=system,
        template=template,
        name=f"prebuild-{uuid4().hex[:8]}",
        preset=preset,
        initiator=system,
        reason=BuildReason.PREBUILD,
    )
    first = workspace.builds.get()
    ProvisionerJob.objects.filter(id=first.job_id).update(
        status="failed", failure_kind=FailureKind.INFRASTRUCTURE, completed_at=timezone.now()
    )
    build_create(workspace=workspace, transition="delete", initiator=system)

    assert tasks.stop_failed_prebuild(str(first.job_id)) is False
    assert tasks.stop_failed_prebuild("not-a-uuid") is False
