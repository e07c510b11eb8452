"""`manage.py simulate_prebuilds`: the backtest command on files and on recorded demand."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from django.core.management import call_command
from django.core.management.base import CommandError

from prebuilds.models import PrebuildClaim
from tests.accounts.factories import UserFactory
from tests.workspaces.factories import PresetFactory, prebuild
from workspaces.models import ProvisionerJob

pytestmark = pytest.mark.django_db


def run(*args: str) -> str:
    out = io.StringIO()
    call_command("simulate_prebuilds", *args, stdout=out)
    return out.getvalue()


def refused(*args: str) -> CommandError:
    with pytest.raises(CommandError) as info:
        run(*args)
    return info.value


@pytest.fixture
def files(tmp_path):
    demand = tmp_path / "demand.csv"
    demand.write_text(
        "requested_at,preset\n"
        "2026-11-30T10:00:05+00:00,standard\n"
        "2026-11-30T11:00:50+01:00,standard\n"  # 10:00:50 UTC
        "2026-11-30T10:05:00Z,standard\n"
    )
    builds = tmp_path / "builds.txt"
    builds.write_text("100\n")
    return demand, builds


def test_it_replays_a_demand_file_as_computed_by_hand(files):
    demand, builds = files
    # The window: the hour of the last request, 10:00-11:00 UTC (--days 1/24). Pool of 1 full at
    # 10:00; 10:00:05 hit; pass at :10 starts a build (ready :01:50); 10:00:50 misses and waits
    # 100 s; 10:05:00 hits; pass at 10:05:10 starts a build, ready 10:06:50 and idle to 11:00.
    # Idle: 5 s + 190 s + 3190 s = 3385 s.
    document = json.loads(
        run(
            "--demand",
            str(demand),
            "--build-seconds-file",
            str(builds),
            "--days",
            str(1 / 24),
            "--interval",
            "10",
            "--policy",
            "fixed:1",
            "--json",
        )
    )
    assert document["preset"] == "standard"
    assert document["requests"] == 3
    assert document["start"] == "2026-11-30T10:00:00+00:00"
    assert document["policies"] == [
        {
            "policy": "fixed:1",
            "requests": 3,
            "hit_rate": round(2 / 3, 4),
            "misses": 1,
            "wait_p95_s": 100.0,
            "idle_prebuild_hours": round(3385 / 3600, 2),
            "builds": 2,
        }
    ]


def test_it_compares_several_policies_and_prints_a_table(files):
    demand, builds = files
    output = run(
        "--demand",
        str(demand),
        "--build-seconds-file",
        str(builds),
        "--days",
        "1",
        "--policy",
        "fixed:0",
        "--policy",
        "fixed:2",
        "--policy",
        "target:0.9",
    )
    lines = output.splitlines()
    assert lines[0].startswith("standard: 3 requests from")
    assert [line.split()[0] for line in lines[2:]] == ["fixed:0", "fixed:2", "target:0.9"]
    assert lines[2].split()[1:3] == ["0.000", "3"]  # no pool: every request misses


def test_policies_may_follow_one_option(files):
    demand, builds = files
    common = ("--demand", str(demand), "--build-seconds-file", str(builds), "--json")
    one = json.loads(run(*common, "--policy", "fixed:1", "target:0.9"))
    two = json.loads(run(*common, "--policy", "fixed:1", "--policy", "target:0.9"))
    assert [p["policy"] for p in one["policies"]] == ["fixed:1", "target:0.9"]
    assert one == two


def _recorded_preset():
    preset = PresetFactory(desired_instances=2, target_hit_rate=0.9, max_instances=10)
    preset.schedules.create(position=0, cron="* 9-17 * * 1-5", instances=3)
    preset.scheduling_timezone = "UTC"
    preset.save()
    for seconds in (60, 120, 600):
        job_id = prebuild(preset).builds.get().job_id
        done = datetime.now(UTC) - timedelta(days=1)
        ProvisionerJob.objects.filter(id=job_id).update(
            started_at=done - timedelta(seconds=seconds), completed_at=done
        )
    user = UserFactory()
    now = datetime.now(UTC)
    PrebuildClaim.objects.bulk_create(
        PrebuildClaim(
            preset=preset, user=user, claimed=True, requested_at=now - timedelta(minutes=37 * n)
        )
        for n in range(1, 200)
    )
    return preset


def test_it_replays_recorded_demand_with_the_presets_policies_deterministically():
    preset = _recorded_preset()

    args = ("--preset", str(preset.id), "--days", "3", "--seed", "4", "--json")
    # The window ends at the command's `now`: frozen, so both runs replay the same window.
    with time_machine.travel(datetime.now(UTC), tick=False):
        first = json.loads(run(*args))
        again = json.loads(run(*args))

    assert [p["policy"] for p in first["policies"]] == ["fixed:2", "schedule", "target:0.9"]
    assert first["build_samples"] == 3
    # Requests every 37 minutes over the last 3 days (the rest is history).
    assert first["requests"] == len(range(1, 3 * 24 * 60 // 37 + 1))
    assert first == again
    for report in first["policies"]:
        assert report["misses"] == round(report["requests"] * (1 - report["hit_rate"]))


@pytest.mark.parametrize(
    ("args", "option"),
    [
        ([], "--preset"),
        (["--preset", "not-a-uuid"], "--preset"),
        (["--preset", "00000000-0000-0000-0000-000000000000"], "--preset"),
        (["--demand", "/nonexistent/demand.csv"], "--demand"),
        (["--days", "0"], "--days"),
        (["--days", "x"], "--days"),
        (["--seed", "-1"], "--seed"),
        (["--interval", "0"], "--interval"),
    ],
)
def test_it_refuses_bad_options_naming_them(args, option):
    assert option in str(refused(*args))


@pytest.mark.parametrize(
    ("demand", "builds", "extra", "message"),
    [
        (
            "when,preset\n2026-11-30T10:00:00+00:00,a\n",
            "100\n",
            [],
            "--demand: the header must name the columns requested_at and preset (missing: "
            "requested_at)",
        ),
        (
            "requested_at,preset\n2026-11-30T10:00:00,a\n",
            "100\n",
            [],
            "--demand: line 2: requested_at needs an offset",
        ),
        (
            "requested_at,preset\nyesterday,a\n",
            "100\n",
            [],
            "--demand: line 2: requested_at must be ISO 8601",
        ),
        (
            "requested_at,preset\n2026-11-30T10:00:00Z,a\n2026-11-30T10:00:00Z,b\n",
            "100\n",
            [],
            "--preset: the demand file has several presets (a, b); choose one",
        ),
        (
            "requested_at,preset\n2026-11-30T10:00:00Z,a\n",
            "100\n-5\n",
            [],
            "--build-seconds-file: line 2: must be a positive number of seconds (got '-5')",
        ),
        (
            "requested_at,preset\n2026-11-30T10:00:00Z,a\n",
            "100\n",
            ["--policy", "fixed:x"],
            "--policy: fixed needs a whole number",
        ),
        (
            "requested_at,preset\n2026-11-30T10:00:00Z,a\n",
            "100\n",
            ["--policy", "schedule"],
            "--policy: schedule needs --preset",
        ),
    ],
)
def test_it_refuses_bad_files_naming_the_option(tmp_path, demand, builds, extra, message):
    (tmp_path / "d.csv").write_text(demand)
    (tmp_path / "b.txt").write_text(builds)
    error = refused(
        "--demand", str(tmp_path / "d.csv"), "--build-seconds-file", str(tmp_path / "b.txt"), *extra
    )
    assert message in str(error)
    assert error.returncode == 2


def test_without_recorded_builds_it_asks_for_a_file():
    preset = PresetFactory(desired_instances=1)
    assert "--build-seconds-file: no recorded prebuild build durations" in str(
        refused("--preset", str(preset.id))
    )
