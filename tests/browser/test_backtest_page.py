"""The preset's sizing reason and its backtest page in a real browser, and their screenshot."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone
from playwright.sync_api import expect

from benchmarks.sizing import WEEK_START, synthetic_trace
from prebuilds.models import PrebuildClaim
from tests.accounts.factories import UserFactory
from tests.browser.conftest import sign_in
from tests.workspaces.factories import PresetFactory, TemplateFactory, prebuild
from workspaces.models import ProvisionerJob

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "screenshots" / "prebuilds-backtest.png"


def benchmark_demand_preset():
    """A preset with a goal whose recorded demand is the sizing benchmark's trace, moved so that
    its scored week ends now, and 40 of the trace's build durations."""
    template = TemplateFactory(name="python-dev")
    preset = PresetFactory(
        template_version=template.active_version,
        name="standard",
        desired_instances=5,
        target_hit_rate=0.95,
        min_instances=1,
        max_instances=40,
    )
    requests, builds = synthetic_trace()
    now = timezone.now().replace(minute=0, second=0, microsecond=0)
    shift = now - (WEEK_START + timedelta(weeks=1))
    user = UserFactory()
    PrebuildClaim.objects.bulk_create(
        PrebuildClaim(preset=preset, user=user, claimed=True, requested_at=at + shift)
        for at in requests
        if at + shift < timezone.now()
    )
    done = timezone.now() - timedelta(hours=1)
    for seconds in builds[:40]:
        job_id = prebuild(preset).builds.get().job_id
        ProvisionerJob.objects.filter(id=job_id).update(
            started_at=done - timedelta(seconds=seconds), completed_at=done
        )
    return preset


def test_it_shows_why_a_pool_has_its_size_and_backtests_it(page):
    preset = benchmark_demand_preset()
    UserFactory(username="dana", is_staff=True)

    sign_in(page, "dana", next_path=f"/prebuilds/presets/{preset.id}/")
    expect(page.locator("#preset-sizing")).to_contain_text("Sized by a goal: desired")
    expect(page.locator("#preset-sizing")).to_contain_text("requests over 28 days")

    page.locator("#preset-backtest-link").click()
    table = page.locator("#backtest")
    expect(table).to_be_visible(timeout=30_000)
    expect(table.locator("tbody tr")).to_have_count(2)  # fixed:5 and target:0.95
    expect(table.locator('tr[data-policy="target:0.95"]')).to_be_visible()

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.stat().st_size > 10_000
