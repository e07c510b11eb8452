from __future__ import annotations

import pytest
from django.conf import settings
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY, authenticate
from django.db import IntegrityError, connection, transaction
from django.test import Client

from accounts.models import SYSTEM_USER_ID, Membership, User
from accounts.services import api_token_create, system_user
from tests.accounts.factories import UserFactory

pytestmark = pytest.mark.django_db


def test_it_hides_system_users_by_default():
    UserFactory(username="alice")

    assert list(User.objects.values_list("username", flat=True)) == ["alice"]
    assert User.objects.count() == 1
    assert not User.objects.filter(id=SYSTEM_USER_ID).exists()
    with pytest.raises(User.DoesNotExist):
        User.objects.get(username="prebuilds")


def test_it_shows_system_users_when_asked():
    UserFactory(username="alice")

    assert User.objects.all(include_system=True).count() == 2
    assert User.objects.get(username="prebuilds", include_system=True).id == SYSTEM_USER_ID
    assert User.objects.filter(is_system=True, include_system=True).count() == 1
    assert User.objects.exclude(username="alice", include_system=True).get().is_system


def test_it_has_the_fixed_system_user():
    user = system_user()

    assert user.username == "prebuilds"
    assert user.is_system
    assert not user.has_usable_password()
    assert not user.is_staff and not user.is_superuser
    assert not user.user_permissions.exists()
    assert Membership.objects.filter(user_id=SYSTEM_USER_ID, organization__slug="default").exists()


def test_it_resolves_foreign_keys_to_the_system_user():
    membership = Membership.objects.get(user_id=SYSTEM_USER_ID)

    assert membership.user.username == "prebuilds"


def test_it_hides_system_users_from_related_managers_and_pickers():
    alice = UserFactory(username="alice")
    organization = alice.memberships.get().organization

    assert list(organization.members.values_list("username", flat=True)) == ["alice"]
    field = Membership._meta.get_field("user").formfield()
    assert list(field.queryset) == [alice]


def test_it_refuses_password_login_for_the_system_user():
    assert authenticate(username="prebuilds", password="") is None
    assert authenticate(username="prebuilds", password="anything") is None


def test_it_refuses_a_session_for_the_system_user():
    # Forge a complete session for the system user: it must still not be logged in.
    # (force_login would fail earlier: updating last_login is refused by the trigger.)
    user = system_user()
    client = Client()
    session = client.session
    session[SESSION_KEY] = str(user.id)
    session[BACKEND_SESSION_KEY] = "accounts.backends.UserBackend"
    session[HASH_SESSION_KEY] = user.get_session_auth_hash()
    session.save()
    client.cookies[settings.SESSION_COOKIE_NAME] = session.session_key

    response = client.get("/")

    assert response.status_code == 302
    assert response["Location"].startswith("/login/")


def test_it_refuses_admin_login_for_the_system_user(client):
    response = client.post("/admin/login/", {"username": "prebuilds", "password": "x"})

    assert response.status_code == 200
    assert "correct username and password" in response.content.decode()
    assert "_auth_user_id" not in client.session


def test_it_refuses_the_login_page_for_the_system_user(client):
    response = client.post("/login/", {"username": "prebuilds", "password": "x"})

    assert response.status_code == 200
    assert "correct username and password" in response.content.decode()


def test_it_refuses_api_tokens_for_the_system_user():
    with pytest.raises(ValueError):
        api_token_create(user=system_user())


def test_it_refuses_a_stored_token_of_the_system_user(client):
    from accounts import tokens
    from accounts.models import ApiToken

    new = tokens.generate("wst")
    ApiToken.objects.create(user_id=SYSTEM_USER_ID, key_id=new.key_id, secret_hash=new.secret_hash)

    response = client.get("/api/v2/users/me", HTTP_AUTHORIZATION=f"Bearer {new.token}")

    assert response.status_code == 401


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE accounts_user SET is_superuser = true WHERE id = %s",
        "UPDATE accounts_user SET password = 'x' WHERE id = %s",
        "DELETE FROM accounts_user WHERE id = %s",
    ],
)
def test_it_refuses_changes_to_the_system_user_in_the_database(sql):
    with (
        pytest.raises(IntegrityError, match="system user"),
        transaction.atomic(),
        connection.cursor() as cursor,
    ):
        cursor.execute(sql, [str(SYSTEM_USER_ID)])

    user = system_user()
    assert not user.is_superuser
    assert not user.has_usable_password()


def test_it_refuses_turning_a_user_into_a_system_user():
    alice = UserFactory()

    with pytest.raises(IntegrityError, match="system user"), transaction.atomic():
        User.objects.filter(id=alice.id).update(is_system=True)

    alice.refresh_from_db()
    assert not alice.is_system


def test_it_lets_ordinary_users_change():
    alice = UserFactory()

    User.objects.filter(id=alice.id).update(first_name="Alice")

    alice.refresh_from_db()
    assert alice.first_name == "Alice"


def test_it_joins_new_users_to_the_default_organization():
    alice = UserFactory()

    assert [(m.organization.slug, m.role) for m in alice.memberships.all()] == [
        ("default", "member")
    ]
