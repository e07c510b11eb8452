"""Bounds on pool sizes at the prebuilds app's entry points: the pool admin, the dashboard
and the service they call (``workspaces.pool_limits`` decides; these pin that each uses it).

The JSON API's entry point (``PUT /api/v2/prebuilds/presets/<id>``) calls the same service;
its refusals are pinned in ``tests/prebuilds/test_api.py``.
"""

from __future__ import annotations

from html import unescape

import pytest

from prebuilds.models import AuditEntry
from prebuilds.services import PrebuildsError, preset_set_desired_instances
from tests.accounts.factories import UserFactory
from tests.workspaces.factories import PresetFactory
from workspaces.models import TemplateVersionPreset

pytestmark = pytest.mark.django_db

PER_PRESET = "50000 is above the maximum of 100 (PREBUILDS_MAX_INSTANCES_PER_PRESET)"
TOTAL = (
    "the organization's prebuilt instances would total 21 (now 11), above the maximum of 20 "
    "(PREBUILDS_MAX_INSTANCES_PER_ORGANIZATION)"
)


@pytest.fixture
def staff_client(client):
    client.force_login(UserFactory(is_staff=True, is_superuser=True))
    return client


@pytest.fixture
def crowded(settings):
    """An organization at 11 of its 20 instances, and a preset of 1 in it to grow."""
    settings.PREBUILDS_MAX_INSTANCES_PER_ORGANIZATION = 20
    PresetFactory(desired_instances=10)
    return PresetFactory(desired_instances=1)


def desired(preset) -> int | None:
    return TemplateVersionPreset.objects.get(id=preset.id).desired_instances


@pytest.mark.parametrize(("value", "message"), [(50000, PER_PRESET), (11, TOTAL)])
def test_the_service_refuses_naming_the_field(crowded, value, message):
    with pytest.raises(PrebuildsError) as info:
        preset_set_desired_instances(preset=crowded, instances=value)

    assert (info.value.field, info.value.detail) == ("instances", message)
    assert desired(crowded) == 1


@pytest.mark.parametrize(("value", "message"), [("50000", PER_PRESET), ("11", TOTAL)])
def test_the_pool_admin_refuses_and_changes_nothing(staff_client, crowded, value, message):
    url = f"/admin/prebuilds/prebuildpool/{crowded.pk}/change/"

    response = staff_client.post(url, {"desired_instances": value})

    assert response.status_code == 200
    assert f"desired_instances: {message}" in unescape(response.content.decode())
    assert desired(crowded) == 1
    assert AuditEntry.objects.count() == 0


@pytest.mark.parametrize(("value", "message"), [("50000", PER_PRESET), ("11", TOTAL)])
def test_the_dashboard_refuses_and_changes_nothing(staff_client, crowded, value, message):
    url = f"/prebuilds/presets/{crowded.id}/desired-instances"

    response = staff_client.post(url, {"instances": value})

    assert response.status_code == 400
    assert f"Desired instances: {message}" in unescape(response.content.decode())
    assert desired(crowded) == 1
    assert AuditEntry.objects.count() == 0


def test_the_dashboard_accepts_up_to_the_total(staff_client, crowded):
    url = f"/prebuilds/presets/{crowded.id}/desired-instances"

    response = staff_client.post(url, {"instances": "10"})

    assert response.status_code == 302
    assert desired(crowded) == 10
