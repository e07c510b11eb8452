"""Agent re-initialisation after a claim: level-triggered, fed by PostgreSQL LISTEN/NOTIFY.

Delivery guarantee (DESIGN.md §6): an agent must re-initialise after its workspace was claimed,
never miss that, and never do it twice for one claim. We get there with *levels*, not events:

* Each agent records the owner it last initialised for (``initialized_owner``, written when it
  fetches its manifest). A reinit is *due* when the workspace's owner differs from it and the
  workspace's latest build (the claim build) has succeeded. Whoever asks while it is due gets an
  answer at once — so an agent that was disconnected at claim time loses nothing, and an agent
  that re-fetched its manifest (restart, or after handling the event) is not told again.
* ``pg_notify`` (sent inside the claim build's completion transaction, so a rolled-back claim
  sends nothing) only *wakes* waiters early; every wake-up re-checks the level in the database.
  A notification lost while the listener was reconnecting costs nothing: after every
  (re)connect the listener wakes all waiters, and they re-check.

One web process holds one listening connection (``ReinitListener``) per event loop and fans
notifications out to every waiting request of that workspace.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, TypedDict, TypeVar
from uuid import UUID

import psycopg
from asgiref.sync import sync_to_async
from django.db import close_old_connections, connection

from config import env, outage
from config.loops import PerLoop
from workspaces.models import JobStatus, WorkspaceAgent, WorkspaceBuild

logger = logging.getLogger(__name__)

T = TypeVar("T")

CHANNEL = "workspace_reinit"
REASON_PREBUILD_CLAIMED = "prebuild_claimed"


class ReinitEvent(TypedDict):
    workspace_id: str
    owner_id: str
    reason: str


class DueReinit(NamedTuple):
    """A reinit that is due, with the id naming it on the SSE stream.

    ``event_id`` is ``"<build number>:<owner id>"``: the workspace's latest build (the claim
    build) and the owner it made. It stays the same for as long as this reinit is due, and a new
    claim or a later build makes a new one, so an SSE client that presents it back
    (``Last-Event-ID``) is not sent the reinit it has already seen, while a new one still reaches
    it.
    """

    event: ReinitEvent
    event_id: str


def notify_reinit(*, workspace_id: UUID, owner_id: UUID) -> None:
    """Queue the wake-up notification in the current transaction (delivered only on commit)."""
    payload = json.dumps({"workspace_id": str(workspace_id), "owner_id": str(owner_id)})
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_notify(%s, %s)", [CHANNEL, payload])


def reinit_due(agent_id: UUID) -> DueReinit | None:
    """The reinit due for this agent now, else None (two small queries)."""
    agent = (
        WorkspaceAgent.objects.select_related("workspace")
        .only("initialized_owner_id", "workspace__owner_id", "workspace__id")
        .filter(id=agent_id, retired_at__isnull=True, workspace__deleted=False)
        .first()
    )
    if agent is None or agent.workspace.owner_id == agent.initialized_owner_id:
        return None
    latest = (
        WorkspaceBuild.objects.filter(workspace_id=agent.workspace_id)
        .order_by("-build_number")
        .values_list("build_number", "job__status")
        .first()
    )
    if latest is None or latest[1] != JobStatus.SUCCEEDED:
        return None  # the claim build has not finished yet; its completion will notify
    event: ReinitEvent = {
        "workspace_id": str(agent.workspace_id),
        "owner_id": str(agent.workspace.owner_id),
        "reason": REASON_PREBUILD_CLAIMED,
    }
    return DueReinit(event, f"{latest[0]}:{agent.workspace.owner_id}")


def db_call(function: Callable[..., T]) -> Callable[..., Awaitable[T]]:
    """Run a synchronous database function from async code on a small shared thread pool.

    Not ``sync_to_async``'s default (thread-sensitive) mode: under ASGI, Django gives every
    request its own thread for that, and Django connections are per thread — so a thousand
    waiting agents would hold a thousand database connections for as long as they wait. The
    shared pool bounds the connections to its size (a handful), whatever the number of waiters.
    """

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> T:
        close_old_connections()  # a connection broken by a database restart is replaced
        try:
            return function(*args, **kwargs)
        finally:
            connection.close()  # back to the process's pool; threads hold none while idle

    return sync_to_async(call, thread_sensitive=False)


def _listen_params() -> dict[str, Any]:
    """psycopg connection keywords for the default database (same server and credentials)."""
    return env.psycopg_params_of(connection.settings_dict)


class ReinitListener:
    """One LISTEN connection fanning notifications out to waiting requests.

    ``subscribe`` before checking the level, ``wait`` after: a notification that arrives
    between the check and the wait has already set the event, so it cannot be missed.
    """

    # After this long without traffic the connection is probed, so a silently dead one is found.
    PROBE_INTERVAL = 30.0

    def __init__(self) -> None:
        self._waiters: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._task: asyncio.Task | None = None
        self.connected = asyncio.Event()
        self.reconnects = 0

    def subscribe(self, workspace_id: str) -> asyncio.Event:
        self._ensure_running()
        event = asyncio.Event()
        self._waiters[workspace_id].add(event)
        return event

    def unsubscribe(self, workspace_id: str, event: asyncio.Event) -> None:
        waiters = self._waiters.get(workspace_id)
        if waiters is not None:
            waiters.discard(event)
            if not waiters:
                del self._waiters[workspace_id]

    @property
    def waiting(self) -> int:
        return sum(len(events) for events in self._waiters.values())

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="reinit-listener")

    def _wake(self, workspace_id: str) -> None:
        for event in self._waiters.get(workspace_id, ()):
            event.set()

    def _wake_all(self) -> None:
        for events in self._waiters.values():
            for event in events:
                event.set()

    async def _run(self) -> None:
        delay = 0.2
        params = await db_call(_listen_params)()
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(**params, autocommit=True)
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self.connected.set()
                    outage.database.recovered()
                    # Anything notified while we were not listening is found by re-checking.
                    self._wake_all()
                    delay = 0.2
                    while True:
                        async for notify in conn.notifies(timeout=self.PROBE_INTERVAL):
                            self._dispatch(notify.payload)
                        await conn.execute("SELECT 1")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.connected.is_set():  # one line per disconnection, not per retry
                    logger.warning("reinit_listener_disconnected error=%r", exc)
                self.connected.clear()
                self.reconnects += 1
                if outage.is_database_unavailable(exc):
                    outage.database.failed(exc)
                await asyncio.sleep(delay)
                # At most 1 s apart: waiters re-check once it is back (web answers within 5 s).
                delay = min(delay * 2, 1.0)

    def _dispatch(self, payload: str) -> None:
        try:
            workspace_id = json.loads(payload)["workspace_id"]
        except (ValueError, KeyError, TypeError):
            logger.warning("reinit_listener_bad_payload payload=%r", payload[:200])
            return
        self._wake(workspace_id)


_listeners = PerLoop(ReinitListener)


def get_listener() -> ReinitListener:
    """The listener of the running event loop (one per web process under uvicorn)."""
    return _listeners.get()


async def wait_for_reinit(
    agent_id: UUID,
    workspace_id: UUID,
    timeout: float,
    *,
    heartbeat: float | None = None,
    seen: str | None = None,
) -> DueReinit | None:
    """Wait up to ``timeout`` seconds for a reinit of this agent to be due.

    Returns it as soon as it is due (at once when it already is), None on timeout. With
    ``heartbeat``, also returns None after that many seconds so a caller can send a ping. A due
    reinit whose ``event_id`` is ``seen`` (the caller has had it) counts as not due.
    """
    listener = get_listener()
    key = str(workspace_id)
    event = listener.subscribe(key)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + (min(timeout, heartbeat) if heartbeat else timeout)
    check = db_call(reinit_due)
    try:
        while True:
            event.clear()  # before the check: a notify during the check keeps it set
            due = await check(agent_id)
            if due is not None and due.event_id != seen:
                return due
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), remaining)
    finally:
        listener.unsubscribe(key, event)
