from __future__ import annotations

import os

import pytest

TRANSACTIONAL = {"transactional_db", "live_server", "django_db_reset_sequences"}


def _database_fixture(request) -> str | None:
    """Which pytest-django database fixture this test uses, if any."""
    fixtures = set(request.fixturenames)
    marker = request.node.get_closest_marker("django_db")
    if fixtures & TRANSACTIONAL or (marker and marker.kwargs.get("transaction")):
        return "transactional_db"
    if "db" in fixtures or marker is not None:
        return "db"
    return None


@pytest.fixture(autouse=True)
def _system_rows(request):
    """Make sure the default organization and system user exist for database tests.

    Migrations create them, but transactional tests end with a TRUNCATE that removes them (row
    triggers do not fire on TRUNCATE), so later tests would otherwise run without them.
    """
    fixture = _database_fixture(request)
    if fixture is None:
        return
    request.getfixturevalue(fixture)
    from accounts.services import system_rows_ensure

    system_rows_ensure()


@pytest.fixture(scope="session")
def django_db_modify_db_settings(django_db_modify_db_settings_parallel_suffix):
    """One test database per pytest run (``test_<name>_<pid>``).

    Several suites may run at once against the same server (developers, CI's second run, the
    benchmark); a shared fixed name would let one run drop another's database mid-flight.
    """
    from django.conf import settings

    database = settings.DATABASES["default"]
    database.setdefault("TEST", {})["NAME"] = f"test_{database['NAME']}_{os.getpid()}"
