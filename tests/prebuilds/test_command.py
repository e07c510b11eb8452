from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from accounts.models import SYSTEM_USER_ID
from prebuilds.models import MissReason, PrebuildClaim, PrebuildsSettings, ReconciliationPass
from tests.accounts.factories import UserFactory
from tests.processes import ROOT, process_env
from tests.workspaces.factories import PresetFactory, prebuild
from workspaces.creation import workspace_request
from workspaces.models import Workspace

STATE_KEYS = {
    "actual",
    "desired",
    "eligible",
    "expired",
    "extraneous",
    "starting",
    "stopping",
    "deleting",
    "unhealthy",  # an extra count DESIGN.md §7 allows (issue 12)
}
PRESET_KEYS = {
    "preset_id",
    "template_id",
    "template_version_id",
    "preset",
    "template",
    "template_version",
    "organization",
    "active",
    "status",
    "state",
    "actions",
    # Added by issue 12 (the contract allows added keys): failures by kind, the newest one.
    "failures",
    "last_failure",
    # Added by issue 17: how a pool sized by a goal got its size (null otherwise), and the
    # preset's claim requests of the last hour, hits and misses by reason.
    "sizing",
    "claims",
}


def run(*args: str) -> str:
    out = io.StringIO()
    call_command("reconcile_prebuilds", *args, stdout=out)
    return out.getvalue()


@pytest.mark.django_db
def test_it_prints_the_dry_run_document():
    preset = PresetFactory(desired_instances=3)
    running = prebuild(preset)
    template = preset.template_version.template

    document = json.loads(run("--dry-run", "--json"))

    assert set(document) == {"paused", "lock_acquired", "presets"}
    assert (document["paused"], document["lock_acquired"]) == (False, True)
    [entry] = document["presets"]
    assert set(entry) == PRESET_KEYS
    assert entry == {
        "preset_id": str(preset.id),
        "template_id": str(template.id),
        "template_version_id": str(preset.template_version_id),
        "preset": preset.name,
        "template": template.name,
        "template_version": preset.template_version.name,
        "organization": template.organization.name,
        "active": True,
        "status": "healthy",
        "state": {
            "actual": 1,
            "desired": 3,
            "eligible": 1,
            "expired": 0,
            "extraneous": 0,
            "starting": 0,
            "stopping": 0,
            "deleting": 0,
            "unhealthy": 0,
        },
        "actions": [{"type": "create", "count": 2, "reason": "below_desired"}],
        "failures": {"template": 0, "infrastructure": 0},
        "last_failure": None,
        "sizing": None,
        "claims": {
            "window_seconds": 3600,
            "hits": 0,
            "misses": dict.fromkeys(MissReason.values, 0),
        },
    }
    assert set(entry["state"]) == STATE_KEYS
    assert list(Workspace.objects.filter(owner_id=SYSTEM_USER_ID)) == [running]


@pytest.mark.django_db
def test_it_runs_one_pass_and_prints_a_summary():
    preset = PresetFactory(desired_instances=2)

    output = run()

    assert "pass: 1 presets, 2 actions taken, 0 errors" in output
    assert preset.name in output and "create 2" in output
    assert Workspace.objects.filter(owner_id=SYSTEM_USER_ID).count() == 2


@pytest.mark.parametrize("value", ["0", "-1", "abc", "nan", "inf"])
def test_it_refuses_a_bad_interval_naming_the_option(value):
    with pytest.raises(CommandError, match="--interval"):
        call_command("reconcile_prebuilds", "--loop", "--interval", value)


@pytest.mark.django_db(transaction=True)
def test_the_loop_runs_passes_and_exits_cleanly_on_sigterm():
    PresetFactory(desired_instances=1)
    process = subprocess.Popen(
        [
            sys.executable,
            "manage.py",
            "reconcile_prebuilds",
            "--loop",
            "--interval",
            "0.2",
            "--json",
        ],
        cwd=ROOT,
        env=process_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while ReconciliationPass.objects.count() < 3:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the loop did not run three passes"
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert process.returncode == 0, stderr
    documents = [json.loads(line) for line in stdout.splitlines()]
    assert len(documents) >= 3
    assert documents[0]["presets"][0]["actions"] == [
        {"type": "create", "count": 1, "reason": "below_desired"}
    ]
    assert documents[-1]["presets"][0]["actions"] == []  # the pool was filled once
    assert Workspace.objects.filter(owner_id=SYSTEM_USER_ID).count() == 1
    assert "stopped" in stderr


@pytest.mark.django_db
def test_the_document_counts_the_last_hours_claims_by_reason():
    preset = PresetFactory(desired_instances=1)
    prebuild(preset)
    workspace_request(user=UserFactory(), name="hit", preset=preset)
    workspace_request(user=UserFactory(), name="miss", preset=preset)  # pool_empty now
    old = workspace_request(user=UserFactory(), name="old", preset=preset)
    PrebuildClaim.objects.filter(user=old.owner).update(
        requested_at=timezone.now() - timedelta(hours=2)
    )  # out of the window
    PrebuildsSettings.objects.create(reconciliation_paused=True)
    workspace_request(user=UserFactory(), name="paused", preset=preset)

    [entry] = json.loads(run("--dry-run", "--json"))["presets"]

    misses = dict.fromkeys(MissReason.values, 0)
    misses.update(pool_empty=1, reconciliation_paused=1)
    assert entry["claims"] == {"window_seconds": 3600, "hits": 1, "misses": misses}
