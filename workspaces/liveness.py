"""Agent liveness: when the control plane last heard from each agent (``last_seen_at``).

An agent is *connected* while it was heard from within ``AGENT_DISCONNECT_TIMEOUT`` seconds.
Heard from means: its manifest fetch, a lifecycle report, a heartbeat
(``POST /api/v2/workspaceagents/me/heartbeat``, which the agent program sends every
``heartbeat_interval()`` seconds), the start of a reinit long-poll or SSE stream, and, while such
a wait stays open, every ``heartbeat_interval()`` seconds (``WaitingAgents``): a waiting agent
stays connected, and one whose connection dropped stops being touched at once (Django cancels
an async view when its client disconnects).

Cost: ``last_seen_at`` is written only when it is older than ``write_interval()`` (a
conditional UPDATE, and a check of the row already loaded at authentication so a fresh one
costs no statement at all); the open waits of one web process are touched together, one
UPDATE per interval whatever their number.

Judging connectivity is SQL in ``prebuilds.eligibility`` (claims, snapshot, pages);
``agent_connection`` is its twin for one loaded agent (the API's ``connection`` field).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta
from typing import Literal
from uuid import UUID

from django.conf import settings
from django.utils import timezone

from config.loops import PerLoop
from workspaces.models import WorkspaceAgent

logger = logging.getLogger(__name__)

Connection = Literal["connected", "disconnected"]


def disconnect_timeout() -> timedelta:
    return timedelta(seconds=settings.AGENT_DISCONNECT_TIMEOUT)


def heartbeat_interval() -> float:
    """Seconds between an agent's reports: a third of the timeout, so two may be lost."""
    return settings.AGENT_DISCONNECT_TIMEOUT / 3


def write_interval() -> timedelta:
    """A ``last_seen_at`` younger than this is not rewritten (at most 5 s, well inside a
    heartbeat interval, so every heartbeat still lands)."""
    return timedelta(seconds=min(5.0, settings.AGENT_DISCONNECT_TIMEOUT / 6))


def agent_connection(agent: WorkspaceAgent, *, now: datetime | None = None) -> Connection:
    """``connected`` when ``agent`` was heard from within the timeout (the SQL twin is
    ``prebuilds.eligibility.agent_connected``)."""
    now = now or timezone.now()
    seen = agent.last_seen_at
    connected = seen is not None and seen >= now - disconnect_timeout()
    return "connected" if connected else "disconnected"


def agents_seen(agent_ids: Iterable[UUID], *, now: datetime | None = None) -> int:
    """Record that these (current) agents were heard from now; answers the rows written.

    Conditional on the stored time being older than ``write_interval()``: concurrent requests
    of one agent write once, and a busy agent costs one write per interval.
    """
    now = now or timezone.now()
    stale_before = now - write_interval()
    return (
        WorkspaceAgent.objects.filter(id__in=list(agent_ids), retired_at__isnull=True)
        .exclude(last_seen_at__gte=stale_before)
        .update(last_seen_at=now)
    )


def agent_seen_due(agent: WorkspaceAgent, *, now: datetime | None = None) -> bool:
    """Whether ``agents_seen`` would write for this loaded agent (no statement when not)."""
    now = now or timezone.now()
    return agent.last_seen_at is None or agent.last_seen_at < now - write_interval()


def agent_seen(agent: WorkspaceAgent, *, now: datetime | None = None) -> None:
    """``agents_seen`` for one authenticated agent, skipped when its row is fresh."""
    now = now or timezone.now()
    if agent_seen_due(agent, now=now):
        agents_seen([agent.id], now=now)
        agent.last_seen_at = now


class WaitingAgents:
    """The agents one web process (event loop) holds a reinit wait open for, touched together.

    ``holding(agent_id)`` around a wait registers it; a background task touches every
    registered agent each ``heartbeat_interval()`` seconds with one ``agents_seen``. The task
    stops when nobody waits and starts again with the next wait.
    """

    def __init__(self) -> None:
        self._held: Counter[UUID] = Counter()
        self._task: asyncio.Task | None = None

    @contextlib.contextmanager
    def holding(self, agent_id: UUID) -> Iterator[None]:
        self._held[agent_id] += 1
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="agent-liveness")
        try:
            yield
        finally:
            self._held[agent_id] -= 1
            if self._held[agent_id] <= 0:
                del self._held[agent_id]

    @property
    def held(self) -> frozenset[UUID]:
        return frozenset(self._held)

    async def _run(self) -> None:
        from workspaces.reinit import db_call  # the reinit module's shared thread pool

        touch = db_call(agents_seen)
        while self._held:
            await asyncio.sleep(heartbeat_interval())
            ids = list(self._held)
            if not ids:
                break
            try:
                await touch(ids)
            except Exception as exc:  # the database may be restarting; the next round retries
                logger.warning("agent_liveness_touch_failed agents=%d error=%r", len(ids), exc)


_waiting = PerLoop(WaitingAgents)


def waiting_agents() -> WaitingAgents:
    """This event loop's ``WaitingAgents``."""
    return _waiting.get()
