"""The reinit SSE stream read by a real SSE client (sseclient-py) from a real uvicorn server."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import httpx
import pytest
import sseclient

from accounts.models import SYSTEM_USER_ID
from prebuilds.claims import claim_prebuild
from tests.accounts.factories import UserFactory
from tests.processes import asgi_server
from tests.workspaces.factories import BuildFactory
from tests.workspaces.test_reinit import _complete_latest_build, _prebuilt_agent
from workspaces.reinit_api import SSE_RETRY_MS

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(scope="module")
def server(django_db_setup, django_db_blocker):
    with django_db_blocker.unblock(), asgi_server(REINIT_PING_INTERVAL="0.2") as url:
        yield url


def _events(server, agent, last_event_id: str | None = None) -> Iterator[sseclient.Event]:
    """The stream's events as sseclient-py parses them (the connection closes with the loop)."""
    headers = {"Authorization": f"Bearer {agent.plain_token}", "Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    url = f"{server}/api/v2/workspaceagents/me/reinit"
    with httpx.stream("GET", url, headers=headers, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        yield from sseclient.SSEClient(response.iter_bytes()).events()


def _claimed_agent():
    """A prebuild's agent whose workspace was claimed by alice and whose claim build succeeded."""
    workspace, agent = _prebuilt_agent()
    alice = UserFactory()
    claim_prebuild(alice, workspace.builds.get().preset, "dev")
    _complete_latest_build(workspace)
    return workspace, agent, alice


def _first_data_event(events: Iterator[sseclient.Event], max_pings: int) -> tuple[int, object]:
    """(pings before it, the `data` event) — or (pings, None) after ``max_pings`` pings."""
    for pings, event in enumerate(events):
        if event.event == "data":
            return pings, event
        assert event.event == "ping"
        if pings + 1 >= max_pings:
            return pings + 1, None
    raise AssertionError("the stream ended without an event")


def test_the_claim_event_carries_an_id_a_retry_hint_and_the_data_name(server):
    workspace, agent, alice = _claimed_agent()

    _, event = _first_data_event(_events(server, agent), max_pings=50)

    assert event is not None
    assert event.event == "data"  # Coder's name: EventSource.onmessage does not see it
    assert event.id == f"2:{alice.id}"  # the claim build (number 2) and the owner it made
    assert event.retry == str(SSE_RETRY_MS)
    assert json.loads(event.data) == {
        "workspace_id": str(workspace.id),
        "owner_id": str(alice.id),
        "reason": "prebuild_claimed",
    }


def test_pings_carry_the_retry_hint_and_no_id(server):
    _, agent = _prebuilt_agent()

    ping = next(_events(server, agent))

    assert (ping.event, ping.id, ping.retry) == ("ping", None, str(SSE_RETRY_MS))


def test_a_reconnect_presenting_the_seen_id_is_not_sent_the_event_again(server):
    _, agent, _ = _claimed_agent()
    _, first = _first_data_event(_events(server, agent), max_pings=50)

    pings, again = _first_data_event(_events(server, agent, last_event_id=first.id), max_pings=5)

    assert again is None, "the reinit the client has already seen was sent again"
    assert pings == 5  # the stream stayed open, pinging


def test_a_reconnect_presenting_an_older_id_is_sent_the_current_event(server):
    _, agent, alice = _claimed_agent()
    older = f"1:{SYSTEM_USER_ID}"

    _, event = _first_data_event(_events(server, agent, last_event_id=older), max_pings=50)

    assert event is not None
    assert event.id == f"2:{alice.id}"


def test_a_new_generation_reaches_a_stream_that_saw_the_previous_one(server):
    workspace, agent, alice = _claimed_agent()
    _, first = _first_data_event(_events(server, agent), max_pings=50)
    received: list[tuple[int, object]] = []
    pinged = threading.Event()

    def read() -> None:
        events = _events(server, agent, last_event_id=first.id)
        ping = next(events)
        assert ping.event == "ping"
        pinged.set()  # the stream is open and has skipped the seen event
        received.append(_first_data_event(events, max_pings=200))

    reader = threading.Thread(target=read)
    reader.start()
    assert pinged.wait(15)
    # A later build of the workspace (the agent never re-fetched its manifest): a new id.
    BuildFactory(workspace=workspace, initiator=alice)
    reader.join(timeout=60)

    assert not reader.is_alive()
    _, event = received[0]
    assert event is not None, "the new generation was never sent"
    assert event.id == f"3:{alice.id}"
