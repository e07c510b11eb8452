"""A database outage answers 503 (JSON under /api/, HTML elsewhere) with Retry-After, logs once
per interval, and ends as soon as the database answers a connect again (config.outage).

Outages here are real: connects to a socket directory where no server listens.
"""

from __future__ import annotations

import logging

import psycopg
import pytest
from django.db import utils as db_utils
from django.test import override_settings
from django.urls import path

from config import outage

NO_SERVER = {"host": "/nonexistent-warmstart-socket-dir", "dbname": "none", "connect_timeout": 1}


def _connect_nowhere() -> None:
    psycopg.connect(**NO_SERVER)


def _view_failing_to_reach_the_database(request):
    _connect_nowhere()


def _view_with_a_query_error(request):
    raise psycopg.errors.SerializationFailure("could not serialize access")


urlpatterns = [
    path("api/v2/broken", _view_failing_to_reach_the_database),
    path("page", _view_failing_to_reach_the_database),
    path("api/v2/conflict", _view_with_a_query_error),
]
# Django reads the 500 handler from the URLconf: the site's own.
from config.urls import handler500  # noqa: E402, F401


@pytest.fixture(autouse=True)
def _fresh_outage_state(monkeypatch):
    """Each test starts with no outage and nothing logged yet (the state is per process)."""
    monkeypatch.setattr(outage, "database", outage.Outage("database", outage._probe_database))
    monkeypatch.setattr(outage, "broker", outage.Outage("broker"))


def _connect_error() -> psycopg.OperationalError:
    with pytest.raises(psycopg.OperationalError) as caught:
        _connect_nowhere()
    return caught.value


def test_connection_failures_count_as_unavailable_and_query_errors_do_not():
    connect_error = _connect_error()
    wrapped = db_utils.OperationalError(str(connect_error))
    wrapped.__cause__ = connect_error

    assert outage.is_database_unavailable(connect_error)
    assert outage.is_database_unavailable(wrapped)
    assert outage.is_database_unavailable(psycopg.errors.AdminShutdown("terminating"))
    assert outage.is_database_unavailable(psycopg.InterfaceError("the connection is closed"))
    assert not outage.is_database_unavailable(psycopg.errors.SerializationFailure("retry"))
    assert not outage.is_database_unavailable(psycopg.errors.DeadlockDetected("deadlock"))
    assert not outage.is_database_unavailable(ValueError("no"))
    assert not outage.is_database_unavailable(None)


@pytest.mark.django_db
@override_settings(ROOT_URLCONF=__name__)
def test_an_api_request_that_cannot_reach_the_database_is_a_json_503(client, caplog):
    client.raise_request_exception = False
    with caplog.at_level(logging.WARNING):
        response = client.get("/api/v2/broken")

    assert response.status_code == 503
    assert response["Content-Type"] == "application/json"
    assert response.json()["error"] == "unavailable"
    assert response.json()["detail"]
    assert response["Retry-After"] == str(outage.RETRY_AFTER)
    assert outage.database.down
    # Logged as the outage, not as a 5xx with a traceback.
    assert [r.name for r in caplog.records] == ["config.outage"], caplog.records


@pytest.mark.django_db
@override_settings(ROOT_URLCONF=__name__)
def test_a_page_that_cannot_reach_the_database_is_an_html_503(client):
    client.raise_request_exception = False
    response = client.get("/page")

    assert response.status_code == 503
    assert response["Content-Type"].startswith("text/html")
    assert b"Temporarily unavailable" in response.content
    assert response["Retry-After"] == str(outage.RETRY_AFTER)


@pytest.mark.django_db
@override_settings(ROOT_URLCONF=__name__)
def test_a_query_error_is_not_an_outage(client):
    client.raise_request_exception = False
    response = client.get("/api/v2/conflict")

    assert response.status_code == 500
    assert not outage.database.down


@pytest.mark.django_db
def test_while_down_requests_are_answered_503_before_the_view(client, admin_user, monkeypatch):
    client.force_login(admin_user)
    outage.database.failed(_connect_error())
    monkeypatch.setattr(outage.database, "probe", _connect_nowhere)  # the server is still gone
    monkeypatch.setattr(outage, "PROBE_INTERVAL", 0)

    response = client.get("/api/v2/users/me")

    assert response.status_code == 503
    assert response.json()["error"] == "unavailable"
    assert outage.database.down


@pytest.mark.django_db
def test_the_first_request_after_the_database_is_back_is_served(client, admin_user):
    client.force_login(admin_user)
    outage.database.failed(_connect_error())  # down, but the real probe reaches the database

    response = client.get("/api/v2/users/me")

    assert response.status_code == 200, response.content
    assert not outage.database.down


def test_an_outage_is_logged_once_per_interval_not_per_failure(caplog):
    error = _connect_error()
    with caplog.at_level(logging.WARNING, logger="config.outage"):
        for _ in range(50):
            outage.database.failed(error)
            outage.broker.failed(error)

    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0].startswith("outage kind=database failures=1 ")
    assert lines[1].startswith("outage kind=broker failures=1 ")


@pytest.mark.django_db
@override_settings(ROOT_URLCONF=__name__, DEBUG=True)
def test_with_debug_on_it_is_still_a_json_503_not_the_debug_page(client):
    client.raise_request_exception = False
    response = client.get("/api/v2/broken")

    assert response.status_code == 503
    assert response.json()["error"] == "unavailable"
