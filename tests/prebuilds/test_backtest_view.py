"""The preset's backtest page: the `simulate_prebuilds` comparison for its recorded demand."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from prebuilds.models import PrebuildClaim
from tests.accounts.factories import UserFactory
from tests.workspaces.factories import PresetFactory, prebuild
from workspaces.models import ProvisionerJob

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff_client(client):
    client.force_login(UserFactory(is_staff=True))
    return client


def _preset_with_history():
    preset = PresetFactory(desired_instances=2, target_hit_rate=0.9, max_instances=6)
    for seconds in (60, 90, 300):
        job_id = prebuild(preset).builds.get().job_id
        done = datetime.now(UTC) - timedelta(hours=2)
        ProvisionerJob.objects.filter(id=job_id).update(
            started_at=done - timedelta(seconds=seconds), completed_at=done
        )
    user = UserFactory()
    now = datetime.now(UTC)
    PrebuildClaim.objects.bulk_create(
        PrebuildClaim(preset=preset, user=user, claimed=True, requested_at=now - timedelta(hours=h))
        for h in range(1, 30)
    )
    return preset


def test_it_compares_the_presets_policies_on_its_recorded_demand(staff_client):
    preset = _preset_with_history()

    response = staff_client.get(f"/prebuilds/presets/{preset.id}/backtest?days=1")

    page = response.content.decode()
    assert response.status_code == 200
    assert 'data-policy="fixed:2"' in page and 'data-policy="target:0.9"' in page
    assert "23 requests from" in page  # one an hour over the last day
    assert "3 build durations" in page
    detail = staff_client.get(f"/prebuilds/presets/{preset.id}/").content.decode()
    assert f'href="/prebuilds/presets/{preset.id}/backtest"' in detail
    assert "90 % of requests warm, 0–6 prebuilds" in detail


def test_it_says_when_no_build_durations_are_recorded(staff_client):
    preset = PresetFactory(desired_instances=1)
    page = staff_client.get(f"/prebuilds/presets/{preset.id}/backtest").content.decode()
    assert 'id="backtest-error"' in page and "no recorded prebuild build durations" in page


def test_it_refuses_bad_days(staff_client):
    preset = PresetFactory(desired_instances=1)
    response = staff_client.get(f"/prebuilds/presets/{preset.id}/backtest?days=3")
    assert response.status_code == 400
    assert "days: must be one of 1, 7, 14, 28" in response.content.decode()


def test_it_is_for_staff_only(client):
    preset = PresetFactory(desired_instances=1)
    url = f"/prebuilds/presets/{preset.id}/backtest"
    assert client.get(url).status_code == 302
    client.force_login(UserFactory())
    assert client.get(url).status_code == 403


def test_an_unknown_preset_is_404(staff_client):
    assert staff_client.get(f"/prebuilds/presets/{uuid.uuid4()}/backtest").status_code == 404
