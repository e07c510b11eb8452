"""Jobs executed by a real Celery worker subprocess, on the test database and the test broker."""

from __future__ import annotations

import contextlib
import os
import signal
from datetime import timedelta

import pytest

from tests.accounts.factories import UserFactory
from tests.workspaces.worker_helpers import (
    celery_worker,
    command_template,
    pid_alive,
    wait_until,
    write_script,
)
from workspaces.jobs import jobs_fail_stale
from workspaces.models import JobStatus, ProvisionerJob
from workspaces.services import workspace_create

pytestmark = pytest.mark.django_db(transaction=True)


def job_of(workspace) -> ProvisionerJob:
    return ProvisionerJob.objects.get(build__workspace=workspace)


def test_a_worker_runs_a_new_workspaces_first_build(tmp_path):
    script = write_script(
        tmp_path / "apply.sh",
        'echo "provisioning $WORKSPACE_NAME for $WORKSPACE_OWNER"\n'
        'echo "done: $WORKSPACE_TRANSITION"\n',
    )
    with celery_worker(tmp_path) as worker:
        # Enqueued to `default` when the transaction commits, like any first build.
        workspace = workspace_create(
            owner=UserFactory(username="alice"),
            template=command_template([str(script)]),
            name="dev",
        )
        job = wait_until(
            lambda: (
                (j := job_of(workspace)).status in (JobStatus.SUCCEEDED, JobStatus.FAILED) and j
            ),
            timeout=20,
            what=f"the job to finish (worker log: {worker.log_path})",
        )

    assert job.status == JobStatus.SUCCEEDED, (job.error, job.logs, worker.log())
    assert job.queue == "default"
    assert job.worker.endswith(f":{worker.pid}")  # --pool solo: the worker process itself
    assert "provisioning dev for alice" in job.logs
    assert "done: start" in job.logs


def test_a_killed_worker_s_job_is_failed_by_the_stale_sweep(tmp_path):
    pid_file = tmp_path / "command.pid"
    script = write_script(
        tmp_path / "slow.sh", f'echo $$ > "{pid_file}"\necho "sleeping"\nexec sleep 60\n'
    )
    command_pid = None
    try:
        with celery_worker(tmp_path, heartbeat_interval=0.2) as worker:
            workspace = workspace_create(
                owner=UserFactory(), template=command_template([str(script)]), name="slow"
            )
            job = wait_until(
                lambda: (
                    (j := job_of(workspace)).status == JobStatus.RUNNING
                    and "sleeping" in j.logs
                    and j
                ),
                timeout=20,
                what="the job to run",
            )
            command_pid = int(pid_file.read_text())
            # The worker is alive: its heartbeat moves on and the sweep leaves the job alone.
            wait_until(
                lambda: job_of(workspace).heartbeat_at > job.heartbeat_at,
                what="a heartbeat",
            )
            assert jobs_fail_stale(timeout=timedelta(seconds=1)) == []

            os.kill(worker.pid, signal.SIGKILL)
            worker.process.wait(10)

            # Heartbeats stopped with the worker; once they are a second old, the sweep fails it.
            failed = wait_until(
                lambda: jobs_fail_stale(timeout=timedelta(seconds=1)),
                timeout=10,
                what="the sweep to fail the job",
            )
    finally:
        if command_pid is not None:
            with contextlib.suppress(OSError):
                os.killpg(command_pid, signal.SIGKILL)

    job = job_of(workspace)
    assert failed == [job.id]
    assert job.status == JobStatus.FAILED
    assert job.error == "Worker lost (heartbeat timeout)."
    assert "Worker stopped sending heartbeats" in job.logs
    assert not pid_alive(worker.pid)
