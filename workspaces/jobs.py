"""Provisioner job state machine: ``pending → running → succeeded / failed / canceled``.

Every transition is a conditional ``UPDATE … WHERE status = <expected>`` whose row count says
whether this caller won. That is what makes two workers racing for one job safe: exactly one
``job_acquire`` sees a row count of 1, the other gets ``None`` and walks away. A worker also only
completes a job it still holds (``worker`` matches and the job is running or canceling), so a
job failed by the stale-heartbeat sweep cannot be resurrected by a worker that wakes up late.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from uuid import UUID

from django.db import transaction
from django.db.models import F, Value
from django.db.models.functions import Concat
from django.utils import timezone

from workspaces.models import JobStatus, ProvisionerJob

logger = logging.getLogger(__name__)

RUN_JOB_TASK = "workspaces.run_provisioner_job"


def job_enqueue(job_id: UUID, queue: str) -> None:
    """Hand a job to Celery. Never raises: a job whose message is lost stays ``pending`` and is
    re-enqueued by the periodic sweep, so a broker outage delays builds but loses none."""
    from config.celery import app

    try:
        app.send_task(RUN_JOB_TASK, args=[str(job_id)], queue=queue)
    except Exception:  # the broker may be down; the sweep will retry
        logger.exception("job_enqueue_failed job=%s queue=%s", job_id, queue)


def job_acquire(job_id: UUID, *, worker: str) -> ProvisionerJob | None:
    """Move a pending job to running for ``worker``; None if someone else got it first."""
    now = timezone.now()
    won = ProvisionerJob.objects.filter(id=job_id, status=JobStatus.PENDING).update(
        status=JobStatus.RUNNING, worker=worker, started_at=now, heartbeat_at=now
    )
    return ProvisionerJob.objects.get(id=job_id) if won else None


def job_heartbeat(job_id: UUID, *, worker: str) -> str | None:
    """Record that ``worker`` is alive on this job; answer the job's status (None: not ours).

    The executor stops its work when the answer is ``canceling`` or None.
    """
    updated = ProvisionerJob.objects.filter(
        id=job_id, worker=worker, status__in=(JobStatus.RUNNING, JobStatus.CANCELING)
    ).update(heartbeat_at=timezone.now())
    if not updated:
        return None
    return ProvisionerJob.objects.values_list("status", flat=True).get(id=job_id)


def job_append_log(job_id: UUID, text: str) -> None:
    """Append to the job's log in the database (one UPDATE, no read-modify-write race)."""
    if text:
        ProvisionerJob.objects.filter(id=job_id).update(logs=Concat(F("logs"), Value(text)))


@transaction.atomic
def job_complete(
    job_id: UUID, *, worker: str, succeeded: bool, error: str = ""
) -> ProvisionerJob | None:
    """Finish a job ``worker`` holds. A canceling job ends as canceled whatever the outcome.

    Returns the finished job, or None when the job was no longer ours (failed by the stale
    sweep, or never acquired), in which case nothing changes.
    """
    job = (
        ProvisionerJob.objects.select_for_update()
        .filter(id=job_id, worker=worker, status__in=(JobStatus.RUNNING, JobStatus.CANCELING))
        .first()
    )
    if job is None:
        return None
    now = timezone.now()
    if job.status == JobStatus.CANCELING:
        job.status, job.canceled_at = JobStatus.CANCELED, now
    else:
        job.status = JobStatus.SUCCEEDED if succeeded else JobStatus.FAILED
    job.error = "" if job.status == JobStatus.SUCCEEDED else (error or job.error)
    job.completed_at = now
    job.save(update_fields=["status", "error", "completed_at", "canceled_at"])
    return job


def job_cancel(job_id: UUID) -> str | None:
    """Cancel a job: a pending one ends as canceled at once, a running one becomes canceling
    (its worker notices at the next heartbeat). Returns the new status, None if already final."""
    now = timezone.now()
    if ProvisionerJob.objects.filter(id=job_id, status=JobStatus.PENDING).update(
        status=JobStatus.CANCELED, canceled_at=now, completed_at=now, error="Canceled."
    ):
        return JobStatus.CANCELED
    if ProvisionerJob.objects.filter(id=job_id, status=JobStatus.RUNNING).update(
        status=JobStatus.CANCELING
    ):
        return JobStatus.CANCELING
    return None


def jobs_fail_stale(*, timeout: timedelta) -> list[UUID]:
    """Fail running/canceling jobs whose heartbeat is older than ``timeout`` (worker died).

    Returns the ids failed. Each job gets a log line saying why.
    """
    cutoff = timezone.now() - timeout
    stale = list(
        ProvisionerJob.objects.filter(
            status__in=(JobStatus.RUNNING, JobStatus.CANCELING), heartbeat_at__lt=cutoff
        ).values_list("id", flat=True)
    )
    failed = []
    for job_id in stale:
        message = (
            f"Worker stopped sending heartbeats for more than {int(timeout.total_seconds())} s; "
            "the job is marked failed.\n"
        )
        now = timezone.now()
        if ProvisionerJob.objects.filter(
            id=job_id,
            status__in=(JobStatus.RUNNING, JobStatus.CANCELING),
            heartbeat_at__lt=cutoff,
        ).update(
            status=JobStatus.FAILED,
            completed_at=now,
            error="Worker lost (heartbeat timeout).",
            logs=Concat(F("logs"), Value(message)),
        ):
            logger.warning("job_failed_stale job=%s timeout=%s", job_id, timeout)
            failed.append(job_id)
    return failed
