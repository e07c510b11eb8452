from __future__ import annotations

import pytest
from django.core.management import CommandError, call_command

from accounts.models import ApiToken
from accounts.services import api_token_create, api_token_revoke
from tests.accounts.factories import UserFactory

pytestmark = pytest.mark.django_db


def test_it_authenticates_with_a_bearer_token(client):
    alice = UserFactory(username="alice")
    token = api_token_create(user=alice)

    response = client.get("/api/v2/users/me", HTTP_AUTHORIZATION=f"Bearer {token}")

    assert response.status_code == 200
    assert response.json()["username"] == "alice"


def test_it_stores_only_a_hash(client):
    token = api_token_create(user=UserFactory())

    stored = ApiToken.objects.get()
    assert token.split("_", 2)[2] not in (stored.secret_hash, stored.key_id)
    assert token not in str(ApiToken.objects.values().get())


@pytest.mark.parametrize(
    "header",
    ["Bearer wst_nope_nope", "Bearer garbage", "Bearer ", "Basic abc", "Token x"],
)
def test_it_answers_401_json_to_a_wrong_token(client, header):
    api_token_create(user=UserFactory())

    response = client.get("/api/v2/users/me", HTTP_AUTHORIZATION=header)

    assert response.status_code == 401
    assert response.json()["error"] == "unauthorized"
    assert response.json()["detail"]


def test_it_answers_401_to_a_right_key_with_a_wrong_secret(client):
    token = api_token_create(user=UserFactory())
    wrong = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")

    response = client.get("/api/v2/users/me", HTTP_AUTHORIZATION=f"Bearer {wrong}")

    assert response.status_code == 401


def test_it_answers_401_without_credentials(client):
    response = client.get("/api/v2/users/me")

    assert response.status_code == 401
    assert response["Content-Type"] == "application/json"


def test_it_refuses_a_revoked_token(client):
    token = api_token_create(user=UserFactory())
    api_token_revoke(token=ApiToken.objects.get())

    response = client.get("/api/v2/users/me", HTTP_AUTHORIZATION=f"Bearer {token}")

    assert response.status_code == 401


def test_it_refuses_a_token_of_an_inactive_user(client):
    alice = UserFactory()
    token = api_token_create(user=alice)
    alice.is_active = False
    alice.save()

    response = client.get("/api/v2/users/me", HTTP_AUTHORIZATION=f"Bearer {token}")

    assert response.status_code == 401


def test_it_accepts_a_session_too(client):
    client.force_login(UserFactory(username="alice"))

    assert client.get("/api/v2/users/me").json()["username"] == "alice"


def test_it_answers_405_json_to_a_wrong_method(client):
    token = api_token_create(user=UserFactory())

    response = client.delete("/api/v2/users/me", HTTP_AUTHORIZATION=f"Bearer {token}")

    assert response.status_code == 405
    assert response.json()["error"] == "method_not_allowed"


def test_the_command_prints_only_a_working_token(client, capsys):
    UserFactory(username="alice")

    call_command("create_api_token", "alice")

    token = capsys.readouterr().out.strip()
    assert token.startswith("wst_") and "\n" not in token
    response = client.get("/api/v2/users/me", HTTP_AUTHORIZATION=f"Bearer {token}")
    assert response.json()["username"] == "alice"


@pytest.mark.parametrize("username", ["nobody", "prebuilds"])
def test_the_command_names_the_field_for_an_unknown_user(username):
    with pytest.raises(CommandError, match="username: no user named"):
        call_command("create_api_token", username)

    assert not ApiToken.objects.exists()


def test_revoking_from_the_admin_works(client):
    alice = UserFactory()
    api_token_create(user=alice)
    client.force_login(UserFactory(is_staff=True, is_superuser=True))

    response = client.post(
        "/admin/accounts/apitoken/",
        {"action": "revoke", "_selected_action": [str(ApiToken.objects.get().id)]},
    )

    assert response.status_code == 302
    assert ApiToken.objects.get().revoked_at is not None


def test_an_unknown_api_path_is_a_json_404(client):
    response = client.get("/api/v2/nope")

    assert response.status_code == 404
    assert response.json()["error"] == "not_found"


def test_an_unknown_page_is_still_an_html_404(client):
    response = client.get("/nope/")

    assert response.status_code == 404
    assert "text/html" in response["Content-Type"]
