from __future__ import annotations

import pytest

from accounts.models import SYSTEM_USER_ID
from tests.accounts.factories import UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff_client(client):
    admin = UserFactory(username="root", is_staff=True, is_superuser=True)
    client.force_login(admin)
    return client


def test_it_hides_system_users_in_the_admin_changelist(staff_client):
    response = staff_client.get("/admin/accounts/user/")

    body = response.content.decode()
    assert response.status_code == 200
    assert f"/admin/accounts/user/{SYSTEM_USER_ID}/change/" not in body
    assert ">prebuilds</a>" not in body
    assert "root" in body


def test_it_lists_system_users_with_the_explicit_filter(staff_client):
    response = staff_client.get("/admin/accounts/user/?system=include")

    assert response.status_code == 200
    assert "prebuilds" in response.content.decode()


def test_it_lists_only_system_users_with_the_only_filter(staff_client):
    from accounts.models import User

    root = User.objects.get(username="root")

    response = staff_client.get("/admin/accounts/user/?system=only")

    body = response.content.decode()
    assert f"/admin/accounts/user/{SYSTEM_USER_ID}/change/" in body
    assert f"/admin/accounts/user/{root.id}/change/" not in body


def test_it_does_not_offer_to_change_the_system_user(staff_client):
    response = staff_client.post(
        f"/admin/accounts/user/{SYSTEM_USER_ID}/delete/?system=include", {"post": "yes"}
    )

    assert response.status_code in (302, 403)
    from accounts.services import system_user

    assert system_user().username == "prebuilds"
