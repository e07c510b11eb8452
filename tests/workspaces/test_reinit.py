"""The reinit endpoint against a real ASGI server (uvicorn) on the test database."""

from __future__ import annotations

import threading
import time

import httpx
import psycopg
import pytest
from django.db import connection, transaction

from accounts.models import SYSTEM_USER_ID
from prebuilds.claims import claim_prebuild
from tests.accounts.factories import UserFactory
from tests.processes import asgi_server
from tests.workspaces.factories import PresetFactory, prebuild
from workspaces import jobs
from workspaces.models import WorkspaceAgent
from workspaces.reinit import CHANNEL

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(scope="module")
def server(django_db_setup, django_db_blocker):
    with django_db_blocker.unblock(), asgi_server(REINIT_PING_INTERVAL="0.2") as url:
        yield url


def _prebuilt_agent():
    """A ready prebuild whose agent initialised for the system user, as a real one would."""
    workspace = prebuild(PresetFactory())
    agent = workspace.created_agents[0]
    WorkspaceAgent.objects.filter(id=agent.id).update(initialized_owner_id=SYSTEM_USER_ID)
    return workspace, agent


def _complete_latest_build(workspace) -> None:
    """Complete the claim build's job the way a worker does (this sends the notification)."""
    job_id = workspace.builds.order_by("-build_number").first().job_id
    assert jobs.job_acquire(job_id, worker="test")
    job = jobs.job_complete(job_id, worker="test", succeeded=True)
    assert job.status == "succeeded"


def _get(server, agent, wait=0, **headers):
    return httpx.get(
        f"{server}/api/v2/workspaceagents/me/reinit?wait={wait}",
        headers={"Authorization": f"Bearer {agent.plain_token}", **headers},
        timeout=30,
    )


def test_it_answers_at_once_when_a_claim_already_happened(server):
    workspace, agent = _prebuilt_agent()
    alice = UserFactory()
    claim_prebuild(alice, workspace.builds.get().preset, "dev")
    _complete_latest_build(workspace)

    response = _get(server, agent, wait=30)

    assert response.status_code == 200
    assert response.json() == {
        "workspace_id": str(workspace.id),
        "owner_id": str(alice.id),
        "reason": "prebuild_claimed",
    }


def test_it_answers_204_when_nothing_happens(server):
    _, agent = _prebuilt_agent()

    response = _get(server, agent, wait=1)

    assert response.status_code == 204


def test_it_waits_until_the_claim_build_succeeds(server):
    workspace, agent = _prebuilt_agent()
    claim_prebuild(UserFactory(), workspace.builds.get().preset, "dev")

    # Claimed, but the claim build has not run: not due yet.
    assert _get(server, agent, wait=0).status_code == 204


def test_a_waiting_agent_is_woken_by_the_claim(server):
    workspace, agent = _prebuilt_agent()
    answers = []

    def poll():
        started = time.monotonic()
        answers.append((_get(server, agent, wait=20), time.monotonic() - started))

    waiter = threading.Thread(target=poll)
    waiter.start()
    time.sleep(0.5)  # let the request reach its wait
    claim_prebuild(UserFactory(), workspace.builds.get().preset, "dev")
    _complete_latest_build(workspace)
    waiter.join()

    response, elapsed = answers[0]
    assert response.status_code == 200
    assert elapsed < 15, "woken by the notification, not by the timeout"


def test_an_agent_that_reinitialised_is_not_told_again(server):
    workspace, agent = _prebuilt_agent()
    alice = UserFactory()
    claim_prebuild(alice, workspace.builds.get().preset, "dev")
    _complete_latest_build(workspace)
    assert _get(server, agent).status_code == 200

    # What fetching the manifest records: initialised for the new owner.
    WorkspaceAgent.objects.filter(id=agent.id).update(initialized_owner_id=alice.id)

    assert _get(server, agent, wait=1).status_code == 204


def test_a_rolled_back_claim_sends_nothing(server):
    workspace, agent = _prebuilt_agent()
    listener = psycopg.connect(**_params(), autocommit=True)
    listener.execute(f"LISTEN {CHANNEL}")

    with pytest.raises(RuntimeError), transaction.atomic():
        claimed = claim_prebuild(UserFactory(), workspace.builds.get().preset, "dev")
        _complete_latest_build(claimed)  # even a completed claim build, inside the rollback
        raise RuntimeError("rolled back")

    assert list(listener.notifies(timeout=0.5)) == []
    listener.close()
    assert _get(server, agent, wait=1).status_code == 204


def test_the_listener_reconnects_and_misses_nothing(server):
    workspace, agent = _prebuilt_agent()
    answers = []

    def poll():
        started = time.monotonic()
        answers.append((_get(server, agent, wait=25), time.monotonic() - started))

    waiter = threading.Thread(target=poll)
    waiter.start()
    time.sleep(0.5)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE query LIKE 'LISTEN%%' AND pid <> pg_backend_pid()"
        )
        assert cursor.rowcount >= 1, "the server's listening connection was found and killed"
    # Claimed while the listener is (possibly) down: the re-check after reconnect finds it.
    claim_prebuild(UserFactory(), workspace.builds.get().preset, "dev")
    _complete_latest_build(workspace)
    waiter.join()

    response, elapsed = answers[0]
    assert response.status_code == 200
    assert elapsed < 20, "woken after the reconnect, not by the 25 s timeout"


def test_the_sse_stream_pings_then_delivers_the_event(server):
    workspace, agent = _prebuilt_agent()
    events: list[tuple[str, str]] = []

    def read():
        headers = {"Authorization": f"Bearer {agent.plain_token}", "Accept": "text/event-stream"}
        url = f"{server}/api/v2/workspaceagents/me/reinit"
        with httpx.stream("GET", url, headers=headers, timeout=30) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            name = None
            for line in response.iter_lines():
                if line.startswith("event: "):
                    name = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    events.append((name, line.removeprefix("data: ")))

    reader = threading.Thread(target=read)
    reader.start()
    deadline = time.monotonic() + 10
    while sum(1 for name, _ in events if name == "ping") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    claim_prebuild(UserFactory(), workspace.builds.get().preset, "dev")
    _complete_latest_build(workspace)
    reader.join(timeout=15)

    assert not reader.is_alive(), "the stream ends after the event"
    assert [name for name, _ in events[:2]] == ["ping", "ping"]
    name, data = events[-1]
    assert name == "data"
    assert httpx.Response(200, content=data).json()["workspace_id"] == str(workspace.id)


@pytest.mark.parametrize("token", ["", "Bearer nope", "Bearer wsa_x_y", "Basic abc"])
def test_it_refuses_bad_tokens(server, token):
    response = httpx.get(
        f"{server}/api/v2/workspaceagents/me/reinit?wait=0", headers={"Authorization": token}
    )

    assert response.status_code == 401
    assert response.json()["error"] == "unauthorized"


def test_it_refuses_the_token_of_a_retired_agent(server):
    _, agent = _prebuilt_agent()
    WorkspaceAgent.objects.filter(id=agent.id).update(retired_at="2026-01-01T00:00:00Z")

    assert _get(server, agent).status_code == 401


@pytest.mark.parametrize("wait", ["-1", "301", "soon"])
def test_it_refuses_a_bad_wait(server, wait):
    _, agent = _prebuilt_agent()

    response = _get(server, agent, wait=wait)

    assert response.status_code == 400
    assert "wait" in response.json()["detail"]


def _params():
    from workspaces.reinit import _listen_params

    return _listen_params()


def test_a_failed_claim_build_sends_nothing(server):
    workspace, agent = _prebuilt_agent()
    claim_prebuild(UserFactory(), workspace.builds.get().preset, "dev")
    listener = psycopg.connect(**_params(), autocommit=True)
    listener.execute(f"LISTEN {CHANNEL}")
    job_id = workspace.builds.order_by("-build_number").first().job_id

    assert jobs.job_acquire(job_id, worker="test")
    jobs.job_complete(job_id, worker="test", succeeded=False, error="boom")

    assert list(listener.notifies(timeout=0.5)) == []
    listener.close()
    assert _get(server, agent, wait=0).status_code == 204


def test_waiting_agents_do_not_each_hold_a_database_connection(server):
    import asyncio

    agents = [_prebuilt_agent()[1] for _ in range(60)]
    counts: list[int] = []

    def connections() -> int:
        try:
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
                return cursor.fetchone()[0]
        finally:
            connection.close()  # this runs on a helper thread with its own connection

    async def wait_all():
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(timeout=30, limits=limits) as client:
            polls = [
                client.get(
                    f"{server}/api/v2/workspaceagents/me/reinit?wait=4",
                    headers={"Authorization": f"Bearer {agent.plain_token}"},
                )
                for agent in agents
            ]
            counts.append(await asyncio.to_thread(connections))  # before: a baseline
            tasks = [asyncio.ensure_future(poll) for poll in polls]
            await asyncio.sleep(2)  # every request is now waiting
            counts.append(await asyncio.to_thread(connections))
            return await asyncio.gather(*tasks)

    answers = asyncio.run(wait_all())

    assert [a.status_code for a in answers] == [204] * 60
    # At most the web process's pool (DATABASE_POOL_SIZE, 10) plus its listening connection.
    assert counts[1] - counts[0] <= 11, f"{counts[1] - counts[0]} more connections for 60 agents"
