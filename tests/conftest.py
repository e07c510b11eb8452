from __future__ import annotations

import contextlib
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


@pytest.fixture(scope="session", autouse=True)
def _fast_password_hashing():
    """Hash the tests' passwords with a thousand PBKDF2 rounds (see ``tests.hashers``)."""
    from django.test import override_settings

    with override_settings(PASSWORD_HASHERS=["tests.hashers.FastPBKDF2PasswordHasher"]):
        yield


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


@pytest.fixture(autouse=True)
def _no_shared_overview():
    """Each test starts without the dashboard's shared overview (prebuilds.dashboard), which a
    web process keeps for a second: a board computed by one test must not answer another's."""
    from prebuilds import dashboard

    dashboard.overview_forget()
    yield
    dashboard.overview_forget()


@pytest.fixture(scope="session")
def django_db_modify_db_settings(django_db_modify_db_settings_parallel_suffix):
    """One test database per pytest run (``test_<name>_<pid>``).

    Several suites may run at once against the same server (developers, CI's second run, the
    benchmark); a shared fixed name would let one run drop another's database mid-flight.
    """
    from django.conf import settings

    database = settings.DATABASES["default"]
    prefix = f"test_{database['NAME']}_"
    database.setdefault("TEST", {})["NAME"] = f"{prefix}{os.getpid()}"
    _drop_abandoned_test_databases(database, prefix)


def _drop_abandoned_test_databases(database: dict, prefix: str) -> None:
    """Drop test databases of earlier runs that died before their teardown.

    A run killed midway (timeout, Ctrl-C) leaves its ``<prefix><pid>`` database behind, and
    the embedded server would collect them run after run. Only databases that nobody is
    connected to go (no FORCE), so a run still going — here or on another machine sharing the
    server — keeps its database.
    """
    import psycopg
    from psycopg import sql

    from config import env

    params = {**env.psycopg_params_of(database), "dbname": "postgres"}
    with psycopg.connect(**params, autocommit=True) as admin:
        names = admin.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s "
            "AND datname NOT IN (SELECT datname FROM pg_stat_activity WHERE datname IS NOT NULL)",
            [prefix.replace("_", r"\_") + "%"],
        ).fetchall()
        for (name,) in names:
            with contextlib.suppress(psycopg.Error):  # someone connected meanwhile: keep it
                admin.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)))
