"""Operator pages: overview (with its live poll), preset detail, controls, staff workspace pages."""

from __future__ import annotations

import re
import uuid
from datetime import timedelta

import pytest
import time_machine
from django.utils import timezone

from accounts.models import SYSTEM_USER_ID
from prebuilds import dashboard
from prebuilds.models import AuditAction, AuditEntry, PrebuildClaim, ReconciliationPass
from prebuilds.selectors import reconciliation_paused
from prebuilds.services import reconciliation_pause
from tests.accounts.factories import OrganizationFactory, UserFactory
from tests.workspaces.factories import (
    BuildFactory,
    PresetFactory,
    TemplateFactory,
    WorkspaceFactory,
    prebuild,
)
from workspaces.models import (
    AgentLifecycle,
    JobStatus,
    ProvisionerJob,
    TemplateVersionPreset,
    Transition,
    WorkspaceAgent,
    WorkspaceBuild,
)

pytestmark = pytest.mark.django_db

HX = {"HX-Request": "true"}
UNKNOWN = uuid.UUID("00000000-0000-4000-8000-000000000000")
# Queries a page or fragment may cost, the same at 10 presets and at 300: session and user (2),
# whether a pass holds the lock (1), the dry-run snapshot (5), workspace names, last pass, audit
# list (3); the preset page adds the preset, its prebuilds with builds and agents (3), chart,
# claims, misses by reason (issue 17), failures.
OVERVIEW_QUERIES = 11
PRESET_QUERIES = 18
STAFF_PAGE_QUERIES = {"/prebuilds/workspaces/": 8, "/prebuilds/jobs/": 4}


@pytest.fixture
def staff():
    return UserFactory(username="dana", is_staff=True)


@pytest.fixture
def staff_client(client, staff):
    client.force_login(staff)
    return client


@pytest.fixture
def member_client(client):
    client.force_login(UserFactory(username="mo"))
    return client


@pytest.fixture
def preset():
    template = TemplateFactory(name="python-dev")
    return PresetFactory(template_version=template.active_version, name="standard")


def body_of(response) -> str:
    return response.content.decode()


def pages(preset_id, workspace_id) -> list[str]:
    return [
        "/prebuilds/",
        f"/prebuilds/presets/{preset_id}/",
        f"/prebuilds/presets/{preset_id}/confirm/invalidate",
        f"/prebuilds/workspaces/{workspace_id}/delete/confirm",
        "/prebuilds/workspaces/",
        "/prebuilds/jobs/",
    ]


def controls(preset_id, workspace_id) -> list[tuple[str, dict]]:
    return [
        ("/prebuilds/pause", {"paused": "true"}),
        ("/prebuilds/reconcile", {}),
        (f"/prebuilds/presets/{preset_id}/desired-instances", {"instances": "4"}),
        (f"/prebuilds/presets/{preset_id}/invalidate", {}),
        (f"/prebuilds/presets/{preset_id}/reset", {}),
        (f"/prebuilds/presets/{preset_id}/cancel-pending", {}),
        (f"/prebuilds/workspaces/{workspace_id}/delete", {}),
    ]


# -- access ---------------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(6))
def test_it_serves_every_page_to_staff(staff_client, preset, index):
    workspace = prebuild(preset)

    response = staff_client.get(pages(preset.id, workspace.id)[index])

    assert response.status_code == 200
    assert "<html" in body_of(response)


@pytest.mark.parametrize("index", range(6))
def test_it_sends_anonymous_visitors_to_the_login_page(client, preset, index):
    url = pages(preset.id, prebuild(preset).id)[index]

    response = client.get(url)

    assert response.status_code == 302
    assert response.url == f"/login/?next={url}"


@pytest.mark.parametrize("index", range(6))
def test_it_forbids_pages_to_non_staff(member_client, preset, index):
    response = member_client.get(pages(preset.id, prebuild(preset).id)[index])

    assert response.status_code == 403


@pytest.mark.parametrize("index", range(7))
def test_it_forbids_controls_to_non_staff_and_changes_nothing(member_client, preset, index):
    workspace = prebuild(preset)
    url, data = controls(preset.id, workspace.id)[index]

    response = member_client.post(url, data)

    assert response.status_code == 403
    assert not reconciliation_paused()
    assert TemplateVersionPreset.objects.get(id=preset.id).desired_instances == 1
    assert WorkspaceBuild.objects.filter(transition=Transition.DELETE).count() == 0
    assert AuditEntry.objects.count() == 0


@pytest.mark.parametrize("index", range(7))
def test_it_sends_anonymous_controls_to_the_login_page(client, preset, index):
    url, data = controls(preset.id, prebuild(preset).id)[index]

    response = client.post(url, data)

    assert response.status_code == 302
    assert response.url.startswith("/login/")
    assert AuditEntry.objects.count() == 0


@pytest.mark.parametrize("index", range(7))
def test_it_refuses_get_on_controls(staff_client, preset, index):
    url, _ = controls(preset.id, prebuild(preset).id)[index]

    response = staff_client.get(url)

    assert response.status_code == 405
    assert AuditEntry.objects.count() == 0


@pytest.mark.parametrize(
    "url",
    [
        f"/prebuilds/presets/{UNKNOWN}/",
        f"/prebuilds/presets/{UNKNOWN}/confirm/invalidate",
        f"/prebuilds/workspaces/{UNKNOWN}/delete/confirm",
    ],
)
def test_it_answers_404_for_unknown_ids(staff_client, url):
    assert staff_client.get(url).status_code == 404


def test_it_answers_404_for_an_unknown_confirmation(staff_client, preset):
    assert staff_client.get(f"/prebuilds/presets/{preset.id}/confirm/explode").status_code == 404


@pytest.mark.parametrize("index", range(2, 7))
def test_it_answers_404_to_controls_on_unknown_ids(staff_client, index):
    url, data = controls(UNKNOWN, UNKNOWN)[index]

    assert staff_client.post(url, data).status_code == 404
    assert AuditEntry.objects.count() == 0


def test_it_links_the_operator_pages_from_each_other(staff_client):
    body = body_of(staff_client.get("/prebuilds/"))

    assert 'href="/prebuilds/workspaces/"' in body
    assert 'href="/prebuilds/jobs/"' in body


# -- the overview ---------------------------------------------------------------------------


def test_it_shows_the_empty_state_without_pools(staff_client):
    body = body_of(staff_client.get("/prebuilds/"))

    assert "No preset declares prebuilds yet" in body
    assert "push_template examples/templates/demo.toml" in body


def test_it_groups_presets_by_organization_and_template_with_totals(staff_client):
    acme = OrganizationFactory(name="Acme")
    python = TemplateFactory(organization=acme, name="python-dev")
    small = PresetFactory(template_version=python.active_version, name="small", desired_instances=2)
    large = PresetFactory(template_version=python.active_version, name="large", desired_instances=3)
    prebuild(small)
    prebuild(large)
    prebuild(large, ready=False)

    body = body_of(staff_client.get("/prebuilds/"))

    group = re.search(r'<tr id="template-[^"]+" class="group".*?</tr>', body, re.S).group()
    assert "Acme /" in group and "python-dev" in group
    totals = re.search(r'<tr id="totals-[^"]+".*?</tr>', body, re.S).group()
    assert re.findall(r'<td class="num">(\d+)</td>', totals)[:3] == ["5", "3", "2"]
    assert body.index(f"preset-{large.id}") < body.index(f"preset-{small.id}")  # by name


def cell(body: str, preset_id, column: str) -> str:
    row = re.search(rf'<tr id="preset-{preset_id}".*?</tr>', body, re.S).group()
    return re.search(rf'data-col="{column}">(.*?)</td>', row, re.S).group(1).strip()


def text(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", html)).strip()


def actions(body: str, preset_id) -> list[str]:
    """The pending actions of a preset's row, as the words a person reads."""
    return [
        text(item) for item in re.findall(r"<li[^>]*>(.*?)</li>", cell(body, preset_id, "actions"))
    ]


def test_it_shows_counts_and_pending_actions_in_words(staff_client, preset):
    preset.desired_instances = 3
    preset.save()
    prebuild(preset)
    prebuild(preset, status=JobStatus.PENDING)

    body = body_of(staff_client.get("/prebuilds/"))

    assert cell(body, preset.id, "desired") == "3"
    assert cell(body, preset.id, "actual") == "1"
    assert cell(body, preset.id, "eligible") == "1"
    assert cell(body, preset.id, "starting") == "1"
    assert actions(body, preset.id) == ["create 1"]


def test_it_names_the_expired_prebuilds_it_will_delete(staff_client, preset):
    old = prebuild(preset, created_at=timezone.now() - timedelta(hours=1))
    preset.last_invalidated_at = timezone.now() - timedelta(minutes=1)
    preset.save()

    body = body_of(staff_client.get("/prebuilds/"))

    assert cell(body, preset.id, "expired") == "1"
    assert actions(body, preset.id) == [f"delete 1 expired: {old.name}", "create 1"]


def test_it_names_extraneous_prebuilds(staff_client, preset):
    first = prebuild(preset, created_at=timezone.now() - timedelta(minutes=3))
    second = prebuild(preset, created_at=timezone.now() - timedelta(minutes=2))
    prebuild(preset)
    preset.desired_instances = 1
    preset.save()

    body = body_of(staff_client.get("/prebuilds/"))

    expected = f"delete 2 extraneous: {first.name}, {second.name}"
    assert actions(body, preset.id) == [expected]


def test_it_shows_a_backoff_with_its_end_and_failures(staff_client, preset):
    prebuild(preset, status=JobStatus.FAILED)
    prebuild(preset, status=JobStatus.FAILED)

    body = body_of(staff_client.get("/prebuilds/"))

    row = re.search(rf'<tr id="preset-{preset.id}".*?</tr>', body, re.S).group()
    assert re.search(r"backing off until <time datetime=\"[^\"]+\" data-format=\"time\">", row)
    assert re.search(r"after 2 failures", row)


def test_it_shows_the_kind_of_a_preset_s_last_failure(staff_client, preset):
    now = timezone.now()
    for seconds, kind in ((30, "template"), (20, "infrastructure"), (10, "infrastructure")):
        failed = prebuild(preset, status=JobStatus.FAILED)
        ProvisionerJob.objects.filter(build__workspace=failed).update(
            failure_kind=kind,
            error=f"{kind} trouble",
            completed_at=now - timedelta(seconds=seconds),
        )

    body = body_of(staff_client.get("/prebuilds/"))

    row = re.search(rf'<tr id="preset-{preset.id}".*?</tr>', body, re.S).group()
    last = re.search(r'<span [^>]*data-col="last-failure".*?</span>', row, re.S).group()
    assert "last failure: infrastructure" in last
    assert 'title="infrastructure trouble"' in last
    assert "2 infrastructure failures recently, not counted" in last
    # Back-off counts the template failure alone (30 s ago, 1 x 15 s: over), so it creates.
    assert actions(body, preset.id) == ["create 1"]


def test_the_preset_page_says_which_kind_each_failure_was(staff_client, preset):
    lost = prebuild(preset, status=JobStatus.FAILED)
    ProvisionerJob.objects.filter(build__workspace=lost).update(
        failure_kind="infrastructure", error="Worker lost (heartbeat timeout)."
    )
    broken = prebuild(preset, status=JobStatus.FAILED)
    ProvisionerJob.objects.filter(build__workspace=broken).update(
        failure_kind="template", error="the startup script of agent(s) main failed"
    )

    body = body_of(staff_client.get(f"/prebuilds/presets/{preset.id}/"))

    failures = body.split("Recent failures")[1]
    rows = {
        name: re.search(rf"<tr>(?:(?!</tr>).)*{name}(?:(?!</tr>).)*</tr>", failures, re.S).group()
        for name in (lost.name, broken.name)
    }
    assert "infrastructure failure" in rows[lost.name]
    assert "template failure" in rows[broken.name]


def test_it_shows_stored_statuses_with_their_reason(staff_client, preset):
    other = PresetFactory(desired_instances=1)
    TemplateVersionPreset.objects.filter(id=preset.id).update(
        prebuild_status="hard_limited", prebuild_status_reason="the last 3 prebuild builds failed"
    )
    TemplateVersionPreset.objects.filter(id=other.id).update(
        prebuild_status="validation_failed", prebuild_status_reason="schedules: bad cron"
    )

    body = body_of(staff_client.get("/prebuilds/"))

    row = re.search(rf'<tr id="preset-{preset.id}".*?</tr>', body, re.S).group()
    assert "hard limited" in row and "the last 3 prebuild builds failed" in row
    row = re.search(rf'<tr id="preset-{other.id}".*?</tr>', body, re.S).group()
    assert "validation failed" in row and "schedules: bad cron" in row


def test_it_shows_paused_rows_and_the_resume_button_when_paused(staff_client, preset):
    reconciliation_pause(paused=True)

    body = body_of(staff_client.get("/prebuilds/"))

    row = re.search(rf'<tr id="preset-{preset.id}".*?</tr>', body, re.S).group()
    assert '<span class="badge warn">paused' in row
    assert "Resume reconciliation" in body


def test_it_counts_pending_builds_of_an_old_version_as_cancel_pending(staff_client, preset):
    prebuild(preset, status=JobStatus.PENDING)
    prebuild(preset, status=JobStatus.PENDING)
    template = preset.template_version.template
    template.deprecated = True
    template.save()

    body = body_of(staff_client.get("/prebuilds/"))

    assert actions(body, preset.id) == ["cancel 2 pending"]
    assert "old version" in re.search(rf'<tr id="preset-{preset.id}".*?</tr>', body, re.S).group()


def test_it_answers_htmx_with_the_live_fragment_only(staff_client, preset):
    response = staff_client.get("/prebuilds/", headers=HX)

    body = body_of(response)
    assert response.status_code == 200
    assert "<html" not in body
    assert body.lstrip().startswith('<div id="overview-live">')
    assert f'id="preset-{preset.id}"' in body


# -- the live poll --------------------------------------------------------------------------


def poll(client, board):
    return client.get("/prebuilds/", {"layout": board.layout, "known": board.known()}, headers=HX)


def test_it_answers_a_poll_with_no_content_when_nothing_changed(staff_client, preset):
    prebuild(preset)

    response = poll(staff_client, dashboard.overview())

    assert response.status_code == 204


def test_it_answers_a_poll_with_only_the_rows_that_changed(staff_client, preset):
    waiting = prebuild(preset, ready=False)
    other = PresetFactory(template_version=preset.template_version, name="other")
    board = dashboard.overview()
    WorkspaceAgent.objects.filter(workspace=waiting).update(lifecycle_state=AgentLifecycle.READY)

    response = poll(staff_client, board)

    body = body_of(response)
    assert response.status_code == 200
    assert "<html" not in body
    assert f'<template>\n<tr id="preset-{preset.id}"' in body
    assert 'hx-swap-oob="true"' in body
    assert f"totals-{preset.template_version.template_id}" in body  # totals changed too
    assert f"preset-{other.id}" not in body  # unchanged rows are not re-rendered
    assert 'id="reconciler"' not in body and 'id="audit"' not in body
    assert cell(body, preset.id, "eligible") == "1"


def test_it_swaps_the_whole_table_when_presets_come_or_go(staff_client, preset):
    board = dashboard.overview()
    newcomer = PresetFactory(desired_instances=2)

    body = body_of(poll(staff_client, board))

    assert '<div id="pools" data-layout="' in body and 'hx-swap-oob="true">' in body
    assert f'id="preset-{newcomer.id}"' in body
    assert body.count('hx-swap-oob="true"') == 1  # rows inside the table are plain


def test_it_swaps_the_reconciler_card_and_audit_after_a_pause(staff_client, preset, staff):
    board = dashboard.overview()
    staff_client.post("/prebuilds/pause", {"paused": "true"})

    body = body_of(poll(staff_client, board))

    assert '<section id="reconciler"' in body and "Resume reconciliation" in body
    assert '<section id="audit"' in body and "Paused reconciliation" in body
    assert "paused" in body.split(f'id="preset-{preset.id}"')[1]  # its status changed


def test_it_treats_a_garbled_poll_as_a_full_refresh(staff_client, preset):
    response = staff_client.get("/prebuilds/", {"layout": "x", "known": "a.b"}, headers=HX)

    body = body_of(response)
    assert '<div id="pools"' in body and '<section id="reconciler"' in body


# -- query counts ---------------------------------------------------------------------------


def pools(count: int) -> list[TemplateVersionPreset]:
    """`count` presets spread over templates, some with prebuilds, some invalidated."""
    templates = [TemplateFactory() for _ in range(max(1, count // 30))]
    presets = TemplateVersionPreset.objects.bulk_create(
        TemplateVersionPreset(
            template_version=templates[index % len(templates)].active_version,
            name=f"preset-{index:04d}",
            desired_instances=2,
            last_invalidated_at=timezone.now() if index % 3 == 0 else None,
        )
        for index in range(count)
    )
    for preset in presets[::10]:
        prebuild(preset, created_at=timezone.now() - timedelta(hours=1))
        prebuild(preset, status=JobStatus.PENDING)
    return presets


@pytest.mark.parametrize("count", [10, 300])
def test_it_renders_the_overview_in_constant_queries(
    staff_client, count, django_assert_max_num_queries
):
    pools(count)
    AuditEntry.objects.create(username="dana", action=AuditAction.PAUSE)

    with django_assert_max_num_queries(OVERVIEW_QUERIES):
        response = staff_client.get("/prebuilds/")

    assert body_of(response).count('<tr id="preset-') == count


@pytest.mark.parametrize("count", [10, 300])
def test_it_answers_polls_in_constant_queries(staff_client, count, django_assert_max_num_queries):
    presets = pools(count)
    board = dashboard.overview()
    TemplateVersionPreset.objects.filter(id__in=[p.id for p in presets]).update(desired_instances=3)

    with django_assert_max_num_queries(OVERVIEW_QUERIES):
        response = poll(staff_client, board)

    assert body_of(response).count("<template>") == count + len(board.groups)  # rows + totals


@pytest.mark.parametrize("count", [10, 300])
def test_it_renders_a_preset_in_constant_queries(
    staff_client, count, django_assert_max_num_queries
):
    presets = pools(count)
    preset = presets[0]
    for _ in range(count // 10):
        prebuild(preset)

    with django_assert_max_num_queries(PRESET_QUERIES):
        response = staff_client.get(f"/prebuilds/presets/{preset.id}/")

    assert response.status_code == 200


@pytest.mark.parametrize("count", [10, 300])
@pytest.mark.parametrize("url", ["/prebuilds/workspaces/", "/prebuilds/jobs/"])
def test_it_renders_staff_pages_in_constant_queries(
    staff_client, count, url, django_assert_max_num_queries
):
    presets = pools(count)
    template = presets[0].template_version.template_id
    filters = {"status": "pending", "template": template, "prebuilds": "1", "owner": "prebuilds"}

    with django_assert_max_num_queries(STAFF_PAGE_QUERIES[url]):
        response = staff_client.get(url, filters if "workspaces" in url else {})

    assert response.status_code == 200


# -- what a poll costs: the shared overview, one preset for the preset page ------------------

NOW = timezone.datetime(2026, 3, 2, 10, 0, tzinfo=timezone.get_fixed_timezone(0))
# A preset poll: session and user, the preset (3), whether a pass holds the lock (1), the
# preset's snapshot (at most 6), names of prebuilds to delete (1), its prebuilds with builds
# and agents (3).
PRESET_POLL_QUERIES = 14


def page_versions(response) -> dict[str, str]:
    """What the page's poll sends (static/js/warmstart.js): the layout and every version."""
    body = body_of(response)
    return {
        "layout": re.search(r'data-layout="(\w+)"', body).group(1),
        "known": ".".join(re.findall(r'data-version="(\w+)"', body)),
    }


def test_it_answers_an_unchanged_poll_without_reading_the_pools(
    staff_client, preset, django_assert_num_queries
):
    prebuild(preset)
    with time_machine.travel(NOW, tick=False):
        versions = page_versions(staff_client.get("/prebuilds/", headers=HX))

        with django_assert_num_queries(2):  # the session and its user, nothing else
            response = staff_client.get("/prebuilds/", versions, headers=HX)

    assert response.status_code == 204


def test_it_shows_a_change_once_the_shared_overview_is_older_than_its_max_age(staff_client, preset):
    prebuild(preset)
    with time_machine.travel(NOW, tick=False) as traveller:
        versions = page_versions(staff_client.get("/prebuilds/", headers=HX))
        TemplateVersionPreset.objects.filter(id=preset.id).update(desired_instances=5)

        within = staff_client.get("/prebuilds/", versions, headers=HX)
        traveller.shift(dashboard.OVERVIEW_MAX_AGE + timedelta(milliseconds=1))
        after = staff_client.get("/prebuilds/", versions, headers=HX)

    assert within.status_code == 204  # the shared overview is at most OVERVIEW_MAX_AGE old
    assert after.status_code == 200
    assert cell(body_of(after), preset.id, "desired") == "5"


def test_it_shows_an_operators_own_control_at_the_next_poll(staff_client, preset):
    with time_machine.travel(NOW, tick=False):
        versions = page_versions(staff_client.get("/prebuilds/", headers=HX))
        staff_client.post("/prebuilds/pause", {"paused": "true"}, headers=HX)

        body = body_of(staff_client.get("/prebuilds/", versions, headers=HX))

    assert '<section id="reconciler"' in body and "Resume reconciliation" in body


def test_it_serves_page_loads_from_the_shared_overview(
    staff_client, preset, django_assert_num_queries
):
    prebuild(preset)
    with time_machine.travel(NOW, tick=False):
        staff_client.get("/prebuilds/")

        with django_assert_num_queries(2):  # the session and its user: the page costs rendering
            response = staff_client.get("/prebuilds/")

    assert cell(body_of(response), preset.id, "actual") == "1"


def test_it_lands_a_control_without_javascript_on_a_page_that_shows_it(staff_client, preset):
    with time_machine.travel(NOW, tick=False):
        staff_client.get("/prebuilds/")  # the shared overview: not paused
        staff_client.post("/prebuilds/pause", {"paused": "true"})

        body = body_of(staff_client.get("/prebuilds/"))

    assert "Resume reconciliation" in body


def test_the_preset_page_shows_the_row_the_overview_shows():
    presets = pools(10)
    with time_machine.travel(NOW, tick=False):
        board = dashboard.overview()
        for preset in presets:
            pool = dashboard.preset_pool(preset.id)

            assert pool.row == dashboard.preset_row(board, preset.id), preset.name
            assert pool.paused == board.paused


@pytest.mark.parametrize("count", [10, 300])
def test_it_answers_the_preset_poll_reading_that_preset_alone(
    staff_client, count, django_assert_num_queries
):
    preset = pools(count)[0]  # invalidated, with a running and a pending prebuild
    url = f"/prebuilds/presets/{preset.id}/"
    headers = {**HX, "HX-Target": "preset-state"}

    with django_assert_num_queries(PRESET_POLL_QUERIES) as captured:
        response = staff_client.get(url, {"v": "stale"}, headers=headers)

    assert response.status_code == 200
    assert "delete 1 expired" in body_of(response)
    # The snapshot's prebuild query is the one limited to this preset's workspaces.
    snapshot_sql = [q["sql"] for q in captured.captured_queries if "WITH latest AS" in q["sql"]]
    assert len(snapshot_sql) == 1 and "workspace_id = ANY(" in snapshot_sql[0]


# -- global controls ------------------------------------------------------------------------


def test_it_pauses_and_resumes_with_an_audit_entry(staff_client, staff):
    response = staff_client.post("/prebuilds/pause", {"paused": "true"}, follow=True)

    assert reconciliation_paused()
    assert "Reconciliation paused." in body_of(response)
    entry = AuditEntry.objects.get()
    assert (entry.user, entry.username, entry.action) == (staff, "dana", AuditAction.PAUSE)

    staff_client.post("/prebuilds/pause", {"paused": "false"})

    assert not reconciliation_paused()
    assert AuditEntry.objects.first().action == AuditAction.RESUME


def test_it_answers_htmx_pause_with_the_updated_fragment(staff_client):
    response = staff_client.post("/prebuilds/pause", {"paused": "true"}, headers=HX)

    body = body_of(response)
    assert response.status_code == 200
    assert "<html" not in body
    assert 'id="reconciler-state">paused' in body
    assert "Resume reconciliation" in body
    assert "Reconciliation paused." in body
    assert "Paused reconciliation" in body  # the audit list


@pytest.mark.parametrize("value", ["", "maybe"])
def test_it_refuses_a_bad_pause_value_naming_the_field(staff_client, value):
    response = staff_client.post("/prebuilds/pause", {"paused": value}, follow=True)

    assert "Paused must be" in body_of(response)
    assert not reconciliation_paused()
    assert AuditEntry.objects.count() == 0


def test_it_reconciles_now_and_records_the_pass(staff_client, preset):
    preset.desired_instances = 2
    preset.save()

    response = staff_client.post("/prebuilds/reconcile", headers=HX)

    body = body_of(response)
    assert "Reconciliation pass done: 1 presets, 2 actions, 0 errors." in body
    assert cell(body, preset.id, "starting") == "2"
    entry = AuditEntry.objects.get()
    assert entry.action == AuditAction.RECONCILE
    assert entry.detail == "1 presets, 2 actions, 0 errors"
    assert ReconciliationPass.objects.filter(lock_acquired=True).count() == 1


# -- preset controls ------------------------------------------------------------------------


def desired(preset) -> int | None:
    return TemplateVersionPreset.objects.get(id=preset.id).desired_instances


def test_it_changes_desired_instances(staff_client, preset):
    url = f"/prebuilds/presets/{preset.id}/desired-instances"

    response = staff_client.post(url, {"instances": "5"})

    assert response.status_code == 302
    assert response.url == f"/prebuilds/presets/{preset.id}/"
    assert desired(preset) == 5
    entry = AuditEntry.objects.get()
    assert (entry.action, entry.preset_id, entry.detail) == (
        AuditAction.SET_DESIRED_INSTANCES,
        preset.id,
        "1 → 5",
    )
    assert entry.target == f"Default / python-dev / {preset.template_version.name} / standard"


def test_it_clears_desired_instances_when_empty(staff_client, preset):
    staff_client.post(f"/prebuilds/presets/{preset.id}/desired-instances", {"instances": ""})

    assert desired(preset) is None
    assert AuditEntry.objects.get().detail == "1 → none"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("-1", "Desired instances must be 0 or more."),
        ("abc", "Desired instances must be a whole number."),
        (
            "100000",
            "Desired instances: 100000 is above the maximum of 100 "
            "(PREBUILDS_MAX_INSTANCES_PER_PRESET)",
        ),
    ],
)
def test_it_refuses_bad_desired_instances_naming_the_field(staff_client, preset, value, message):
    url = f"/prebuilds/presets/{preset.id}/desired-instances"

    plain = staff_client.post(url, {"instances": value})
    htmx = staff_client.post(url, {"instances": value}, headers=HX)

    assert plain.status_code == 400
    assert message in body_of(plain)
    assert htmx.status_code == 200  # htmx swaps only successful answers
    assert message in body_of(htmx) and "<html" not in body_of(htmx)
    assert 'aria-invalid="true"' in body_of(htmx)
    assert desired(preset) == 1
    assert AuditEntry.objects.count() == 0


def test_it_invalidates_a_preset_and_shows_the_deletions(staff_client, preset):
    old = prebuild(preset, created_at=timezone.now() - timedelta(minutes=5))

    response = staff_client.post(f"/prebuilds/presets/{preset.id}/invalidate", headers=HX)

    body = body_of(response)
    assert "<html" not in body and body.lstrip().startswith('<div id="preset-live"')
    assert f'delete 1 expired: <span class="name">{old.name}</span>' in body
    assert TemplateVersionPreset.objects.get(id=preset.id).last_invalidated_at is not None
    assert AuditEntry.objects.get().action == AuditAction.INVALIDATE


def test_it_resets_a_hard_limited_preset(staff_client, preset):
    TemplateVersionPreset.objects.filter(id=preset.id).update(
        prebuild_status="hard_limited", prebuild_status_reason="the last 3 prebuild builds failed"
    )

    response = staff_client.post(f"/prebuilds/presets/{preset.id}/reset", follow=True)

    assert "standard reset to healthy." in body_of(response)
    assert TemplateVersionPreset.objects.get(id=preset.id).prebuild_status == "healthy"
    entry = AuditEntry.objects.get()
    assert (entry.action, entry.detail) == (AuditAction.RESET, "was Hard limited")


def test_it_says_so_when_resetting_a_healthy_preset_and_records_nothing(staff_client, preset):
    response = staff_client.post(f"/prebuilds/presets/{preset.id}/reset", follow=True)

    assert "standard is already healthy." in body_of(response)
    assert AuditEntry.objects.count() == 0


def test_it_cancels_pending_prebuild_builds(staff_client, preset):
    pending = prebuild(preset, status=JobStatus.PENDING)

    response = staff_client.post(f"/prebuilds/presets/{preset.id}/cancel-pending", follow=True)

    assert "1 pending prebuild builds canceled." in body_of(response)
    assert pending.builds.get().job.status == JobStatus.CANCELED
    assert AuditEntry.objects.get().detail == "1 canceled"


def test_it_deletes_one_prebuild(staff_client, preset, staff):
    workspace = prebuild(preset)

    response = staff_client.post(f"/prebuilds/workspaces/{workspace.id}/delete", headers=HX)

    assert f"Prebuild {workspace.name} is being deleted." in body_of(response)
    latest = workspace.builds.order_by("-build_number").first()
    assert latest.transition == Transition.DELETE
    entry = AuditEntry.objects.get()
    assert (entry.action, entry.workspace_id, entry.preset_id, entry.target) == (
        AuditAction.DELETE_PREBUILD,
        workspace.id,
        preset.id,
        workspace.name,
    )


def test_it_never_deletes_a_claimed_workspace(staff_client, preset):
    owner = UserFactory()
    workspace = WorkspaceFactory(owner=owner, template=preset.template_version.template)
    BuildFactory(workspace=workspace, preset=preset)

    response = staff_client.post(f"/prebuilds/workspaces/{workspace.id}/delete", follow=True)

    assert "was not deleted: it is no longer a prebuild" in body_of(response)
    assert not workspace.builds.filter(transition=Transition.DELETE).exists()
    assert AuditEntry.objects.count() == 0


def test_it_offers_a_confirmation_page_without_javascript(staff_client, preset):
    body = body_of(staff_client.get(f"/prebuilds/presets/{preset.id}/"))

    assert f'action="/prebuilds/presets/{preset.id}/confirm/invalidate"' in body
    assert f'hx-post="/prebuilds/presets/{preset.id}/invalidate"' in body
    assert "hx-confirm=" in body

    confirm = body_of(staff_client.get(f"/prebuilds/presets/{preset.id}/confirm/invalidate"))
    assert f'<form method="post" action="/prebuilds/presets/{preset.id}/invalidate"' in confirm
    assert TemplateVersionPreset.objects.get(id=preset.id).last_invalidated_at is None


def test_the_invalidate_confirmation_previews_the_next_pass_and_writes_nothing(
    staff_client, preset, settings, django_capture_on_commit_callbacks
):
    settings.PREBUILDS_MAX_IN_FLIGHT_PER_PRESET = 2
    preset.desired_instances = 3
    preset.save()
    for seconds in (60, 120, 600):
        workspace = prebuild(preset)
        job = ProvisionerJob.objects.get(build__workspace=workspace)
        job.started_at = job.completed_at - timedelta(seconds=seconds)
        job.save(update_fields=["started_at"])
    before = (
        WorkspaceBuild.objects.count(),
        ProvisionerJob.objects.count(),
        list(TemplateVersionPreset.objects.values_list("id", "last_invalidated_at")),
    )

    with django_capture_on_commit_callbacks() as callbacks:
        body = body_of(staff_client.get(f"/prebuilds/presets/{preset.id}/confirm/invalidate"))

    # All 3 expire and are replaced in waves of 2 then 1, each the p90 build time (10 min).
    assert "Then: delete 3, create 3; cold builds for ~10.0 min, full after ~20.0 min." in body
    assert callbacks == []
    assert (
        WorkspaceBuild.objects.count(),
        ProvisionerJob.objects.count(),
        list(TemplateVersionPreset.objects.values_list("id", "last_invalidated_at")),
    ) == before


# -- the preset page ------------------------------------------------------------------------


def test_it_shows_the_prebuilds_of_a_preset(staff_client, preset):
    ready = prebuild(preset, created_at=timezone.now() - timedelta(hours=2))
    starting = prebuild(preset, ready=False)
    preset.last_invalidated_at = timezone.now() - timedelta(hours=1)
    preset.save()

    body = body_of(staff_client.get(f"/prebuilds/presets/{preset.id}/"))

    rows = {
        name: re.search(rf'<tr id="prebuild-{ws.id}".*?</tr>', body, re.S).group()
        for name, ws in (("ready", ready), ("starting", starting))
    }
    assert f'href="/workspaces/{ready.id}/"' in rows["ready"]
    assert "expired" in rows["ready"] and "succeeded" in rows["ready"]
    assert (
        "starting" in rows["starting"]
        and '<span class="badge warn">expired' not in rows["starting"]
    )


def test_it_shows_claims_misses_and_failures(staff_client, preset):
    now = timezone.now()
    claimed = prebuild(preset)
    user = UserFactory(username="erin")
    PrebuildClaim.objects.create(
        preset=preset,
        user=user,
        workspace=claimed,
        claimed=True,
        requested_at=now - timedelta(seconds=10),
        ready_at=now - timedelta(seconds=7.5),
    )
    PrebuildClaim.objects.create(preset=preset, user=user, claimed=False, miss_reason="starting")
    failed = prebuild(preset, status=JobStatus.FAILED)
    job = failed.builds.get().job
    job.error = "provisioner exited with status 2"
    job.save()

    body = body_of(staff_client.get(f"/prebuilds/presets/{preset.id}/"))

    claims = body.split("Recent claims and misses")[1].split("Recent failures")[0]
    assert "erin" in claims and "claimed" in claims and "miss" in claims
    assert "2.5 s" in claims
    failures = body.split("Recent failures")[1]
    assert "provisioner exited with status 2" in failures
    assert f'href="/workspaces/{failed.id}/"' in failures


def test_it_draws_the_chart_from_recorded_passes(staff_client, preset):
    now = timezone.now()
    ReconciliationPass.objects.bulk_create(
        ReconciliationPass(
            started_at=now - timedelta(seconds=15 * step),
            preset_counts={str(preset.id): [2, 2, 1], str(UNKNOWN): [9, 9, 9]},
        )
        for step in range(1440)  # six hours of passes
    )

    body = body_of(staff_client.get(f"/prebuilds/presets/{preset.id}/"))

    svg = re.search(r"<svg.*?</svg>", body, re.S).group()
    assert 'role="img"' in svg and "<title" in svg and "<desc" in svg
    polylines = re.findall(r'<polyline class="series-(\w+)" points="([^"]+)"', svg)
    assert [name for name, _ in polylines] == ["desired", "running", "eligible"]
    for _, points in polylines:
        assert 2 <= len(points.split()) <= 200
    assert "latest: desired 2, running 2, eligible 1" in svg


def test_it_answers_the_state_poll_with_204_while_nothing_changes(staff_client, preset):
    waiting = prebuild(preset, ready=False)
    headers = {**HX, "HX-Target": "preset-state"}
    url = f"/prebuilds/presets/{preset.id}/"
    first = staff_client.get(url, headers=headers)
    version = re.search(r'hx-vals=\'\{"v": "(\w+)"\}\'', body_of(first)).group(1)

    same = staff_client.get(url, {"v": version}, headers=headers)
    WorkspaceAgent.objects.filter(workspace=waiting).update(lifecycle_state=AgentLifecycle.READY)
    changed = staff_client.get(url, {"v": version}, headers=headers)

    assert "<html" not in body_of(first)
    assert body_of(first).lstrip().startswith('<section id="preset-state"')
    assert same.status_code == 204
    assert changed.status_code == 200
    assert '<span class="badge ok">ready</span>' in body_of(changed)


def test_it_says_when_a_preset_is_not_reconciled(staff_client):
    preset = PresetFactory(desired_instances=None)

    body = body_of(staff_client.get(f"/prebuilds/presets/{preset.id}/"))

    assert "not reconciled" in body


# -- staff workspace pages ------------------------------------------------------------------


def test_it_lists_every_workspace_with_filters(staff_client, preset):
    alice = UserFactory(username="alice")
    mine = WorkspaceFactory(owner=alice, name="alice-dev")
    BuildFactory(workspace=mine, job__status=JobStatus.FAILED)
    pool = prebuild(preset)
    other_template = TemplateFactory(name="other")
    elsewhere = WorkspaceFactory(owner=UserFactory(), template=other_template, name="elsewhere")

    def names(**params) -> set[str]:
        body = body_of(staff_client.get("/prebuilds/workspaces/", params))
        return set(re.findall(r'<th scope="row"><a href="/workspaces/[^"]+/">([^<]+)</a>', body))

    assert names() == {"alice-dev", pool.name, "elsewhere"}
    assert names(owner="alice") == {"alice-dev"}
    assert names(prebuilds="1") == {pool.name}
    assert names(status="failed") == {"alice-dev"}
    assert names(template=str(other_template.id)) == {elsewhere.name}
    assert names(status="bogus") == {"alice-dev", pool.name, "elsewhere"}  # ignored
    assert pool.owner.id == SYSTEM_USER_ID


def test_it_labels_the_workspace_filters(staff_client):
    body = body_of(staff_client.get("/prebuilds/workspaces/"))

    for field in ("owner", "template", "status", "prebuilds"):
        assert f'<label for="id_{field}"' in body or f'id="id_{field}"' in body
    assert '<label for="id_owner">Owner</label>' in body


def test_it_shows_the_build_queue(staff_client, preset):
    waiting = prebuild(preset, status=JobStatus.PENDING)
    running = prebuild(preset, status=JobStatus.RUNNING)
    done = prebuild(preset)
    job = running.builds.get().job
    job.worker = "worker-7@host"
    job.save()

    response = staff_client.get("/prebuilds/jobs/")
    fragment = staff_client.get("/prebuilds/jobs/", headers=HX)

    body = body_of(response)
    assert waiting.name in body and running.name in body and done.name not in body
    assert "worker-7@host" in body
    assert body.index(waiting.name) < body.index(running.name)  # oldest first
    assert "<html" not in body_of(fragment)
    assert body_of(fragment).lstrip().startswith('<div id="queue"')


def test_the_pages_show_an_unhealthy_prebuild_with_why(staff_client, settings):
    """Issue 12: counted apart, named with its reason in the pending delete, and on the preset
    page marked unhealthy with the agent disconnected."""
    settings.AGENT_DISCONNECT_TIMEOUT = 30
    preset = PresetFactory(desired_instances=2)
    prebuild(preset)
    gone = prebuild(preset)
    WorkspaceAgent.objects.filter(workspace=gone).update(
        last_seen_at=timezone.now() - timedelta(minutes=5)
    )

    overview = staff_client.get("/prebuilds/").content.decode()
    assert cell(overview, preset.id, "unhealthy") == "1"
    assert cell(overview, preset.id, "eligible") == "1"
    actions = text(cell(overview, preset.id, "actions"))
    assert "delete 1 unhealthy" in actions and f"{gone.name} (agent disconnected)" in actions

    page = staff_client.get(f"/prebuilds/presets/{preset.id}/").content.decode()
    line = re.search(rf'id="prebuild-{gone.id}".*?</tr>', page, re.S).group(0)
    assert '<td><span class="badge bad">unhealthy</span> agent disconnected</td>' in line
    assert '<span class="badge warn">disconnected</span>' in line  # its agent


def test_it_shows_the_last_days_misses_by_reason(staff_client, preset):
    user = UserFactory()
    now = timezone.now()

    def record(reason: str, count: int, *, ago=timedelta(minutes=5)) -> None:
        for _ in range(count):
            PrebuildClaim.objects.create(
                preset=preset,
                user=user,
                claimed=not reason,
                miss_reason=reason,
                requested_at=now - ago,
            )

    record("", 4)
    record("starting", 2)
    record("pool_empty", 3)
    record("backing_off", 5, ago=timedelta(hours=30))  # older than the window

    body = body_of(staff_client.get(f"/prebuilds/presets/{preset.id}/"))

    section = body.split("Misses by reason, last 24 hours")[1].split("Recent claims")[0]
    rows = re.findall(
        r'<tr data-reason="(\w+)"><td>([^<]+)</td>.*?<td class="num">(\d+)</td>', section
    )
    assert rows == [
        ("pool_empty", "Pool empty", "3"),
        ("starting", "All prebuilds still starting", "2"),
    ]
    assert "4 requests served from the pool" in section
    claims = body.split("Recent claims and misses")[1]
    assert "miss: pool_empty" in claims and "miss: starting" in claims
