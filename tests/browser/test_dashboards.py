"""The operator dashboards in a real browser: live updates, controls, access, a screenshot."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from playwright.sync_api import expect

from prebuilds.selectors import reconciliation_paused
from tests.accounts.factories import UserFactory
from tests.browser.conftest import VIEWER_TIME_ZONE, sign_in
from tests.workspaces.factories import PresetFactory, prebuild
from workspaces.models import AgentLifecycle, TemplateVersionPreset, WorkspaceAgent

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "screenshots" / "prebuilds-overview.png"


def staff_on_overview(page) -> None:
    UserFactory(username="operator", is_staff=True)
    sign_in(page, "operator", next_path="/prebuilds/")
    expect(page.get_by_role("heading", name="Prebuilds", exact=True)).to_be_visible()


def test_it_signs_staff_in_through_the_login_form(page):
    UserFactory(username="operator", is_staff=True)

    sign_in(page, "operator", next_path="/prebuilds/")

    assert page.url.endswith("/prebuilds/")
    expect(page.get_by_text("No preset declares prebuilds yet")).to_be_visible()


def test_it_updates_the_overview_by_itself(page):
    preset = PresetFactory(desired_instances=2)
    waiting = prebuild(preset, ready=False)
    prebuild(preset)
    staff_on_overview(page)
    eligible = page.locator(f"#preset-{preset.id} [data-col=eligible]")
    untouched = page.locator(f"#template-{preset.template_version.template_id}")
    expect(eligible).to_have_text("1")
    page.evaluate("window.__marker = 'no reload'")
    untouched.evaluate("node => node.__marker = 'same node'")

    WorkspaceAgent.objects.filter(workspace=waiting).update(lifecycle_state=AgentLifecycle.READY)

    expect(eligible).to_have_text("2", timeout=10_000)
    assert page.evaluate("window.__marker") == "no reload"
    # The group header did not change, so its element was not re-rendered.
    assert untouched.evaluate("node => node.__marker") == "same node"


def test_it_pauses_and_resumes(page):
    preset = PresetFactory(desired_instances=1)
    staff_on_overview(page)
    state = page.locator("#reconciler-state")
    expect(state).to_have_text("running")

    page.get_by_role("button", name="Pause reconciliation").click()

    expect(state).to_have_text("paused")
    expect(page.locator(f"#preset-{preset.id} .status-cell")).to_contain_text("paused")
    expect(page.get_by_role("status")).to_contain_text("Reconciliation paused.")
    assert reconciliation_paused()

    page.get_by_role("button", name="Resume reconciliation").click()

    expect(state).to_have_text("running")
    expect(page.locator("#audit")).to_contain_text("Resumed reconciliation")
    assert not reconciliation_paused()


def test_it_reconciles_now(page):
    preset = PresetFactory(desired_instances=3)
    staff_on_overview(page)
    row = page.locator(f"#preset-{preset.id}")
    expect(row.locator("[data-col=actions]")).to_have_text("create 3")
    expect(row.locator("[data-col=starting]")).to_have_text("0")

    page.get_by_role("button", name="Reconcile now").click()

    expect(row.locator("[data-col=starting]")).to_have_text("3")
    expect(row.locator("[data-col=actions]")).to_have_text("none")
    expect(page.get_by_role("status")).to_contain_text("Reconciliation pass done")


def test_it_invalidates_a_preset_and_shows_the_deletions(page):
    preset = PresetFactory(desired_instances=1)
    current = prebuild(preset)
    staff_on_overview(page)
    page.get_by_role("link", name=preset.name).click()
    expect(page.locator("#preset-status")).to_have_text("healthy")

    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Invalidate prebuilds").click()

    actions = page.locator("#preset-state [data-col=actions]")
    expect(actions).to_contain_text(f"delete 1 expired: {current.name}")
    expect(page.get_by_role("status")).to_contain_text("invalidated")
    page.get_by_role("link", name="Prebuilds", exact=True).first.click()
    expect(page.locator(f"#preset-{preset.id} [data-col=actions]")).to_contain_text(
        f"delete 1 expired: {current.name}"
    )
    expect(page.locator("#audit")).to_contain_text("Invalidated prebuilds")


def test_it_forbids_the_overview_to_non_staff(page):
    UserFactory(username="member")
    sign_in(page, "member")

    response = page.goto("/prebuilds/")

    assert response.status == 403


def test_it_shows_times_in_the_viewers_time_zone(page):
    preset = PresetFactory(desired_instances=2)
    prebuild(preset, status="failed")
    prebuild(preset, status="failed")
    staff_on_overview(page)
    row = page.locator(f"#preset-{preset.id}")
    # The badge's time (the status cell also shows the last failure's, relative).
    until = row.locator(".status-cell .badge time")
    iso = until.get_attribute("datetime")
    local = f"{datetime.fromisoformat(iso).astimezone(ZoneInfo(VIEWER_TIME_ZONE)):%H:%M:%S}"
    expect(until).to_have_text(local)

    # A row swapped in by the poll is localized too.
    TemplateVersionPreset.objects.filter(id=preset.id).update(desired_instances=3)

    expect(row.locator("[data-col=desired]")).to_have_text("3")
    expect(row.locator(".status-cell .badge time")).to_have_text(local)
    expect(row.locator("[data-col=last-failure]")).to_contain_text("last failure: template")
    expect(row.locator("[data-col=actions] time")).to_have_text(local)


def test_it_takes_a_screenshot_of_the_overview(page):
    realistic_pools()
    sign_in(page, "dana", next_path="/prebuilds/")
    expect(page.locator("table.pools")).to_be_visible()
    page.wait_for_load_state("networkidle")

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    # The whole page at a 1280x800 viewport: every pool and the recent operator actions.
    page.screenshot(path=str(SCREENSHOT), full_page=True)

    assert SCREENSHOT.stat().st_size > 10_000


# -- realistic data for the screenshot ---------------------------------------------------------


def realistic_pools():
    """A few pools in different states, with claims, failures and six hours of passes."""
    from datetime import timedelta

    from django.utils import timezone

    from accounts.services import system_user
    from prebuilds.audit import audit_record
    from prebuilds.models import AuditAction, PrebuildClaim, ReconciliationPass
    from tests.accounts.factories import OrganizationFactory
    from tests.workspaces.factories import TemplateFactory
    from workspaces.models import JobStatus

    now = timezone.now()
    acme = OrganizationFactory(slug="acme", name="Acme")
    python = TemplateFactory(
        organization=acme, name="python-dev", display_name="Python dev", with_version__name="v4"
    )
    data = TemplateFactory(
        organization=acme,
        name="data-science",
        display_name="Data science",
        with_version__name="v2",
    )
    web = TemplateFactory(
        name="web-frontend", display_name="Web frontend", with_version__name="v12"
    )

    standard = PresetFactory(
        template_version=python.active_version, name="standard", desired_instances=3
    )
    for minutes in (95, 64, 12):
        prebuild(standard, created_at=now - timedelta(minutes=minutes))
    large = PresetFactory(template_version=python.active_version, name="large", desired_instances=2)
    prebuild(large, created_at=now - timedelta(minutes=40))
    prebuild(large, status=JobStatus.PENDING)

    notebook = PresetFactory(
        template_version=data.active_version, name="notebook", desired_instances=2
    )
    for minutes in (30, 20):
        prebuild(notebook, status=JobStatus.FAILED, created_at=now - timedelta(minutes=minutes))
    prebuild(notebook, status=JobStatus.FAILED)
    notebook.prebuild_status = "hard_limited"
    notebook.prebuild_status_reason = "the last 3 prebuild builds failed"
    notebook.save()
    gpu = PresetFactory(template_version=data.active_version, name="gpu", desired_instances=1)
    prebuild(gpu, status=JobStatus.FAILED)
    prebuild(gpu, status=JobStatus.FAILED)
    spark = PresetFactory(
        template_version=data.active_version,
        name="spark",
        desired_instances=1,
        parameters={"region": "eu-west"},
        prebuild_status="validation_failed",
        prebuild_status_reason="parameters not declared by the template version: region",
    )

    app = PresetFactory(template_version=web.active_version, name="node-20", desired_instances=2)
    old = [prebuild(app, created_at=now - timedelta(hours=3)) for _ in range(2)]
    prebuild(app, ready=False)
    app.last_invalidated_at = now - timedelta(minutes=5)
    app.save()

    operator = UserFactory(username="dana", is_staff=True)
    for index, workspace in enumerate(old[:1]):
        PrebuildClaim.objects.create(
            preset=standard,
            user=UserFactory(username=f"dev{index}"),
            workspace=workspace,
            claimed=True,
            requested_at=now - timedelta(minutes=50),
            ready_at=now - timedelta(minutes=50) + timedelta(seconds=2.4),
        )
    audit_record(user=operator, action=AuditAction.INVALIDATE, preset=app)
    audit_record(
        user=operator, action=AuditAction.SET_DESIRED_INSTANCES, preset=standard, detail="2 → 3"
    )

    passes = []
    claims_at = (300, 190, 95, 50)  # minutes ago: each claim takes one prebuild from the pool
    for step in range(6 * 60 * 4):  # a pass every 15 s for six hours
        minutes = step / 4  # how long ago
        desired = 3 if minutes < 210 else 2
        # The pool catches up with a raise of desired within 4 minutes...
        actual = desired if minutes < 206 or minutes >= 210 else 2
        # ...and a claimed prebuild is replaced within 3 minutes, ready 2 minutes later.
        if any(at - 3 < minutes <= at for at in claims_at):
            actual -= 1
        eligible = actual
        if any(at - 5 < minutes <= at - 3 for at in claims_at) or 204 < minutes <= 206:
            eligible -= 1
        passes.append(
            ReconciliationPass(
                started_at=now - timedelta(seconds=15 * step),
                presets_seen=6,
                preset_counts={str(standard.id): [desired, actual, eligible]},
            )
        )
    ReconciliationPass.objects.bulk_create(passes)
    del system_user, gpu, spark
    return {"standard": standard, "node": app, "operator": operator}
