"""``GET /api/v2/workspaces``: who sees what, filters, keyset pagination, bad parameters."""

from __future__ import annotations

import datetime as dt
import threading
import uuid

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from accounts.models import SYSTEM_USER_ID
from accounts.services import api_token_create
from tests.accounts.factories import UserFactory
from tests.workspaces.factories import (
    AgentFactory,
    BuildFactory,
    PresetFactory,
    TemplateFactory,
    WorkspaceFactory,
    prebuild,
)
from workspaces import listing
from workspaces.models import JobStatus, Transition, Workspace

pytestmark = pytest.mark.django_db

URL = "/api/v2/workspaces"


def auth(user) -> dict[str, str]:
    return {"HTTP_AUTHORIZATION": f"Bearer {api_token_create(user=user)}"}


@pytest.fixture
def alice():
    return UserFactory(username="alice")


@pytest.fixture
def bob():
    return UserFactory(username="bob")


@pytest.fixture
def staff():
    return UserFactory(username="operator", is_staff=True)


def names(response) -> list[str]:
    assert response.status_code == 200, response.content
    return [w["name"] for w in response.json()["workspaces"]]


def walk(client: Client, headers: dict[str, str], query: str = "", between=None) -> list[str]:
    """Every name, page by page (``between(page_number)`` runs after each page)."""
    seen: list[str] = []
    url = f"{URL}?{query}"
    for number in range(1000):
        response = client.get(url, **headers)
        seen += names(response)
        cursor = response.json()["next_cursor"]
        if cursor is None:
            return seen
        if between is not None:
            between(number)
        url = f"{URL}?{query}&cursor={cursor}"
    raise AssertionError("no last page")


def test_it_lists_the_callers_own_workspaces_oldest_first(client, alice, bob):
    start = timezone.now()
    for index, name in enumerate(["b", "a", "c"]):
        WorkspaceFactory(owner=alice, name=name, created_at=start + dt.timedelta(seconds=index))
    WorkspaceFactory(owner=bob, name="bobs")
    prebuild(PresetFactory())

    response = client.get(URL, **auth(alice))

    assert names(response) == ["b", "a", "c"]
    assert response.json()["next_cursor"] is None
    assert set(response.json()["workspaces"][0]) >= {"id", "owner", "latest_build", "agents"}


def test_it_answers_401_without_credentials(client):
    response = client.get(URL)

    assert response.status_code == 401
    assert response.json()["error"] == "unauthorized"


def test_a_user_never_sees_other_owners_even_when_naming_them(client, alice, bob):
    WorkspaceFactory(owner=bob, name="bobs")
    prebuild(PresetFactory())
    headers = auth(alice)

    for owner in ("bob", str(bob.id), "prebuilds", str(SYSTEM_USER_ID), "nobody"):
        assert names(client.get(f"{URL}?owner={owner}", **headers)) == [], owner


def test_a_user_may_name_themselves(client, alice):
    WorkspaceFactory(owner=alice, name="mine")

    assert names(client.get(f"{URL}?owner=alice", **auth(alice))) == ["mine"]
    assert names(client.get(f"{URL}?owner={alice.id}", **auth(alice))) == ["mine"]


def test_staff_see_every_owner_but_prebuilds_only_when_asked(client, alice, bob, staff):
    WorkspaceFactory(owner=alice, name="alices")
    WorkspaceFactory(owner=bob, name="bobs")
    pooled = prebuild(PresetFactory())
    headers = auth(staff)

    assert sorted(names(client.get(URL, **headers))) == ["alices", "bobs"]
    assert names(client.get(f"{URL}?owner=bob", **headers)) == ["bobs"]
    assert names(client.get(f"{URL}?owner={alice.id}", **headers)) == ["alices"]
    assert names(client.get(f"{URL}?owner=prebuilds", **headers)) == [pooled.name]
    assert names(client.get(f"{URL}?owner={SYSTEM_USER_ID}", **headers)) == [pooled.name]
    assert names(client.get(f"{URL}?owner=nobody", **headers)) == []


def test_it_filters_by_template(client, alice):
    python, go = TemplateFactory(), TemplateFactory()
    WorkspaceFactory(owner=alice, template=python, name="py")
    WorkspaceFactory(owner=alice, template=go, name="go")
    headers = auth(alice)

    assert names(client.get(f"{URL}?template_id={python.id}", **headers)) == ["py"]
    assert names(client.get(f"{URL}?template_id={uuid.uuid4()}", **headers)) == []


@pytest.mark.parametrize(
    ("transition", "job_status", "status"),
    [
        (Transition.START, JobStatus.PENDING, "pending"),
        (Transition.START, JobStatus.RUNNING, "starting"),
        (Transition.START, JobStatus.SUCCEEDED, "running"),
        (Transition.STOP, JobStatus.RUNNING, "stopping"),
        (Transition.STOP, JobStatus.SUCCEEDED, "stopped"),
        (Transition.DELETE, JobStatus.RUNNING, "deleting"),
        (Transition.START, JobStatus.FAILED, "failed"),
        (Transition.STOP, JobStatus.CANCELING, "canceling"),
        (Transition.START, JobStatus.CANCELED, "canceled"),
    ],
)
def test_it_filters_by_the_latest_builds_status(client, alice, transition, job_status, status):
    target = WorkspaceFactory(owner=alice, name="target")
    BuildFactory(workspace=target, transition=Transition.START, job__status=JobStatus.SUCCEEDED)
    BuildFactory(workspace=target, transition=transition, job__status=job_status)
    other = WorkspaceFactory(owner=alice, name="other")
    # An older build in the filtered state does not count: only the latest one does.
    BuildFactory(workspace=other, transition=transition, job__status=job_status)
    latest = Transition.START if status == "stopped" else Transition.STOP
    BuildFactory(workspace=other, transition=latest, job__status=JobStatus.SUCCEEDED)

    assert names(client.get(f"{URL}?status={status}", **auth(alice))) == ["target"]


def test_deleted_workspaces_are_listed_only_with_status_deleted(client, alice):
    gone = WorkspaceFactory(owner=alice, name="gone", deleted=True)
    BuildFactory(workspace=gone, transition=Transition.DELETE, job__status=JobStatus.SUCCEEDED)
    live = WorkspaceFactory(owner=alice, name="live")
    BuildFactory(workspace=live)
    headers = auth(alice)

    assert names(client.get(URL, **headers)) == ["live"]
    assert names(client.get(f"{URL}?status=deleted", **headers)) == ["gone"]


def test_pages_cover_every_workspace_once_in_order(client, alice):
    start = timezone.now()
    created = [
        WorkspaceFactory(owner=alice, name=f"w{i:02}", created_at=start + dt.timedelta(seconds=i))
        for i in range(7)
    ]

    response = client.get(f"{URL}?limit=3", **auth(alice))

    assert names(response) == ["w00", "w01", "w02"]
    assert walk(client, auth(alice), "limit=3") == [w.name for w in created]


def test_an_empty_cursor_is_the_first_page(client, alice):
    WorkspaceFactory(owner=alice, name="only")

    assert names(client.get(f"{URL}?cursor=", **auth(alice))) == ["only"]


def test_rows_with_the_same_created_at_are_ordered_by_id_and_none_is_lost(client, alice):
    moment = timezone.now()
    same = [WorkspaceFactory(owner=alice, name=f"t{i}", created_at=moment) for i in range(5)]

    seen = walk(client, auth(alice), "limit=2")

    assert seen == [w.name for w in sorted(same, key=lambda w: w.id)]


def test_paging_is_stable_under_inserts_and_deletes_between_pages(client, alice):
    """Rows inserted anywhere (before the cursor, at its very timestamp, at the end) or deleted
    while a client pages never make it skip or repeat a row that existed when it started."""
    start = timezone.now()
    existing = [
        WorkspaceFactory(owner=alice, name=f"e{i:02}", created_at=start + dt.timedelta(seconds=i))
        for i in range(9)
    ]
    headers = auth(alice)
    inserted: list[str] = []

    def meanwhile(page: int) -> None:
        if page > 1:
            return
        last = existing[3 * page + 2]  # about where the cursor is: its timestamp makes a tie
        for suffix, when in (
            ("before", start - dt.timedelta(seconds=1)),
            ("tie", last.created_at),  # same timestamp as the cursor: id decides
            ("after", timezone.now() + dt.timedelta(hours=1)),
        ):
            name = f"n{page}-{suffix}"
            WorkspaceFactory(owner=alice, name=name, created_at=when)
            inserted.append(name)
        if page == 0:
            Workspace.objects.filter(id=existing[8].id).update(deleted=True)

    seen = walk(client, headers, "limit=3", between=meanwhile)

    assert len(seen) == len(set(seen)), "a row was repeated"
    assert [n for n in seen if n.startswith("e")] == [w.name for w in existing[:8]]
    # Rows inserted at the end are reached; those before the cursor are (rightly) behind it.
    assert {"n0-after", "n1-after"} <= set(seen)
    assert not {"n0-before", "n1-before"} & set(seen)


@pytest.mark.django_db(transaction=True)
def test_paging_is_stable_while_another_thread_inserts(alice):
    """A real writer thread commits new workspaces while the client pages through."""
    start = timezone.now() - dt.timedelta(minutes=1)
    existing = [
        WorkspaceFactory(owner=alice, name=f"e{i:02}", created_at=start + dt.timedelta(seconds=i))
        for i in range(20)
    ]
    template = existing[0].template
    headers = auth(alice)
    stop = threading.Event()
    written: list[int] = []

    def writer() -> None:
        try:
            while not stop.is_set() and len(written) < 200:
                Workspace.objects.create(
                    owner=alice,
                    template=template,
                    organization=template.organization,
                    name=f"new-{len(written)}",
                )
                written.append(1)
        finally:
            connection.close()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        seen = walk(Client(), headers, "limit=4")
    finally:
        stop.set()
        thread.join()

    assert written, "the writer never wrote"
    assert len(seen) == len(set(seen))
    assert [n for n in seen if n.startswith("e")] == [w.name for w in existing]


def test_a_page_costs_the_same_queries_for_one_row_or_many(client, alice):
    def page_queries(limit: int) -> int:
        headers = auth(alice)
        with CaptureQueriesContext(connection) as queries:
            response = client.get(f"{URL}?limit={limit}", **headers)
        assert len(response.json()["workspaces"]) == limit
        return len(queries)

    preset = PresetFactory()
    for index in range(25):
        workspace = WorkspaceFactory(owner=alice, template=preset.template_version.template)
        AgentFactory(build=BuildFactory(workspace=workspace, preset=preset), name=f"a{index}")

    one = page_queries(1)
    many = page_queries(25)

    assert one == many
    # Authentication (token and its user), the page, its latest builds, its agents.
    assert many <= 6


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("limit=0", "limit"),
        ("limit=-1", "limit"),
        ("limit=abc", "limit"),
        (f"limit={listing.MAX_LIMIT + 1}", "limit"),
        ("limit=1&limit=2", "limit"),
        ("cursor=nonsense", "cursor"),
        ("cursor=WyJ4IiwgInkiXQ", "cursor"),  # base64 of a JSON list that is no position
        ("template_id=not-a-uuid", "template_id"),
        ("status=sleeping", "status"),
        ("owner=", "owner"),
        ("sort=name", "sort"),
    ],
)
def test_bad_parameters_are_400_naming_the_parameter(client, alice, query, parameter):
    response = client.get(f"{URL}?{query}", **auth(alice))

    assert response.status_code == 400
    body = response.json()
    assert body["error"] == "invalid_parameter"
    assert body["detail"].startswith(f"{parameter}:")


def test_the_default_limit_applies(client, alice):
    for _ in range(listing.DEFAULT_LIMIT + 1):
        WorkspaceFactory(owner=alice)

    response = client.get(URL, **auth(alice))

    assert len(response.json()["workspaces"]) == listing.DEFAULT_LIMIT
    assert response.json()["next_cursor"] is not None
