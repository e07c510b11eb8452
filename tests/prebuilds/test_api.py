from __future__ import annotations

import json

import pytest
from django.test import Client

from accounts.services import api_token_create
from prebuilds.models import PrebuildsSettings
from prebuilds.selectors import reconciliation_paused
from prebuilds.services import reconciliation_pause
from tests.accounts.factories import UserFactory
from tests.workspaces.factories import PresetFactory, prebuild
from workspaces.models import Workspace

pytestmark = pytest.mark.django_db

STATUS = "/api/v2/prebuilds/status"
SETTINGS = "/api/v2/prebuilds/settings"


@pytest.fixture
def staff_client(client: Client) -> Client:
    client.force_login(UserFactory(is_staff=True))
    return client


def put(client: Client, body, **headers):
    data = body if isinstance(body, str) else json.dumps(body)
    return client.put(SETTINGS, data=data, content_type="application/json", headers=headers)


def test_it_answers_the_dry_run_document_to_staff(staff_client):
    preset = PresetFactory(desired_instances=2)
    prebuild(preset)

    response = staff_client.get(STATUS)

    assert response.status_code == 200
    body = response.json()
    assert (body["paused"], body["lock_acquired"]) == (False, True)
    [entry] = body["presets"]
    assert entry["preset_id"] == str(preset.id)
    assert entry["state"]["actual"] == 1
    assert entry["actions"] == [{"type": "create", "count": 1, "reason": "below_desired"}]
    assert Workspace.objects.count() == 1  # a status request executes nothing


def test_it_accepts_a_staff_api_token():
    token = api_token_create(user=UserFactory(is_staff=True))

    response = Client().get(STATUS, headers={"Authorization": f"Bearer {token}"})

    assert response.status_code == 200
    assert response.json()["presets"] == []


@pytest.mark.parametrize("path", [STATUS, SETTINGS])
def test_it_refuses_anonymous_callers(client, path):
    response = client.get(path)

    assert response.status_code == 401
    assert response.json()["error"] == "unauthorized"


@pytest.mark.parametrize("path", [STATUS, SETTINGS])
def test_it_refuses_non_staff_users(client, path):
    client.force_login(UserFactory())

    assert client.get(path).status_code == 403


def test_it_refuses_a_non_staff_token_even_to_change_settings():
    token = api_token_create(user=UserFactory())

    response = put(Client(), {"reconciliation_paused": True}, Authorization=f"Bearer {token}")

    assert response.status_code == 403
    assert not reconciliation_paused()


def test_it_shows_and_changes_the_pause_switch(staff_client):
    assert staff_client.get(SETTINGS).json() == {"reconciliation_paused": False}

    response = put(staff_client, {"reconciliation_paused": True})

    assert response.status_code == 200
    assert response.json() == {"reconciliation_paused": True}
    assert PrebuildsSettings.objects.get().reconciliation_paused
    assert staff_client.get(SETTINGS).json() == {"reconciliation_paused": True}
    assert staff_client.get(STATUS).json()["paused"] is True

    assert put(staff_client, {"reconciliation_paused": False}).json() == {
        "reconciliation_paused": False
    }


@pytest.mark.parametrize(
    "body",
    [
        {"reconciliation_paused": "true"},
        {"reconciliation_paused": 1},
        {"reconciliation_paused": None},
        {"reconciliation_paused": False, "interval": 5},
        {},
        [],
        "not json",
        "",
    ],
)
def test_it_refuses_bad_settings_and_changes_nothing(staff_client, body):
    reconciliation_pause(paused=True)

    response = put(staff_client, body)

    assert response.status_code == 400
    assert response.json()["error"] in {"invalid_json", "invalid_field"}
    assert reconciliation_paused()


def test_it_names_the_field_in_the_error(staff_client):
    detail = put(staff_client, {"reconciliation_paused": "yes"}).json()["detail"]
    assert "reconciliation_paused" in detail

    detail = put(staff_client, {"reconciliation_paused": True, "extra": 1}).json()["detail"]
    assert "extra" in detail


def test_it_refuses_other_methods(staff_client):
    assert staff_client.post(STATUS).status_code == 405
    assert staff_client.delete(SETTINGS).status_code == 405
