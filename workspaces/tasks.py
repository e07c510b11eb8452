"""Celery tasks for provisioner jobs. Thin: each takes ids or nothing and calls ``jobs``.

Found by ``app.autodiscover_tasks()`` in ``config/celery.py`` (``<app>/tasks.py`` of every
installed app). The names are fixed: ``settings.CELERY_BEAT_SCHEDULE`` and ``jobs.job_enqueue``
refer to them.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from uuid import UUID

from celery import shared_task
from django.conf import settings

from workspaces import jobs, routing
from workspaces.models import BuildReason, ProvisionerJob, WorkspaceBuild

logger = logging.getLogger(__name__)


# acks_late: the message is acknowledged only after the job ran, so a worker that dies mid-job
# leaves it for redelivery. Redelivery (and any duplicate from the pending sweep) is harmless:
# job_execute's conditional acquire lets exactly one delivery run a job. A build longer than the
# broker's visibility timeout is redelivered while it runs, and that delivery returns at once.
@shared_task(name=jobs.RUN_JOB_TASK, acks_late=True, ignore_result=True)
def run_provisioner_job(job_id: str) -> str | None:
    """Execute one provisioner job; answer its final status (None: not run by this delivery)."""
    try:
        parsed = UUID(str(job_id))
    except ValueError:
        logger.error("job_message_invalid job=%r; dropped", job_id)
        return None
    if not ProvisionerJob.objects.filter(id=parsed).exists():
        # Jobs are enqueued only after their transaction commits, so this is a message from
        # another database (a reset, a test run) or a deleted row: nothing to do, ever.
        logger.warning("job_not_found job=%s; message dropped", parsed)
        return None
    job = jobs.job_execute(parsed, worker=routing.worker_identity())
    if job is not None:
        _refill_after_prebuild_build(job)
    return job.status if job is not None else None


@shared_task(name=jobs.STOP_FAILED_PREBUILD_TASK, ignore_result=True)
def stop_failed_prebuild(job_id: str) -> bool:
    """Stop the processes a failed prebuild start build left on this host (sent to the host's
    own queue by ``jobs.prebuild_stop_processes_later``); answer whether it stopped anything."""
    try:
        parsed = UUID(str(job_id))
    except ValueError:
        logger.error("job_message_invalid job=%r; dropped", job_id)
        return False
    return jobs.prebuild_stop_processes(parsed)


def _refill_after_prebuild_build(job: ProvisionerJob) -> None:
    """A prebuild build that finished frees room under the in-flight cap (a paced fill's next
    builds) or failed (back-off to decide): ask for a pass now rather than at the next interval."""
    build = WorkspaceBuild.objects.filter(job_id=job.id, reason=BuildReason.PREBUILD).first()
    if build is not None:
        from prebuilds.refill import refill_request  # the feature's hook; workspaces stays below

        reason = f"prebuild_{build.transition}_{job.status}"
        refill_request(reason=reason, preset_id=build.preset_id)


# Safe with several beat schedulers: every failure is a conditional update.
@shared_task(name="workspaces.fail_stale_jobs", ignore_result=True)
def fail_stale_jobs() -> int:
    """Fail running jobs whose worker stopped heartbeating; answer how many."""
    timeout = timedelta(seconds=settings.PROVISIONER_HEARTBEAT_TIMEOUT)
    return len(jobs.jobs_fail_stale(timeout=timeout))


@shared_task(name="workspaces.requeue_pending_jobs", ignore_result=True)
def requeue_pending_jobs() -> int:
    """Re-enqueue pending jobs whose message may have been lost; answer how many.

    Jobs waiting too long for a worker host that never comes are failed first, not re-enqueued.
    """
    if settings.PROVISIONER_HOST_QUEUE_TIMEOUT > 0:
        timeout = timedelta(seconds=settings.PROVISIONER_HOST_QUEUE_TIMEOUT)
        jobs.jobs_fail_unserved_host_jobs(timeout=timeout)
    return len(jobs.jobs_requeue_pending(older_than=jobs.REQUEUE_PENDING_AFTER))
