"""Event-driven refill: a claim, a miss or a finished prebuild build asks for a pass at once.

The periodic pass (every ``PREBUILDS_RECONCILIATION_INTERVAL``) is the safety net; without
these requests a claimed prebuild's replacement would start up to a whole interval later, and a
paced fill (``prebuilds.pacing``) would move one batch per interval.

Coalescing. Requests set one key in the shared cache (Redis: ``SET NX EX``); only the request
that sets it enqueues the ``prebuilds.refill`` task (on the control queue). That task waits for
the reconciler's advisory lock, clears the key *once it holds the lock*, then reads the
snapshot. So a request that found the key set is always seen by a pass: the key was still set,
so the task holding it had not read its snapshot yet, and will read it after the request's
transaction committed. At most one refill waits in the queue at a time, so a burst of
claims costs a pass or two, never one each. The key
expires after ``2 × PREBUILDS_RECONCILIATION_INTERVAL``, so a lost task message (a broker
restart) delays refills until then, and the periodic pass covers the gap.

A refill is a whole reconciliation pass: one pass serves every preset that changed meanwhile
and costs 11 queries (369 ms at 1,000 presets and 10,000 prebuilds on the development machine,
a few milliseconds for a handful of pools), against a second code path for one preset.

Requests are made only after the claim's transaction committed (``transaction.on_commit``, or
after the fast path's own commit): a pass must never read the snapshot from before the claim.
They never raise: a broken cache or broker only delays the refill until the periodic pass.
"""

from __future__ import annotations

import logging
import math
from uuid import UUID

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.cache import cache

from workspaces import routing

logger = logging.getLogger(__name__)

REFILL_TASK = "prebuilds.refill"
PENDING_KEY = "prebuilds:refill-pending"


def pending_ttl() -> int:
    """Seconds a refill request stays pending without a pass to clear it."""
    return max(math.ceil(2 * settings.PREBUILDS_RECONCILIATION_INTERVAL), 1)


def refill_request(*, reason: str, preset_id: UUID | None = None) -> bool:
    """Ask for a reconciliation pass soon; answer whether this call enqueued one.

    Call it after the change committed. Never raises.
    """
    try:
        if not cache.add(PENDING_KEY, 1, pending_ttl()):
            return False  # a pass is already on its way and will see this change
        _send()
    except Exception:  # a cache or broker outage: the periodic pass refills instead
        logger.exception("prebuilds_refill_request_failed reason=%s", reason)
        return False
    logger.info("prebuilds_refill_requested reason=%s preset_id=%s", reason, preset_id)
    return True


async def refill_request_async(*, reason: str, preset_id: UUID | None = None) -> bool:
    """``refill_request`` from the event loop: one Redis ``SET NX`` per call; the task is sent
    (on a thread) only by the rare call that set the key. Never raises."""
    try:
        if not await cache.aadd(PENDING_KEY, 1, pending_ttl()):
            return False
        await sync_to_async(_send, thread_sensitive=False)()
    except Exception:
        logger.exception("prebuilds_refill_request_failed reason=%s", reason)
        return False
    logger.info("prebuilds_refill_requested reason=%s preset_id=%s", reason, preset_id)
    return True


def _send() -> None:
    from config.celery import app

    # A refill older than the key is worthless: a later request (or the periodic pass) covers it.
    app.send_task(REFILL_TASK, queue=routing.CONTROL_QUEUE, expires=pending_ttl())


def refill_run():
    """The task's body: one pass, waiting up to an interval for a pass already running (its
    snapshot may predate the change that asked for this one). Answers the ``PassResult``."""
    from prebuilds.reconciler import reconcile

    return reconcile(wait=settings.PREBUILDS_RECONCILIATION_INTERVAL, on_locked=_clear)


def _clear() -> None:
    try:
        cache.delete(PENDING_KEY)
    except Exception:  # the key expires on its own; requests meanwhile are coalesced into us
        logger.exception("prebuilds_refill_clear_failed")
