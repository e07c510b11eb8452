"""The provisioner job state machine, its execution, and the Celery tasks around it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from datetime import timedelta
from urllib.parse import urlsplit
from uuid import uuid4

import kombu.exceptions
import psycopg
import pytest
import redis
from django.conf import settings as django_settings
from django.db import IntegrityError, connection, transaction
from django.db import InterfaceError as DjangoInterfaceError
from django.db import OperationalError as DjangoOperationalError
from django.utils import timezone

from accounts.services import system_user
from tests.accounts.factories import UserFactory
from tests.workspaces.factories import (
    AgentFactory,
    BuildFactory,
    JobFactory,
    PresetFactory,
    TemplateFactory,
    WorkspaceFactory,
)
from tests.workspaces.worker_helpers import (
    closed_port_url,
    command_template,
    pid_alive,
    wait_until,
    write_script,
)
from workspaces import jobs, routing, tasks
from workspaces.jobs import (
    job_acquire,
    job_append_log,
    job_cancel,
    job_complete,
    job_execute,
    job_heartbeat,
    jobs_fail_stale,
)
from workspaces.models import (
    AgentLifecycle,
    BuildReason,
    FailureKind,
    JobStatus,
    ProvisionerJob,
    Transition,
    Workspace,
    WorkspaceAgent,
    WorkspaceBuild,
)
from workspaces.provisioners import LocalProvisioner, ProvisionAborted, ProvisionError
from workspaces.services import build_create

STALE_LINE = "Worker stopped sending heartbeats"


def acquired(worker: str = "w1", **kwargs) -> ProvisionerJob:
    job = JobFactory(**kwargs)
    assert job_acquire(job.id, worker=worker) is not None
    return job


def make_stale(job: ProvisionerJob, seconds: float = 120) -> None:
    ProvisionerJob.objects.filter(id=job.id).update(
        heartbeat_at=timezone.now() - timedelta(seconds=seconds)
    )


def status_of(job_id) -> str:
    return ProvisionerJob.objects.values_list("status", flat=True).get(id=job_id)


# --- State machine --------------------------------------------------------------------------


@pytest.mark.django_db
class TestStateMachine:
    def test_it_acquires_a_pending_job_once(self):
        job = JobFactory()

        first = job_acquire(job.id, worker="a")
        second = job_acquire(job.id, worker="b")

        assert first is not None
        assert (first.status, first.worker) == (JobStatus.RUNNING, "a")
        assert first.started_at is not None and first.heartbeat_at is not None
        assert second is None
        job.refresh_from_db()
        assert job.worker == "a"

    @pytest.mark.parametrize(
        "status",
        [
            JobStatus.RUNNING,
            JobStatus.CANCELING,
            JobStatus.SUCCEEDED,
            JobStatus.FAILED,
            JobStatus.CANCELED,
        ],
    )
    def test_it_does_not_acquire_a_job_that_is_not_pending(self, status):
        job = JobFactory(status=status, worker="x")

        assert job_acquire(job.id, worker="y") is None

        job.refresh_from_db()
        assert (job.status, job.worker) == (status, "x")

    def test_only_the_holding_worker_completes_a_job(self):
        job = acquired("a")

        assert job_complete(job.id, worker="b", succeeded=True) is None
        assert status_of(job.id) == JobStatus.RUNNING

        done = job_complete(job.id, worker="a", succeeded=True)
        assert done.status == JobStatus.SUCCEEDED and done.completed_at is not None
        # A second completion (a duplicate delivery finishing late) changes nothing.
        assert job_complete(job.id, worker="a", succeeded=False, error="late") is None
        assert status_of(job.id) == JobStatus.SUCCEEDED

    def test_a_failed_job_keeps_its_error(self):
        job = acquired("a")

        done = job_complete(job.id, worker="a", succeeded=False, error="boom")

        assert (done.status, done.error) == (JobStatus.FAILED, "boom")

    @pytest.mark.parametrize("succeeded", [True, False])
    def test_a_canceling_job_ends_canceled_whatever_the_outcome(self, succeeded):
        job = acquired("a")
        assert job_cancel(job.id) == JobStatus.CANCELING

        done = job_complete(job.id, worker="a", succeeded=succeeded)

        assert done.status == JobStatus.CANCELED
        assert done.canceled_at is not None and done.completed_at is not None

    def test_canceling_a_pending_job_cancels_it_at_once(self):
        job = JobFactory()

        assert job_cancel(job.id) == JobStatus.CANCELED

        assert status_of(job.id) == JobStatus.CANCELED
        assert job_acquire(job.id, worker="a") is None

    def test_canceling_a_running_job_tells_its_worker_through_the_heartbeat(self):
        job = acquired("a")
        assert job_heartbeat(job.id, worker="a") == JobStatus.RUNNING

        assert job_cancel(job.id) == JobStatus.CANCELING

        assert job_heartbeat(job.id, worker="a") == JobStatus.CANCELING
        assert job_heartbeat(job.id, worker="b") is None

    def test_canceling_a_final_job_does_nothing(self):
        job = JobFactory(status=JobStatus.SUCCEEDED)

        assert job_cancel(job.id) is None
        assert status_of(job.id) == JobStatus.SUCCEEDED

    def test_the_stale_sweep_fails_only_jobs_with_an_old_heartbeat(self):
        old = acquired("a")
        make_stale(old)
        old_canceling = acquired("b")
        make_stale(old_canceling)
        job_cancel(old_canceling.id)
        fresh = acquired("c")
        pending = JobFactory(created_at=timezone.now() - timedelta(hours=1))

        failed = jobs_fail_stale(timeout=timedelta(seconds=60))

        assert set(failed) == {old.id, old_canceling.id}
        for job in (old, old_canceling):
            job.refresh_from_db()
            assert job.status == JobStatus.FAILED
            assert job.error == "Worker lost (heartbeat timeout)."
            assert STALE_LINE in job.logs and "60 s" in job.logs
        assert status_of(fresh.id) == JobStatus.RUNNING
        assert status_of(pending.id) == JobStatus.PENDING

    def test_a_worker_finishing_after_the_sweep_changes_nothing(self):
        job = acquired("a")
        make_stale(job)
        assert jobs_fail_stale(timeout=timedelta(seconds=60)) == [job.id]

        assert job_heartbeat(job.id, worker="a") is None
        assert job_append_log(job.id, "late output\n", worker="a") is False
        assert job_complete(job.id, worker="a", succeeded=True) is None

        job.refresh_from_db()
        assert job.status == JobStatus.FAILED
        assert job.logs.rstrip().endswith("marked failed.")


# --- Completion side effects ----------------------------------------------------------------


def running_build(transition: str, *, provisioner: str = "local", is_claim: bool = False):
    template = TemplateFactory(with_version__provisioner=provisioner)
    workspace = WorkspaceFactory(template=template)
    first = BuildFactory(workspace=workspace)
    AgentFactory(build=first, name="main", lifecycle_state=AgentLifecycle.READY)
    build = BuildFactory(
        workspace=workspace,
        transition=transition,
        is_claim=is_claim,
        job__status=JobStatus.PENDING,
    )
    job_acquire(build.job_id, worker="w")
    return build


@pytest.mark.django_db
class TestCompletionEffects:
    def test_a_succeeded_local_start_records_this_hosts_queue(self):
        build = running_build(Transition.START)

        job_complete(build.job_id, worker="w", succeeded=True)

        build.workspace.refresh_from_db()
        assert build.workspace.host_queue == routing.host_queue()

    def test_a_command_start_stays_routable_anywhere(self):
        build = running_build(Transition.START, provisioner="command")

        job_complete(build.job_id, worker="w", succeeded=True)

        build.workspace.refresh_from_db()
        assert build.workspace.host_queue == ""

    def test_a_succeeded_stop_turns_the_agents_off(self):
        build = running_build(Transition.STOP)

        job_complete(build.job_id, worker="w", succeeded=True)

        agent = WorkspaceAgent.objects.get(workspace=build.workspace)
        assert agent.lifecycle_state == AgentLifecycle.OFF
        assert agent.retired_at is None

    def test_a_succeeded_delete_deletes_the_workspace_and_retires_its_agents(self):
        build = running_build(Transition.DELETE)

        job_complete(build.job_id, worker="w", succeeded=True)

        assert Workspace.objects.get(id=build.workspace_id).deleted
        assert not WorkspaceAgent.objects.filter(
            workspace=build.workspace, retired_at__isnull=True
        ).exists()

    @pytest.mark.parametrize("outcome", ["failed", "canceled", "lost"])
    def test_a_delete_that_did_not_succeed_changes_nothing(self, outcome):
        build = running_build(Transition.DELETE)
        if outcome == "canceled":
            job_cancel(build.job_id)
        if outcome == "lost":
            make_stale(build.job)
            jobs_fail_stale(timeout=timedelta(seconds=60))

        job_complete(build.job_id, worker="w", succeeded=outcome != "failed")

        assert not Workspace.objects.get(id=build.workspace_id).deleted
        agent = WorkspaceAgent.objects.get(workspace=build.workspace)
        assert (agent.retired_at, agent.lifecycle_state) == (None, AgentLifecycle.READY)

    def test_a_succeeded_claim_keeps_the_agents_and_calls_the_claim_hook_in_the_transaction(
        self, monkeypatch
    ):
        build = running_build(Transition.START, is_claim=True)
        calls = []
        monkeypatch.setattr(
            jobs,
            "on_claim_build_succeeded",
            lambda b: calls.append((b.id, connection.in_atomic_block)),
        )

        job_complete(build.job_id, worker="w", succeeded=True)

        assert calls == [(build.id, True)]
        agent = WorkspaceAgent.objects.get(workspace=build.workspace)
        assert (agent.retired_at, agent.lifecycle_state) == (None, AgentLifecycle.READY)


# --- Execution ------------------------------------------------------------------------------


@pytest.fixture
def fast(settings, tmp_path):
    """Quick heartbeats, a private DATA_DIR, and an ACCESS_URL nobody answers."""
    settings.PROVISIONER_HEARTBEAT_INTERVAL = 0.1
    settings.DATA_DIR = tmp_path / "data"
    settings.ACCESS_URL = closed_port_url()
    return settings


def command_build(tmp_path, body: str, *, transition: str = Transition.START, args=()):
    """A pending build of a fresh workspace whose command is the shell script ``body``."""
    script = write_script(tmp_path / f"script-{uuid4().hex[:6]}.sh", body)
    template = command_template([str(script), *map(str, args)])
    workspace = WorkspaceFactory(template=template)
    if transition != Transition.START:
        BuildFactory(workspace=workspace)
    return BuildFactory(workspace=workspace, transition=transition, job__status=JobStatus.PENDING)


def run_in_thread(target, *args, **kwargs) -> tuple[threading.Thread, list]:
    result: list = []

    def run():
        try:
            result.append(target(*args, **kwargs))
        finally:
            connection.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


@pytest.mark.django_db(transaction=True)
class TestExecution:
    def test_it_runs_a_build_and_keeps_its_output(self, fast, tmp_path):
        build = command_build(tmp_path, 'echo "one"\necho "two" >&2\necho three\n')

        job = job_execute(build.job_id, worker="w")

        assert job.status == JobStatus.SUCCEEDED and job.error == ""
        logs = ProvisionerJob.objects.get(id=build.job_id).logs
        assert logs.index("one\n") < logs.index("two\n") < logs.index("three\n")
        assert "start succeeded" in logs

    def test_it_streams_output_while_the_job_runs(self, fast, tmp_path):
        gate = tmp_path / "gate"
        build = command_build(
            tmp_path,
            f'echo "first line"\nwhile [ ! -e "{gate}" ]; do sleep 0.05; done\necho "last line"\n',
        )

        thread, result = run_in_thread(job_execute, build.job_id, worker="w")
        try:
            # The command is still blocked on the gate: what we see was streamed, not dumped.
            wait_until(
                lambda: "first line" in ProvisionerJob.objects.get(id=build.job_id).logs,
                what="the first line in the job log",
            )
            assert status_of(build.job_id) == JobStatus.RUNNING
        finally:
            gate.touch()
            thread.join(10)
        assert result[0].status == JobStatus.SUCCEEDED
        assert "last line" in ProvisionerJob.objects.get(id=build.job_id).logs

    def test_a_failing_command_fails_the_job_with_its_output_in_the_log(self, fast, tmp_path):
        build = command_build(tmp_path, 'echo "terraform says no"\nexit 3\n')

        job = job_execute(build.job_id, worker="w")

        assert job.status == JobStatus.FAILED
        assert job.error == "command exited with status 3"
        logs = ProvisionerJob.objects.get(id=build.job_id).logs
        assert "terraform says no" in logs and "error: command exited with status 3" in logs

    def test_an_unexpected_exception_fails_the_job_and_logs_its_last_traceback_line(
        self, fast, tmp_path
    ):
        # An agent entry without a name is a bug somewhere upstream, not a ProvisionError.
        template = TemplateFactory(
            with_version__provisioner="command",
            with_version__provisioner_config={"command": ["/bin/true"]},
            with_version__agents=[{"startup_script": "echo nameless"}],
        )
        build = BuildFactory(
            workspace=WorkspaceFactory(template=template), job__status=JobStatus.PENDING
        )

        job = job_execute(build.job_id, worker="w")

        assert job.status == JobStatus.FAILED
        assert job.error == "KeyError: 'name'"
        assert "KeyError: 'name'" in ProvisionerJob.objects.get(id=build.job_id).logs

    def test_an_unknown_command_fails_the_job(self, fast, tmp_path):
        template = TemplateFactory(
            with_version__provisioner="command",
            with_version__provisioner_config={"command": [str(tmp_path / "missing")]},
        )
        build = BuildFactory(
            workspace=WorkspaceFactory(template=template), job__status=JobStatus.PENDING
        )

        job = job_execute(build.job_id, worker="w")

        assert job.status == JobStatus.FAILED
        assert "cannot run" in job.error

    def test_a_runaway_command_cannot_fill_the_log(self, fast, tmp_path, monkeypatch):
        monkeypatch.setattr(jobs._LogSink, "LIMIT", 2000)
        build = command_build(
            tmp_path, 'i=0\nwhile [ $i -lt 500 ]; do echo "line $i"; i=$((i+1)); done\n'
        )

        job = job_execute(build.job_id, worker="w")

        assert job.status == JobStatus.SUCCEEDED
        logs = ProvisionerJob.objects.get(id=build.job_id).logs
        assert "line 0\n" in logs and "line 499" not in logs
        assert "[log truncated: further output is not kept]" in logs
        assert len(logs) < 2100

    def test_a_failing_command_is_a_template_failure(self, fast, tmp_path):
        build = command_build(tmp_path, "exit 3\n")

        job = job_execute(build.job_id, worker="w")

        assert (job.status, job.failure_kind) == (JobStatus.FAILED, FailureKind.TEMPLATE)

    def test_a_database_connection_cut_mid_build_is_an_infrastructure_failure(self, fast, tmp_path):
        # The command succeeds; then the executor polls the database for the agent (which never
        # reports: nothing answers ACCESS_URL) and PostgreSQL cuts its connection, as a
        # restart or a failover does.
        fast.PROVISIONER_AGENT_READY_TIMEOUT = 30
        build = command_build(tmp_path, "echo provisioned\n")

        thread, result = run_in_thread(job_execute, build.job_id, worker="w")
        wait_until(
            lambda: "waiting for 1 agent(s)" in ProvisionerJob.objects.get(id=build.job_id).logs,
            what="the executor to wait for the agent",
        )
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND backend_type = 'client backend'"
            )
        thread.join(20)

        assert not thread.is_alive()
        job = ProvisionerJob.objects.get(id=build.job_id)
        assert job.status == JobStatus.FAILED, job.logs
        assert job.failure_kind == FailureKind.INFRASTRUCTURE, job.error
        assert "Error" in job.error  # the database error's type and message
        assert result[0].failure_kind == FailureKind.INFRASTRUCTURE

    def test_an_interrupted_worker_fails_a_prebuild_start_as_infrastructure_and_queues_the_stop(
        self, fast, monkeypatch
    ):
        # SystemExit reaches the job when a worker is told to stop at once (cold shutdown).
        def interrupted(self, request, log, should_abort):
            raise SystemExit(1)

        monkeypatch.setattr(LocalProvisioner, "apply", interrupted)
        build = _prebuild_start()
        client = _broker()
        client.delete(routing.host_queue())
        try:
            with pytest.raises(SystemExit):
                job_execute(build.job_id, worker="w")

            job = ProvisionerJob.objects.get(id=build.job_id)
            assert (job.status, job.failure_kind) == (
                JobStatus.FAILED,
                FailureKind.INFRASTRUCTURE,
            )
            assert job.error == "The worker was interrupted (SystemExit)."
            assert _queued_tasks(client, routing.host_queue()) == [
                (jobs.STOP_FAILED_PREBUILD_TASK, str(build.job_id))
            ]
        finally:
            client.delete(routing.host_queue())

    def test_a_job_that_is_not_pending_is_left_alone(self, fast, tmp_path):
        marker = tmp_path / "ran"
        build = command_build(tmp_path, f'touch "{marker}"\n')
        job_acquire(build.job_id, worker="someone-else")

        assert job_execute(build.job_id, worker="w") is None

        assert not marker.exists()
        assert status_of(build.job_id) == JobStatus.RUNNING

    def test_canceling_a_running_job_aborts_the_provisioner(self, fast, tmp_path):
        pids = tmp_path / "pids"
        build = command_build(
            tmp_path,
            'sleep 60 &\necho "$$ $!" > "$1"\necho started\nwait\n',
            args=[pids],
        )

        thread, result = run_in_thread(job_execute, build.job_id, worker="w")
        try:
            wait_until(pids.exists, what="the command to start")
            shell, sleeper = map(int, pids.read_text().split())
            assert pid_alive(shell) and pid_alive(sleeper)

            assert job_cancel(build.job_id) == JobStatus.CANCELING
            thread.join(15)
            assert not thread.is_alive()
            alive_after = [pid for pid in (shell, sleeper) if pid_alive(pid)]
        finally:
            if pids.exists():
                for pid in map(int, pids.read_text().split()):
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
        assert alive_after == []
        job = ProvisionerJob.objects.get(id=build.job_id)
        assert result[0].status == job.status == JobStatus.CANCELED
        assert "aborting: stopping the command" in job.logs

    def test_a_job_lost_to_the_sweep_is_aborted_and_its_effects_are_not_applied(
        self, fast, tmp_path
    ):
        started = tmp_path / "started"
        build = command_build(
            tmp_path, f'echo $$ > "{started}"\nexec sleep 30\n', transition=Transition.DELETE
        )

        thread, result = run_in_thread(job_execute, build.job_id, worker="w")
        try:
            wait_until(lambda: started.exists() and started.read_text(), what="the command")
            # Race under test: the sweep declares the worker lost while it is still working.
            assert jobs_fail_stale(timeout=timedelta(0)) == [build.job_id]
            thread.join(15)
            assert not thread.is_alive() and result == [None]
        finally:
            with contextlib.suppress(OSError, ValueError):
                os.killpg(int(started.read_text()), signal.SIGKILL)

        job = ProvisionerJob.objects.get(id=build.job_id)
        assert job.status == JobStatus.FAILED
        assert job.logs.rstrip().endswith("marked failed.")
        assert not Workspace.objects.get(id=build.workspace_id).deleted

    @pytest.mark.parametrize("workers", [2, 4])
    def test_racing_acquires_have_exactly_one_winner(self, workers):
        job = JobFactory()
        barrier = threading.Barrier(workers)

        def acquire(name: str):
            barrier.wait()
            return job_acquire(job.id, worker=name)

        threads = [run_in_thread(acquire, f"worker-{i}") for i in range(workers)]
        for thread, _ in threads:
            thread.join(10)

        winners = [result[0] for _, result in threads if result[0] is not None]
        assert len(winners) == 1
        job.refresh_from_db()
        assert (job.status, job.worker) == (JobStatus.RUNNING, winners[0].worker)

    @pytest.mark.parametrize("workers", [2, 4])
    def test_racing_workers_run_a_job_exactly_once(self, fast, tmp_path, workers):
        runs = tmp_path / "runs"
        build = command_build(tmp_path, f'echo "$$" >> "{runs}"\nsleep 0.3\n')
        barrier = threading.Barrier(workers)

        def execute(name: str):
            barrier.wait()
            return job_execute(build.job_id, worker=name)

        threads = [run_in_thread(execute, f"worker-{i}") for i in range(workers)]
        for thread, _ in threads:
            thread.join(20)

        outcomes = [result[0] for _, result in threads]
        winners = [job for job in outcomes if job is not None]
        assert len(winners) == 1
        assert winners[0].status == JobStatus.SUCCEEDED
        assert len(runs.read_text().splitlines()) == 1
        job = ProvisionerJob.objects.get(id=build.job_id)
        assert (job.status, job.worker) == (JobStatus.SUCCEEDED, winners[0].worker)
        assert job.logs.count("start succeeded") == 1

    def test_a_start_whose_worker_died_still_routes_later_builds_to_its_host(self, fast, tmp_path):
        # The worker dies after the agents were created and (maybe) started, before completing.
        template = TemplateFactory()  # local provisioner
        workspace = WorkspaceFactory(template=template)
        build = BuildFactory(workspace=workspace, job__status=JobStatus.PENDING)
        job_acquire(build.job_id, worker="dead")
        assert jobs.job_prepare(build, worker="dead") is not None
        make_stale(build.job)

        assert jobs_fail_stale(timeout=timedelta(seconds=60)) == [build.job_id]

        workspace.refresh_from_db()
        assert workspace.host_queue == routing.host_queue()
        stop = build_create(
            workspace=workspace, transition=Transition.STOP, initiator=workspace.owner
        )
        assert stop.job.queue == routing.host_queue()


# --- Tasks ----------------------------------------------------------------------------------


def _broker() -> redis.Redis:
    return redis.Redis(unix_socket_path=urlsplit(django_settings.CELERY_BROKER_URL).path)


def _queued_job_ids(client: redis.Redis, queue: str) -> list[str]:
    ids = []
    for raw in client.lrange(queue, 0, -1):
        message = json.loads(raw)
        assert message["headers"]["task"] == jobs.RUN_JOB_TASK
        ids.append(message["headers"]["argsrepr"].strip("[]()',\" "))
    return ids


@pytest.mark.django_db
class TestTasks:
    def test_the_tasks_are_registered_under_their_fixed_names(self):
        from config.celery import app

        app.loader.import_default_modules()

        scheduled = {entry["task"] for entry in django_settings.CELERY_BEAT_SCHEDULE.values()}
        for name in (
            jobs.RUN_JOB_TASK,
            "workspaces.fail_stale_jobs",
            "workspaces.requeue_pending_jobs",
        ):
            assert name in app.tasks
        assert {"workspaces.fail_stale_jobs", "workspaces.requeue_pending_jobs"} <= scheduled

    def test_run_provisioner_job_drops_a_job_that_does_not_exist(self, caplog):
        assert tasks.run_provisioner_job(str(uuid4())) is None
        assert "job_not_found" in caplog.text

        assert tasks.run_provisioner_job("not-a-uuid") is None
        assert "job_message_invalid" in caplog.text

    def test_fail_stale_jobs_uses_the_heartbeat_timeout(self, settings):
        settings.PROVISIONER_HEARTBEAT_TIMEOUT = 30
        old = acquired("a")
        make_stale(old, seconds=31)
        recent = acquired("b")
        make_stale(recent, seconds=20)

        assert tasks.fail_stale_jobs() == 1

        assert status_of(old.id) == JobStatus.FAILED
        assert status_of(recent.id) == JobStatus.RUNNING

    def test_requeue_pending_jobs_re_enqueues_old_pending_jobs_to_their_queue(self):
        queue = f"test-requeue-{uuid4().hex}"
        client = _broker()
        old = JobFactory(queue=queue, created_at=timezone.now() - timedelta(seconds=31))
        JobFactory(queue=queue)  # young: its message is most likely still on its way
        running = JobFactory(
            queue=queue, status=JobStatus.RUNNING, created_at=timezone.now() - timedelta(hours=1)
        )
        try:
            assert tasks.requeue_pending_jobs() == 1

            assert _queued_job_ids(client, queue) == [str(old.id)]
            assert str(running.id) not in _queued_job_ids(client, queue)
        finally:
            client.delete(queue)

    def test_jobs_pending_for_a_gone_worker_host_fail_instead_of_waiting_forever(self, settings):
        settings.PROVISIONER_HOST_QUEUE_TIMEOUT = 600
        gone = routing.host_queue(f"gone-{uuid4().hex[:8]}")
        long_ago = timezone.now() - timedelta(minutes=11)
        stranded = JobFactory(queue=gone, created_at=long_ago)
        waiting = JobFactory(queue=gone, created_at=timezone.now() - timedelta(minutes=5))
        anywhere = JobFactory(queue=routing.DEFAULT_QUEUE, created_at=long_ago)
        client = _broker()
        try:
            assert tasks.requeue_pending_jobs() == 2  # the two still worth waiting for

            stranded.refresh_from_db()
            assert stranded.status == JobStatus.FAILED and stranded.completed_at is not None
            assert stranded.error == f"Worker host {gone.removeprefix('host.')!r} unavailable."
            assert "Forget worker host" in stranded.logs
            assert status_of(waiting.id) == JobStatus.PENDING
            assert status_of(anywhere.id) == JobStatus.PENDING
            # The failed one is not re-enqueued; the one still worth waiting for is.
            assert _queued_job_ids(client, gone) == [str(waiting.id)]
        finally:
            client.delete(gone, routing.DEFAULT_QUEUE)

    def test_a_host_queue_timeout_of_zero_waits_forever(self, settings):
        settings.PROVISIONER_HOST_QUEUE_TIMEOUT = 0
        gone = routing.host_queue(f"gone-{uuid4().hex[:8]}")
        job = JobFactory(queue=gone, created_at=timezone.now() - timedelta(days=2))
        client = _broker()
        try:
            assert tasks.requeue_pending_jobs() == 1

            assert status_of(job.id) == JobStatus.PENDING
            assert _queued_job_ids(client, gone) == [str(job.id)]
        finally:
            client.delete(gone)


# --- Failure kinds --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (ProvisionError("command exited with status 3"), FailureKind.TEMPLATE),
        (ProvisionAborted("aborted"), FailureKind.TEMPLATE),
        (KeyError("name"), FailureKind.TEMPLATE),  # a bug we cannot place: conservative
        (DjangoOperationalError("server closed the connection"), FailureKind.INFRASTRUCTURE),
        (DjangoInterfaceError("connection already closed"), FailureKind.INFRASTRUCTURE),
        (psycopg.OperationalError("terminating connection"), FailureKind.INFRASTRUCTURE),
        (kombu.exceptions.OperationalError("broker down"), FailureKind.INFRASTRUCTURE),
        (redis.exceptions.ConnectionError("refused"), FailureKind.INFRASTRUCTURE),
        (SystemExit(1), FailureKind.INFRASTRUCTURE),
        (KeyboardInterrupt(), FailureKind.INFRASTRUCTURE),
    ],
)
def test_it_classifies_what_ended_a_build(exc, kind):
    assert jobs.failure_kind_of(exc) == kind


def _queued_tasks(client: redis.Redis, queue: str) -> list[tuple[str, str]]:
    """``(task name, first argument)`` of every message waiting on ``queue``."""
    found = []
    for raw in client.lrange(queue, 0, -1):
        headers = json.loads(raw)["headers"]
        found.append((headers["task"], headers["argsrepr"].strip("[]()',\" ")))
    return found


def _prebuild_start(*, provisioner: str = "local", owner=None) -> WorkspaceBuild:
    """A pending reconciler start build of a fresh prebuild (or of ``owner``'s workspace)."""
    template = TemplateFactory(with_version__provisioner=provisioner)
    system = system_user()
    workspace = WorkspaceFactory(template=template, owner=owner or system)
    return BuildFactory(
        workspace=workspace,
        initiator=system,
        reason=BuildReason.PREBUILD,
        preset=PresetFactory(template_version=template.active_version),
        job__status=JobStatus.PENDING,
    )


@pytest.mark.django_db
class TestFailureKinds:
    def test_a_failed_job_is_a_template_failure_unless_told_otherwise(self):
        template_job, infra_job = acquired("a"), acquired("b")

        done = job_complete(template_job.id, worker="a", succeeded=False, error="boom")
        lost = job_complete(
            infra_job.id,
            worker="b",
            succeeded=False,
            error="OperationalError: gone",
            failure_kind=FailureKind.INFRASTRUCTURE,
        )

        assert (done.status, done.failure_kind) == (JobStatus.FAILED, FailureKind.TEMPLATE)
        assert ProvisionerJob.objects.get(id=lost.id).failure_kind == FailureKind.INFRASTRUCTURE

    @pytest.mark.parametrize("cancel", [False, True])
    def test_only_a_failed_job_has_a_kind(self, cancel):
        job = acquired("a")
        if cancel:
            job_cancel(job.id)

        done = job_complete(
            job.id, worker="a", succeeded=not cancel, failure_kind=FailureKind.INFRASTRUCTURE
        )

        assert done.status in (JobStatus.SUCCEEDED, JobStatus.CANCELED)
        assert ProvisionerJob.objects.get(id=job.id).failure_kind == ""

    def test_the_database_refuses_a_kind_on_a_job_that_did_not_fail(self):
        job = JobFactory(status=JobStatus.SUCCEEDED)

        with pytest.raises(IntegrityError), transaction.atomic():
            ProvisionerJob.objects.filter(id=job.id).update(failure_kind=FailureKind.TEMPLATE)
        with pytest.raises(IntegrityError), transaction.atomic():
            ProvisionerJob.objects.filter(id=job.id).update(
                status=JobStatus.FAILED, failure_kind="cosmic-rays"
            )

    def test_the_sweeps_fail_jobs_as_infrastructure_failures(self, settings):
        stale = acquired("a")
        make_stale(stale)
        settings.PROVISIONER_HOST_QUEUE_TIMEOUT = 600
        gone = routing.host_queue(f"gone-{uuid4().hex[:8]}")
        stranded = JobFactory(queue=gone, created_at=timezone.now() - timedelta(minutes=11))

        assert jobs_fail_stale(timeout=timedelta(seconds=60)) == [stale.id]
        assert jobs.jobs_fail_unserved_host_jobs(timeout=timedelta(minutes=10)) == [stranded.id]

        for job in (stale, stranded):
            job.refresh_from_db()
            assert (job.status, job.failure_kind) == (
                JobStatus.FAILED,
                FailureKind.INFRASTRUCTURE,
            )

    def test_a_lost_prebuild_start_asks_its_host_to_stop_what_it_started(self):
        prebuild_build = _prebuild_start()
        user_build = _prebuild_start(owner=UserFactory())  # a user's workspace: left alone
        command_build_ = _prebuild_start(provisioner="command")  # no local processes
        host = f"host-{uuid4().hex[:8]}"
        queue = routing.host_queue(host)
        for build in (prebuild_build, user_build, command_build_):
            job_acquire(build.job_id, worker="dead")
            Workspace.objects.filter(id=build.workspace_id).update(host_queue=queue)
            make_stale(build.job)
        client = _broker()
        try:
            failed = jobs_fail_stale(timeout=timedelta(seconds=60))

            assert len(failed) == 3
            assert _queued_tasks(client, queue) == [
                (jobs.STOP_FAILED_PREBUILD_TASK, str(prebuild_build.job_id))
            ]
        finally:
            client.delete(queue)
