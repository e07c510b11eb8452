"""The local and command provisioners, with real processes (agents, shell scripts)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from uuid import uuid4

import pytest

from tests.accounts.factories import UserFactory
from tests.workspaces.factories import TemplateFactory, system_user
from tests.workspaces.worker_helpers import (
    closed_port_url,
    command_template,
    kill_group,
    pid_alive,
    proc_cmdline,
    proc_environ,
    wait_until,
    write_script,
)
from workspaces import routing
from workspaces.jobs import job_execute
from workspaces.models import (
    AgentLifecycle,
    BuildReason,
    JobStatus,
    ProvisionerJob,
    Transition,
    Workspace,
    WorkspaceAgent,
)
from workspaces.provisioners import (
    AgentSpec,
    CommandProvisioner,
    LocalProvisioner,
    ProvisionAborted,
    ProvisionError,
    ProvisionRequest,
)
from workspaces.provisioners.local import WORKSPACE_MARKER_ENV
from workspaces.services import agent_authenticate, build_create, workspace_create

TWO_AGENTS = [
    {"name": "main", "startup_script": "echo hi"},
    {"name": "side-car", "startup_script": ""},
]


@pytest.fixture
def fast(settings, tmp_path):
    """Quick heartbeats, a private DATA_DIR, and an ACCESS_URL nobody answers."""
    settings.PROVISIONER_HEARTBEAT_INTERVAL = 0.1
    settings.DATA_DIR = tmp_path / "data"
    settings.ACCESS_URL = closed_port_url()
    return settings


def request(transition: str = "start", **kwargs) -> ProvisionRequest:
    values = {
        "transition": transition,
        "is_claim": False,
        "workspace_id": str(uuid4()),
        "workspace_name": "dev",
        "owner_id": str(uuid4()),
        "owner_username": "alice",
        "is_prebuild": False,
        "access_url": closed_port_url(),
        "agents": (AgentSpec("main", "echo hi", "wsa_test_token"),),
    }
    values.update(kwargs)
    return ProvisionRequest(**values)


class Log(list):
    def __call__(self, line: str) -> None:
        self.append(line)

    @property
    def text(self) -> str:
        return "\n".join(self)


def never() -> bool:
    return False


def agent_pids(directory: Path) -> dict[str, int]:
    return {
        path.name[len("agent-") : -len(".pid")]: int(path.read_text())
        for path in (directory / ".warmstart").glob("agent-*.pid")
    }


def marked_processes(workspace_id: str) -> list[int]:
    """Live processes carrying the workspace's environment marker (anything it left running)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and pid_alive(int(entry.name)):
            with contextlib.suppress(OSError):
                if proc_environ(int(entry.name)).get(WORKSPACE_MARKER_ENV) == workspace_id:
                    found.append(int(entry.name))
    return found


def current_agents(workspace) -> list[WorkspaceAgent]:
    return list(WorkspaceAgent.objects.filter(workspace=workspace, retired_at__isnull=True))


def run_build(workspace, transition: str, **kwargs) -> ProvisionerJob:
    build = build_create(
        workspace=workspace, transition=transition, initiator=workspace.owner, **kwargs
    )
    return job_execute(build.job_id, worker=routing.worker_identity())


# --- local: end to end through the executor -------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_local_workspace_lifecycle_with_real_agent_processes(fast):
    template = TemplateFactory(with_version__agents=TWO_AGENTS)
    workspace = workspace_create(owner=UserFactory(), template=template, name="dev")
    directory = fast.DATA_DIR / "workspaces" / str(workspace.id)
    seen: set[int] = set()
    try:
        # start: one real agent process per agent, token only in its environment
        job = job_execute(workspace.builds.get().job_id, worker=routing.worker_identity())
        assert job.status == JobStatus.SUCCEEDED, job.logs
        first = agent_pids(directory)
        seen |= set(first.values())
        assert set(first) == {"main", "side-car"}
        first_agents = {a.name: a for a in current_agents(workspace)}
        tokens = {}
        for name, pid in first.items():
            assert pid_alive(pid)
            environ = proc_environ(pid)
            token = tokens[name] = environ["WORKSPACE_AGENT_TOKEN"]
            assert agent_authenticate(token) == first_agents[name]
            cmdline = proc_cmdline(pid)
            assert cmdline[:5] == [
                sys.executable,
                "-m",
                "workspaces.agent",
                "--url",
                fast.ACCESS_URL,
            ]
            assert not any(token in arg for arg in cmdline)
            assert "DATABASE_URL" not in environ and "CELERY_BROKER_URL" not in environ
            assert os.readlink(f"/proc/{pid}/cwd") == str(directory)
            assert os.getpgid(pid) == pid  # its own session: survives a worker restart
            assert f"starting agent {name} (pid {pid})" in job.logs
        wait_until(
            lambda: "agent starting" in (directory / ".warmstart" / "agent-main.log").read_text(),
            what="the agent's own log",
        )
        workspace.refresh_from_db()
        assert workspace.host_queue == routing.host_queue()

        # stop: processes gone, agents off, directory kept
        job = run_build(workspace, Transition.STOP)
        assert job.status == JobStatus.SUCCEEDED, job.logs
        assert not any(pid_alive(pid) for pid in first.values())
        assert agent_pids(directory) == {}
        assert {a.lifecycle_state for a in current_agents(workspace)} == {AgentLifecycle.OFF}
        assert directory.is_dir()

        # start again: new processes, new agents and tokens, the old ones retired
        job = run_build(workspace, Transition.START)
        assert job.status == JobStatus.SUCCEEDED, job.logs
        second = agent_pids(directory)
        seen |= set(second.values())
        assert set(second) == {"main", "side-car"}
        assert all(pid_alive(pid) for pid in second.values())
        assert not set(second.values()) & set(first.values())
        new_agents = current_agents(workspace)
        assert len(new_agents) == 2
        assert not {a.id for a in new_agents} & {a.id for a in first_agents.values()}
        assert (
            WorkspaceAgent.objects.filter(
                id__in=[a.id for a in first_agents.values()], retired_at__isnull=False
            ).count()
            == 2
        )
        assert all(agent_authenticate(token) is None for token in tokens.values())

        # delete: processes gone, directory removed, workspace deleted
        job = run_build(workspace, Transition.DELETE)
        assert job.status == JobStatus.SUCCEEDED, job.logs
        assert not any(pid_alive(pid) for pid in second.values())
        assert not directory.exists()
        assert Workspace.objects.get(id=workspace.id).deleted
        assert current_agents(workspace) == []
        assert marked_processes(str(workspace.id)) == []
    finally:
        for pid in seen:
            kill_group(pid)


@pytest.mark.django_db(transaction=True)
def test_a_claim_keeps_the_running_agents_and_records_the_new_owner(fast):
    template = TemplateFactory()
    workspace = workspace_create(owner=system_user(), template=template, name="prebuild-abc")
    directory = fast.DATA_DIR / "workspaces" / str(workspace.id)
    try:
        job = job_execute(workspace.builds.get().job_id, worker=routing.worker_identity())
        assert job.status == JobStatus.SUCCEEDED, job.logs
        before = agent_pids(directory)
        agents_before = {a.id for a in current_agents(workspace)}
        alice = UserFactory()
        Workspace.objects.filter(id=workspace.id).update(owner=alice, name="mine")
        workspace.refresh_from_db()

        job = run_build(workspace, Transition.START, is_claim=True, reason=BuildReason.CLAIM)

        assert job.status == JobStatus.SUCCEEDED, job.logs
        assert agent_pids(directory) == before
        assert all(pid_alive(pid) for pid in before.values())
        assert {a.id for a in current_agents(workspace)} == agents_before
        owner = json.loads((directory / ".warmstart" / "owner").read_text())
        assert owner == {"id": str(alice.id), "username": alice.username}
    finally:
        for pid in agent_pids(directory).values() if directory.exists() else ():
            kill_group(pid)


@pytest.mark.django_db(transaction=True)
def test_a_claim_fails_when_the_agents_are_gone(fast):
    workspace = workspace_create(owner=system_user(), template=TemplateFactory(), name="pb")
    directory = fast.DATA_DIR / "workspaces" / str(workspace.id)
    job_execute(workspace.builds.get().job_id, worker=routing.worker_identity())
    for pid in agent_pids(directory).values():
        kill_group(pid)
        wait_until(lambda pid=pid: not pid_alive(pid), what="the agent to die")

    job = run_build(workspace, Transition.START, is_claim=True, reason=BuildReason.CLAIM)

    assert job.status == JobStatus.FAILED
    assert "not running" in job.error


# --- local: the provisioner on its own ------------------------------------------------------


def test_local_stop_never_signals_a_process_that_is_not_this_workspaces_agent(tmp_path):
    provisioner = LocalProvisioner(data_dir=tmp_path)
    other = request()
    mine = request("stop")
    stranger = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        provisioner.apply(other, Log(), never)
        other_agent = agent_pids(provisioner.workspace_dir(other.workspace_id))["main"]
        # Stale pid files: one names a reused pid (a stranger), one another workspace's agent.
        state = provisioner.workspace_dir(mine.workspace_id) / ".warmstart"
        state.mkdir(parents=True)
        (state / "agent-main.pid").write_text(f"{stranger.pid}\n")
        (state / "agent-extra.pid").write_text(f"{other_agent}\n")
        log = Log()

        provisioner.apply(mine, log, never)

        assert stranger.poll() is None and pid_alive(other_agent)
        assert "agent main is not running" in log and "agent extra is not running" in log
    finally:
        stranger.kill()
        stranger.wait()
        provisioner.apply(request("delete", workspace_id=other.workspace_id), Log(), never)
    assert not pid_alive(other_agent)


def test_local_stop_also_stops_leftovers_of_the_workspace(tmp_path):
    provisioner = LocalProvisioner(data_dir=tmp_path)
    mine, theirs = request("stop"), request("stop")
    env = dict(os.environ)
    # What a startup script's background job looks like: it inherits the agent's environment.
    leftover = subprocess.Popen(
        ["sleep", "30"], env={**env, WORKSPACE_MARKER_ENV: mine.workspace_id}
    )
    bystander = subprocess.Popen(
        ["sleep", "30"], env={**env, WORKSPACE_MARKER_ENV: theirs.workspace_id}
    )
    try:
        log = Log()
        provisioner.apply(mine, log, never)

        wait_until(lambda: leftover.poll() is not None, timeout=5, what="the leftover to die")
        assert bystander.poll() is None
        assert f"stopping leftover process {leftover.pid} (sleep)" in log
    finally:
        for proc in (leftover, bystander):
            proc.kill()
            proc.wait()


def test_local_start_fails_when_an_agent_exits_at_once(tmp_path):
    provisioner = LocalProvisioner(data_dir=tmp_path)
    # The agent refuses a non-http URL on its command line and exits with status 2.
    bad = request(access_url="ftp://nowhere.invalid")

    with pytest.raises(ProvisionError, match="agent main exited at once with status 2"):
        provisioner.apply(bad, Log(), never)


def test_local_start_aborted_before_spawning_starts_nothing(tmp_path):
    provisioner = LocalProvisioner(data_dir=tmp_path)
    req = request()

    with pytest.raises(ProvisionAborted):
        provisioner.apply(req, Log(), lambda: True)

    assert agent_pids(provisioner.workspace_dir(req.workspace_id)) == {}
    assert marked_processes(req.workspace_id) == []


def test_local_transitions_are_idempotent(tmp_path):
    provisioner = LocalProvisioner(data_dir=tmp_path)
    req = request()
    directory = provisioner.workspace_dir(req.workspace_id)
    try:
        provisioner.apply(req, Log(), never)
        first = agent_pids(directory)["main"]
        provisioner.apply(req, Log(), never)  # a retried start replaces the agent
        second = agent_pids(directory)["main"]
        assert first != second and not pid_alive(first) and pid_alive(second)
        assert marked_processes(req.workspace_id) == [second]

        for _ in range(2):
            provisioner.apply(request("stop", workspace_id=req.workspace_id), Log(), never)
        assert not pid_alive(second)
        for _ in range(2):
            provisioner.apply(request("delete", workspace_id=req.workspace_id), Log(), never)
        assert not directory.exists()
    finally:
        for pid in (first, second):
            kill_group(pid)


# --- command --------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_command_receives_its_environment_and_json_input(fast, tmp_path, monkeypatch):
    monkeypatch.setenv("WARMSTART_TEST_SECRET", "do-not-leak")
    out = tmp_path / "out"
    out.mkdir()
    script = write_script(tmp_path / "apply.sh", 'env > "$1/env"\ncat > "$1/stdin.json"\n')
    template = command_template([str(script), str(out)], agents=TWO_AGENTS)
    workspace = workspace_create(owner=system_user(), template=template, name="pb-1")
    build = workspace.builds.get()

    job = job_execute(build.job_id, worker="w")

    assert job.status == JobStatus.SUCCEEDED, job.logs
    env = dict(line.split("=", 1) for line in (out / "env").read_text().splitlines() if "=" in line)
    agents = {a.name: a for a in current_agents(workspace)}
    assert {k: env[k] for k in env if k.startswith("WORKSPACE_") and "TOKEN" not in k} == {
        "WORKSPACE_TRANSITION": "start",
        "WORKSPACE_ID": str(workspace.id),
        "WORKSPACE_NAME": "pb-1",
        "WORKSPACE_OWNER": "prebuilds",
        "WORKSPACE_OWNER_ID": str(system_user().id),
        "WORKSPACE_IS_PREBUILD": "true",
        "WORKSPACE_IS_PREBUILD_CLAIM": "false",
    }
    assert env["ACCESS_URL"] == fast.ACCESS_URL
    assert agent_authenticate(env["WORKSPACE_AGENT_TOKEN_MAIN"]) == agents["main"]
    assert agent_authenticate(env["WORKSPACE_AGENT_TOKEN_SIDE_CAR"]) == agents["side-car"]
    assert "WARMSTART_TEST_SECRET" not in env
    document = json.loads((out / "stdin.json").read_text())
    assert document == {
        "transition": "start",
        "workspace": {"id": str(workspace.id), "name": "pb-1"},
        "owner": {"id": str(system_user().id), "username": "prebuilds"},
        "is_prebuild": True,
        "is_prebuild_claim": False,
        "parameters": build.parameters,
        "agents": [
            {
                "name": "main",
                "startup_script": "echo hi",
                "token": env["WORKSPACE_AGENT_TOKEN_MAIN"],
            },
            {
                "name": "side-car",
                "startup_script": "",
                "token": env["WORKSPACE_AGENT_TOKEN_SIDE_CAR"],
            },
        ],
        "access_url": fast.ACCESS_URL,
        "build": {"id": str(build.id), "number": 1},
        "template_version_id": str(template.active_version_id),
    }

    # A stop hands over no tokens: they exist in plain form only for the start that made them.
    job = run_build(workspace, Transition.STOP)
    assert job.status == JobStatus.SUCCEEDED, job.logs
    env = (out / "env").read_text()
    assert "WORKSPACE_TRANSITION=stop" in env and "WORKSPACE_AGENT_TOKEN" not in env
    stop_doc = json.loads((out / "stdin.json").read_text())
    assert [a["token"] for a in stop_doc["agents"]] == [None, None]


def test_command_failure_names_the_exit_status_and_logs_the_output(tmp_path):
    script = write_script(tmp_path / "fail.sh", 'echo "plan failed" >&2\nexit 7\n')
    log = Log()

    with pytest.raises(ProvisionError, match="^command exited with status 7$"):
        CommandProvisioner().apply(
            request(provisioner_config={"command": [str(script)]}), log, never
        )

    assert "plan failed" in log


@pytest.mark.parametrize("ignore_term", [False, True])
def test_command_abort_kills_its_process_group(tmp_path, ignore_term):
    pids = tmp_path / "pids"
    trap = "trap '' TERM\n" if ignore_term else ""
    script = write_script(
        tmp_path / "slow.sh", f'{trap}sleep 60 &\necho "$$ $!" > "{pids}"\nwait\nwait\n'
    )
    started = time.monotonic()
    try:
        with pytest.raises(ProvisionAborted):
            CommandProvisioner(kill_grace=0.5).apply(
                request(provisioner_config={"command": [str(script)]}), Log(), pids.exists
            )
        shell, sleeper = map(int, pids.read_text().split())
        assert not pid_alive(shell)  # the group leader is reaped by apply() itself
        # The sleeper is not our child: SIGKILL reaches it asynchronously, so a loaded machine
        # may show it alive for a moment after apply() returns; it must not outlive a second.
        wait_until(lambda: not pid_alive(sleeper), timeout=1, what=f"sleeper {sleeper} to die")
        assert time.monotonic() - started < 5
    finally:
        if pids.exists():
            for pid in map(int, pids.read_text().split()):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


def test_command_result_does_not_wait_for_background_processes_holding_its_output(tmp_path):
    pid_file = tmp_path / "bg"
    script = write_script(tmp_path / "bg.sh", f'sleep 20 &\necho $! > "{pid_file}"\necho done\n')
    log = Log()
    started = time.monotonic()
    try:
        CommandProvisioner().apply(
            request(provisioner_config={"command": [str(script)]}), log, never
        )

        assert time.monotonic() - started < 5
        assert "done" in log
    finally:
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


@pytest.mark.parametrize("config", [{}, {"command": []}, {"command": "make apply"}])
def test_command_refuses_a_bad_configuration(config):
    with pytest.raises(ProvisionError, match="command"):
        CommandProvisioner().apply(request(provisioner_config=config), Log(), never)
