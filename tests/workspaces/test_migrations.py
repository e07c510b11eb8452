"""Data migrations, run on real rows."""

from __future__ import annotations

import importlib

import pytest
from django.db import connection

from tests.workspaces.factories import JobFactory
from workspaces.models import JobStatus, ProvisionerJob

pytestmark = pytest.mark.django_db

failure_kind_migration = importlib.import_module("workspaces.migrations.0004_job_failure_kind")


def test_it_classifies_existing_failed_jobs_from_their_errors():
    errors = {
        "Worker lost (heartbeat timeout).": "infrastructure",
        "Worker host 'build-7' unavailable.": "infrastructure",
        "The worker was interrupted (SystemExit).": "infrastructure",
        "the startup script of agent(s) main failed": "template",
        "command exited with status 3": "template",
        "": "template",
    }
    failed = {
        JobFactory(status=JobStatus.FAILED, error=error).id: kind for error, kind in errors.items()
    }
    succeeded = JobFactory(status=JobStatus.SUCCEEDED, error="")

    with connection.cursor() as cursor:
        cursor.execute(failure_kind_migration.BACKFILL)

    kinds = dict(ProvisionerJob.objects.values_list("id", "failure_kind"))
    assert {job_id: kinds[job_id] for job_id in failed} == failed
    assert kinds[succeeded.id] == ""
