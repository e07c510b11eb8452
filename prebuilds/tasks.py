"""Celery tasks of the prebuilds app. Thin: they call the reconciler and nothing else."""

from __future__ import annotations

from celery import shared_task

from prebuilds import refill
from prebuilds.reconciler import reconcile


@shared_task(name="prebuilds.reconcile", ignore_result=True)
def reconcile_task() -> None:
    """One reconciliation pass. Several beat schedulers may fire at once: the advisory lock
    lets one pass run and the others return at once."""
    reconcile()


@shared_task(name=refill.REFILL_TASK, ignore_result=True)
def refill_task() -> None:
    """A pass asked for by a claim, a miss or a finished prebuild build (``prebuilds.refill``)."""
    refill.refill_run()
