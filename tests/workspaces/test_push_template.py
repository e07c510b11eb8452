"""``push_template`` and ``template_push``: versions, presets, activation, races, refusals."""

from __future__ import annotations

import io
import json
import threading
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from django.conf import settings as django_settings
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection

from accounts.services import organization_default
from config import env
from prebuilds.push_plan import fill_waves
from tests.accounts.factories import OrganizationFactory, UserFactory
from tests.workspaces.factories import TemplateFactory, prebuild
from workspaces.models import (
    JobStatus,
    PresetSchedule,
    ProvisionerJob,
    Template,
    TemplateVersion,
    TemplateVersionPreset,
    Workspace,
    WorkspaceAgent,
    WorkspaceBuild,
)
from workspaces.template_files import parse_template
from workspaces.template_services import template_push

pytestmark = pytest.mark.django_db

REPOSITORY = Path(__file__).resolve().parent.parent.parent
EXAMPLES = REPOSITORY / "examples" / "templates"

TEMPLATE = '''
name = "python-dev"
display_name = "Python development"
provisioner = "local"

[[parameters]]
name = "repo"
default = "https://example.invalid/repo.git"
description = "Repository"

[[agents]]
name = "main"
startup_script = """
echo "hello $WORKSPACE_OWNER"
"""

[[presets]]
name = "standard"
parameters = { repo = "https://example.invalid/repo.git" }
  [presets.prebuilds]
  instances = 3
  ttl_seconds = 28800
  timezone = "Europe/Berlin"
  [[presets.prebuilds.schedule]]
  cron = "* 8-18 * * 1-5"
  instances = 5
  [[presets.prebuilds.schedule]]
  cron = "* 8-18 * * 6"
  instances = 1

[[presets]]
name = "cold"
'''


def write(tmp_path: Path, text: str = TEMPLATE, name: str = "template.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def push(*args: str) -> tuple[str, str]:
    """Run the command; return (stdout, stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    call_command("push_template", *args, stdout=stdout, stderr=stderr)
    return stdout.getvalue(), stderr.getvalue()


def row_counts() -> tuple[int, int, int, int]:
    return (
        Template.objects.count(),
        TemplateVersion.objects.count(),
        TemplateVersionPreset.objects.count(),
        PresetSchedule.objects.count(),
    )


def refused(*args: str) -> str:
    """Run the command expecting a refusal that writes nothing; return the error message."""
    before = row_counts()
    with pytest.raises(CommandError) as info:
        push(*args)
    assert row_counts() == before
    return str(info.value)


def test_it_creates_the_template_version_presets_and_schedules(tmp_path):
    path = write(tmp_path)

    stdout, stderr = push(str(path))

    # Only the version id, so scripts can capture it.
    assert stdout == f"{TemplateVersion.objects.get().id}\n"
    assert uuid.UUID(stdout.strip())
    assert stderr == ""
    template = Template.objects.get()
    version = TemplateVersion.objects.get()
    assert template.organization == organization_default()
    assert template.name == "python-dev"
    assert template.display_name == "Python development"
    assert template.active_version == version
    assert (version.template, version.number, version.name) == (template, 1, "v1")
    assert version.provisioner == "local"
    assert version.provisioner_config == {}
    assert version.parameters == [
        {
            "name": "repo",
            "default": "https://example.invalid/repo.git",
            "description": "Repository",
        }
    ]
    assert version.agents == [{"name": "main", "startup_script": 'echo "hello $WORKSPACE_OWNER"\n'}]
    assert version.source == TEMPLATE
    assert version.created_by is None

    standard = version.presets.get(name="standard")
    assert standard.parameters == {"repo": "https://example.invalid/repo.git"}
    assert standard.desired_instances == 3
    assert standard.invalidate_after == timedelta(hours=8)
    assert standard.scheduling_timezone == "Europe/Berlin"
    assert list(standard.schedules.values_list("position", "cron", "instances")) == [
        (0, "* 8-18 * * 1-5", 5),
        (1, "* 8-18 * * 6", 1),
    ]
    cold = version.presets.get(name="cold")
    assert cold.parameters == {}
    assert cold.desired_instances is None
    assert cold.invalidate_after is None
    assert cold.scheduling_timezone == ""
    assert not cold.schedules.exists()


def test_a_second_push_creates_v2_and_activates_it(tmp_path):
    push(str(write(tmp_path)))
    changed = TEMPLATE.replace("Python development", "Python (v2)").replace(
        "instances = 3", "instances = 4"
    )

    stdout, _ = push(str(write(tmp_path, changed)))

    template = Template.objects.get()
    v1, v2 = template.versions.order_by("number")
    assert str(v2.id) == stdout.strip()
    assert (v2.number, v2.name) == (2, "v2")
    assert template.active_version == v2
    assert template.display_name == "Python (v2)"
    assert v2.presets.get(name="standard").desired_instances == 4
    # The old version keeps its own presets: versions are immutable.
    assert v1.presets.get(name="standard").desired_instances == 3
    assert v1.source == TEMPLATE


def test_it_leaves_the_active_version_with_no_activate(tmp_path):
    push(str(write(tmp_path)))
    v1 = TemplateVersion.objects.get()

    stdout, _ = push(str(write(tmp_path)), "--no-activate")

    template = Template.objects.get()
    v2 = TemplateVersion.objects.get(number=2)
    assert str(v2.id) == stdout.strip()
    assert template.active_version == v1


def test_a_new_template_pushed_with_no_activate_has_no_active_version(tmp_path):
    push(str(write(tmp_path)), "--no-activate")

    assert Template.objects.get().active_version is None
    assert TemplateVersion.objects.count() == 1


def test_it_pushes_into_another_organization(tmp_path):
    other = OrganizationFactory(slug="acme")
    path = write(tmp_path)
    push(str(path))

    stdout, _ = push(str(path), "--organization", "acme")

    version = TemplateVersion.objects.get(id=stdout.strip())
    assert version.template.organization == other
    # A separate template of the same name, numbered from 1.
    assert version.number == 1
    assert Template.objects.filter(name="python-dev").count() == 2


def test_it_refuses_an_unknown_organization(tmp_path):
    message = refused(str(write(tmp_path)), "--organization", "nope")

    assert "--organization: no organization with slug 'nope'" in message


def test_it_refuses_a_bad_file_listing_every_problem_and_writes_nothing(tmp_path):
    push(str(write(tmp_path)))  # existing rows must stay exactly as they are too
    bad = TEMPLATE.replace("  instances = 3", "  instance = 3").replace(
        'cron = "* 8-18 * * 6"', 'cron = "0 8 * * 6"'
    )

    message = refused(str(write(tmp_path, bad)), "--organization", "nope")

    assert message.startswith(f"{tmp_path / 'template.toml'}: not pushed, 4 problems:\n")
    assert "presets[0].prebuilds.instance: unknown key" in message
    assert "presets[0].prebuilds.instances: required" in message
    assert "presets[0].prebuilds.schedule[1].cron: minute field must be '*'" in message
    assert "--organization: no organization with slug 'nope'" in message
    assert Template.objects.get().active_version.number == 1


def test_it_refuses_an_unreadable_file(tmp_path):
    message = refused(str(tmp_path / "missing.toml"))

    assert "missing.toml: cannot read the file: No such file or directory" in message


def test_it_refuses_invalid_toml_naming_line_and_column(tmp_path):
    message = refused(str(write(tmp_path, 'name = "x"\nprovisioner = "local\n')))

    assert "invalid TOML:" in message
    assert "(at line 2, column 21)" in message


def test_it_refuses_wrong_types_without_a_traceback(tmp_path):
    text = 'name = "x"\nprovisioner = "local"\nagents = "x"\npresets = 3\n'

    message = refused(str(write(tmp_path, text)))

    assert 'agents: must be an array of tables, written [[agents]] (got "x")' in message
    assert "presets: must be an array of tables, written [[presets]] (got 3)" in message


def test_it_stores_a_ttl_of_zero_as_no_ttl(tmp_path):
    push(str(write(tmp_path, TEMPLATE.replace("ttl_seconds = 28800", "ttl_seconds = 0"))))

    assert TemplateVersionPreset.objects.get(name="standard").invalidate_after is None


def test_it_creates_a_new_template_when_the_old_one_is_deleted(tmp_path):
    old = TemplateFactory(name="python-dev", deleted=True)

    push(str(write(tmp_path)))

    template = Template.objects.get(deleted=False)
    assert template != old
    assert template.active_version.number == 1
    assert old.versions.count() == 1


def test_it_adds_versions_to_a_template_created_elsewhere(tmp_path):
    existing = TemplateFactory(name="python-dev")  # with an active version
    previous = existing.active_version.number

    stdout, _ = push(str(write(tmp_path)))

    existing.refresh_from_db()
    assert existing.active_version_id == uuid.UUID(stdout.strip())
    assert existing.active_version.number == previous + 1


def test_the_example_files_push(tmp_path):
    ids = {}
    for name in ("demo", "failing", "command"):
        stdout, _ = push(str(EXAMPLES / f"{name}.toml"))
        ids[name] = stdout.strip()

    demo = TemplateVersion.objects.get(id=ids["demo"])
    assert demo.template.name == "demo"
    assert demo.provisioner == "local"
    assert [agent["name"] for agent in demo.agents] == ["main"]
    assert [p["name"] for p in demo.parameters] == ["repo"]
    presets = {p.name: p.desired_instances for p in demo.presets.all()}
    assert presets == {"standard": 2, "large": None}

    failing = TemplateVersion.objects.get(id=ids["failing"])
    assert "exit 1" in failing.agents[0]["startup_script"]
    assert [p.desired_instances for p in failing.presets.all()] == [1]

    command = TemplateVersion.objects.get(id=ids["command"])
    assert command.provisioner == "command"
    program = Path(command.provisioner_config["command"][0])
    # Resolved against the template file's directory when pushed.
    assert program == REPOSITORY / "examples" / "provisioners" / "dir_provisioner.py"
    assert program.is_file()


def test_template_push_records_the_creator():
    user = UserFactory()
    spec = parse_template(TEMPLATE)

    version = template_push(
        organization=organization_default(), spec=spec, source=TEMPLATE, created_by=user
    )

    assert version.created_by == user


def test_template_push_stores_the_command():
    text = TEMPLATE.replace(
        'provisioner = "local"', 'provisioner = "command"\ncommand = ["tf", "apply"]'
    )

    version = template_push(
        organization=organization_default(), spec=parse_template(text), source=text
    )

    assert version.provisioner_config == {"command": ["tf", "apply"]}


def _push_concurrently(count: int, text: str = TEMPLATE) -> list[str]:
    """Push ``text`` from ``count`` threads at once; return the outcomes."""
    organization = organization_default()
    spec = parse_template(text)
    barrier = threading.Barrier(count)
    outcomes: list[str] = []

    def attempt():
        try:
            barrier.wait()
            template_push(organization=organization, spec=spec, source=text)
            outcomes.append("ok")
        except Exception as exc:  # the assertion below shows what went wrong
            outcomes.append(repr(exc))
        finally:
            connection.close()

    threads = [threading.Thread(target=attempt) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


@pytest.mark.django_db(transaction=True)
def test_concurrent_first_pushes_create_one_template_with_distinct_versions():
    outcomes = _push_concurrently(6)

    assert outcomes == ["ok"] * 6
    template = Template.objects.get()
    numbers = sorted(template.versions.values_list("number", flat=True))
    assert numbers == [1, 2, 3, 4, 5, 6]
    assert template.active_version is not None


@pytest.mark.django_db(transaction=True)
def test_concurrent_pushes_of_an_existing_template_get_distinct_versions():
    template_push(organization=organization_default(), spec=parse_template(TEMPLATE), source="")

    outcomes = _push_concurrently(6)

    assert outcomes == ["ok"] * 6
    numbers = sorted(Template.objects.get().versions.values_list("number", flat=True))
    assert numbers == [1, 2, 3, 4, 5, 6, 7]


# --- bounds (PREBUILDS_MAX_INSTANCES_PER_PRESET / _PER_ORGANIZATION) ---------------------------


def test_it_refuses_oversized_instances_naming_each_field_and_writes_nothing(tmp_path):
    push(str(write(tmp_path)))  # the template and its active version stay as they are
    oversized = TEMPLATE.replace("instances = 3", "instances = 1000000000").replace(
        "instances = 5", "instances = 101"
    )

    message = refused(str(write(tmp_path, oversized)))

    assert message.endswith(
        "not pushed, 2 problems:\n"
        "  presets[0].prebuilds.instances: 1000000000 is above the maximum of 100 "
        "(PREBUILDS_MAX_INSTANCES_PER_PRESET)\n"
        "  presets[0].prebuilds.schedule[0].instances: 101 is above the maximum of 100 "
        "(PREBUILDS_MAX_INSTANCES_PER_PRESET)"
    )
    assert Template.objects.get().active_version.number == 1


def test_the_per_preset_maximum_holds_without_activation_too(tmp_path):
    oversized = TEMPLATE.replace("instances = 3", "instances = 1000000000")

    message = refused(str(write(tmp_path, oversized)), "--no-activate")

    assert "presets[0].prebuilds.instances: 1000000000 is above the maximum of 100" in message


def test_it_refuses_a_push_raising_the_organization_total_above_its_maximum(tmp_path, settings):
    settings.PREBUILDS_MAX_INSTANCES_PER_ORGANIZATION = 12
    other = TEMPLATE.replace('name = "python-dev"', 'name = "other"')
    push(str(write(tmp_path, other, "other.toml")))  # peak 5 (its weekday schedule)
    push(str(write(tmp_path)))  # 5 + 5 = 10
    bigger = TEMPLATE.replace("instances = 5", "instances = 8")

    message = refused(str(write(tmp_path, bigger)))

    assert message.endswith(
        "  presets: the organization's prebuilt instances would total 13 (now 10), above the "
        "maximum of 12 (PREBUILDS_MAX_INSTANCES_PER_ORGANIZATION)"
    )
    # The new version replaces the active one's count (not added to it): 5 + 7 fits.
    push(str(write(tmp_path, TEMPLATE.replace("instances = 5", "instances = 7"))))
    # Without activation the version counts for nothing yet, so it is stored.
    push(str(write(tmp_path, bigger)), "--no-activate")
    assert Template.objects.get(name="python-dev").active_version.number == 2


def test_template_push_itself_refuses_oversized_instances():
    # The service enforces the bounds, whoever calls it (the command, the benchmarks, an API).
    from workspaces.pool_limits import PoolSizeError

    spec = parse_template(TEMPLATE.replace("instances = 3", "instances = 1000000000"))
    before = row_counts()

    with pytest.raises(PoolSizeError):
        template_push(organization=organization_default(), spec=spec, source="")

    assert row_counts() == before


def test_it_stores_a_sizing_goal(tmp_path):
    text = TEMPLATE.replace(
        "instances = 3\n",
        "instances = 3\ntarget_hit_rate = 0.95\nmin_instances = 1\nmax_instances = 12\n"
        "cost_per_hour = 0.12\n",
        1,
    )
    assert text != TEMPLATE
    push(str(write(tmp_path, text)))

    standard = TemplateVersionPreset.objects.get(name="standard")
    assert (standard.target_hit_rate, standard.min_instances, standard.max_instances) == (
        0.95,
        1,
        12,
    )
    assert (standard.desired_instances, standard.cost_per_hour) == (3, 0.12)
    cold = TemplateVersionPreset.objects.get(name="cold")
    assert (cold.target_hit_rate, cold.min_instances, cold.max_instances) == (None, 0, None)


def test_it_refuses_a_max_instances_above_the_per_preset_maximum(tmp_path, settings):
    settings.PREBUILDS_MAX_INSTANCES_PER_PRESET = 10
    text = TEMPLATE.replace(
        "instances = 3\n", "instances = 3\ntarget_hit_rate = 0.95\nmax_instances = 11\n", 1
    )
    message = refused(str(write(tmp_path, text)))
    assert "presets[0].prebuilds.max_instances: 11 is above the maximum of 10" in message
    assert row_counts() == (0, 0, 0, 0)


# ---------------------------------------------------------------------------------------------
# --plan: what activating the file would do, computed without changing anything

PLANNED = """
name = "planned"
provisioner = "local"

[[agents]]
name = "main"
startup_script = "true"

[[presets]]
name = "standard"
  [presets.prebuilds]
  instances = 2

[[presets]]
name = "big"
  [presets.prebuilds]
  instances = 3

[[presets]]
name = "cold"
"""


def every_row_count() -> dict[str, int]:
    """Every table a push or a reconciler pass writes, and the presets' stored status."""
    return {
        "templates": Template.objects.count(),
        "versions": TemplateVersion.objects.count(),
        "presets": TemplateVersionPreset.objects.count(),
        "schedules": PresetSchedule.objects.count(),
        "workspaces": Workspace.objects.count(),
        "builds": WorkspaceBuild.objects.count(),
        "jobs": ProvisionerJob.objects.count(),
        "agents": WorkspaceAgent.objects.count(),
        "active": list(Template.objects.values_list("name", "active_version__name")),
    }


def broker_queues() -> dict[bytes, int]:
    """The length of every list (Celery queue) on the real broker of this run."""
    client = redis.Redis.from_url(env.redis_url_of_broker(django_settings.CELERY_BROKER_URL))
    try:
        return {key: client.llen(key) for key in client.keys("*") if client.type(key) == b"list"}
    finally:
        client.close()


def planned(django_capture_on_commit_callbacks, *args: str) -> str:
    """Run ``push_template --plan``; assert it wrote nothing and queued nothing; its stdout."""
    before, queued = every_row_count(), broker_queues()
    with django_capture_on_commit_callbacks() as callbacks:
        stdout, stderr = push(*args, "--plan")
    # Every build and refill is sent to the broker from an on_commit hook: none means none sent.
    assert callbacks == []
    assert broker_queues() == queued
    assert every_row_count() == before
    assert stderr == ""
    return stdout


def with_build_seconds(workspace: Workspace, seconds: float) -> None:
    """Make the prebuild's start build have taken ``seconds``."""
    job = ProvisionerJob.objects.get(build__workspace=workspace)
    job.started_at = job.completed_at - timedelta(seconds=seconds)
    job.save(update_fields=["started_at"])


def test_plan_of_a_new_version_deletes_the_old_pools_and_fills_the_new(
    tmp_path, settings, django_capture_on_commit_callbacks
):
    settings.PREBUILDS_MAX_IN_FLIGHT_PER_PRESET = 2
    settings.PREBUILDS_MAX_IN_FLIGHT = 10
    push(str(write(tmp_path, PLANNED)))
    v1 = TemplateVersion.objects.get()
    standard = v1.presets.get(name="standard")
    # Two running prebuilds of "standard" with recorded builds of 60 s and 300 s ...
    with_build_seconds(prebuild(standard), 60)
    with_build_seconds(prebuild(standard), 300)
    # ... and one whose first build is still pending (canceled, not deleted).
    prebuild(standard, status=JobStatus.PENDING)
    bigger = PLANNED.replace("instances = 3", "instances = 5")

    stdout = planned(django_capture_on_commit_callbacks, str(write(tmp_path, bigger)))

    # p90 of (60, 300) is 300 s. "big" wants 5 with 2 builds in flight at once: waves of 2, 2, 1.
    assert stdout == (
        "template planned: v1 -> v2\n"
        "prebuild build time: p90 5.0 min over 2 recent builds\n"
        "  big: delete 0, create 5; cold builds for ~5.0 min, full after ~15.0 min\n"
        "  standard: delete 2, cancel 1 pending, create 2; cold builds for ~5.0 min,"
        " full after ~5.0 min\n"
    )
    # Nothing changed: a real push still makes v2 (not v3), and the plan said what it does.
    real, _ = push(str(write(tmp_path, bigger)))
    assert TemplateVersion.objects.get(id=real.strip()).name == "v2"


def test_plan_json_lists_every_pool(tmp_path, settings, django_capture_on_commit_callbacks):
    settings.PREBUILDS_MAX_IN_FLIGHT_PER_PRESET = 5
    settings.PREBUILDS_MAX_IN_FLIGHT = 4  # the deployment's cap is the narrower one here
    push(str(write(tmp_path, PLANNED)))
    standard = TemplateVersion.objects.get().presets.get(name="standard")
    with_build_seconds(prebuild(standard), 120)
    # The new file drops "standard": its pool is only deleted.
    without = PLANNED.replace('name = "standard"', 'name = "renamed"')

    stdout = planned(django_capture_on_commit_callbacks, str(write(tmp_path, without)), "--json")

    assert json.loads(stdout) == {
        "template": "planned",
        "new_template": False,
        "current_version": "v1",
        "new_version": "v2",
        "activates": True,
        "paused": False,
        "build_p90_seconds": 120.0,
        "build_samples": 1,
        "pools": [
            # 5 wanted under a cap of 4: "big" (3) and "renamed" (2) share two waves; both
            # empty pools get their first build in wave 1.
            {
                "preset": "big",
                "deleted": 0,
                "canceled": 0,
                "created": 3,
                "cold_window_seconds": 120.0,
                "full_seconds": 240.0,
            },
            {
                "preset": "renamed",
                "deleted": 0,
                "canceled": 0,
                "created": 2,
                "cold_window_seconds": 120.0,
                "full_seconds": 120.0,
            },
            {
                "preset": "standard",
                "deleted": 1,
                "canceled": 0,
                "created": 0,
                "cold_window_seconds": None,
                "full_seconds": None,
            },
        ],
    }


def test_plan_of_a_new_template_only_creates(tmp_path, django_capture_on_commit_callbacks):
    stdout = planned(django_capture_on_commit_callbacks, str(write(tmp_path, PLANNED)))

    assert stdout == (
        "template planned: none (new template) -> v1\n"
        "prebuild build time: unknown (no recorded builds)\n"
        "  big: delete 0, create 3; cold builds: unknown (no recorded builds)\n"
        "  standard: delete 0, create 2; cold builds: unknown (no recorded builds)\n"
    )
    assert Template.objects.count() == 0


def test_plan_with_no_activate_changes_no_pool(tmp_path, django_capture_on_commit_callbacks):
    push(str(write(tmp_path, PLANNED)))
    prebuild(TemplateVersion.objects.get().presets.get(name="standard"))

    stdout = planned(
        django_capture_on_commit_callbacks, str(write(tmp_path, PLANNED)), "--no-activate"
    )

    assert stdout == (
        "template planned: v1 -> v2 (not activated)\n"
        "no pool changes: --no-activate keeps the active version\n"
    )


def test_plan_refuses_an_over_limit_file_like_the_push(tmp_path):
    push(str(write(tmp_path)))
    oversized = TEMPLATE.replace("instances = 3", "instances = 1000000000")
    path = str(write(tmp_path, oversized))

    assert refused(path, "--plan") == refused(path)
    assert "presets[0].prebuilds.instances: 1000000000 is above the maximum of 100" in refused(
        path, "--plan", "--json"
    )


def test_plan_refuses_an_invalid_file_like_the_push(tmp_path):
    path = str(write(tmp_path, 'name = "x"\nprovisioner = "nope"\n'))

    assert refused(path, "--plan") == refused(path)


def test_json_without_plan_is_refused(tmp_path):
    message = refused(str(write(tmp_path, PLANNED)), "--json")

    assert "--json: only with --plan" in message


@pytest.mark.parametrize(
    ("wanted", "limit", "per_preset", "expected"),
    [
        ({"a": 5}, 0, 2, {"a": (1, 3)}),  # per-preset cap only
        ({"a": 5}, 0, 0, {"a": (1, 1)}),  # no caps: everything at once
        ({"a": 1, "b": 1, "c": 1}, 2, 0, {"a": (1, 1), "b": (1, 1), "c": (2, 2)}),
        ({"a": 12, "b": 3}, 10, 5, {"a": (1, 3), "b": (1, 1)}),
        ({"a": 0, "b": 2}, 10, 5, {"b": (1, 1)}),  # wanting nothing: no waves
    ],
)
def test_fill_waves_follow_the_in_flight_caps(settings, wanted, limit, per_preset, expected):
    settings.PREBUILDS_MAX_IN_FLIGHT = limit
    settings.PREBUILDS_MAX_IN_FLIGHT_PER_PRESET = per_preset

    assert fill_waves(wanted) == expected
