"""Provisioner job execution (see the module's functions for each guarantee)."""

from __future__ import annotations

import logging
from uuid import UUID

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
