"""Enqueueing a provisioner job from the event loop (the claim's fast path).

``jobs.job_enqueue`` publishes through Celery's ``send_task``: synchronous, and about a
millisecond of CPU per message on a small machine (producer pool, a new Redis client object per
message inside kombu, envelope building). On the event loop that would stall every other
request for as long. With a Redis broker (the default) ``job_enqueue_async`` instead writes the
very message kombu's Redis transport writes for ``send_task`` — the task message Celery itself
builds (``app.amqp.as_task_v2``), serialised and wrapped in the transport's envelope — with one
``LPUSH`` through ``redis.asyncio``. ``tests/workspaces/test_job_publisher.py`` compares it field
by field with what ``send_task`` writes, so an upgrade of Celery or kombu that changes the
format fails a test instead of losing builds. Other brokers (AMQP) take ``job_enqueue`` on a
thread.

Same guarantee as ``job_enqueue``: never raises; a job whose message is lost stays ``pending``
and the periodic sweep re-enqueues it.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import uuid
from typing import Any
from uuid import UUID

import redis.asyncio
from asgiref.sync import sync_to_async
from kombu import serialization

from config import env, outage
from config.loops import PerLoop
from workspaces.jobs import RUN_JOB_TASK, job_enqueue

logger = logging.getLogger(__name__)

# kombu's constants for what ``send_task`` publishes here: a persistent message of priority 0
# on the default exchange, routed by queue name; the Redis transport base64-encodes bodies.
PERSISTENT = 2


def job_message(job_id: UUID, queue: str) -> str:
    """What ``send_task(RUN_JOB_TASK, args=[job_id], queue=queue)`` pushes onto a Redis broker."""
    task_id, args = str(uuid.uuid4()), [str(job_id)]
    template = _task_message_template()
    # Only the ids and the argument differ between two messages of this task.
    headers = {**template.headers, "id": task_id, "root_id": task_id, "argsrepr": repr(args)}
    body = (args, *template.body[1:])
    content_type, encoding, data = serialization.dumps(body, serializer=_serializer())
    if isinstance(data, str):
        data = data.encode(encoding)
    envelope: dict[str, Any] = {
        "body": base64.b64encode(data).decode("ascii"),
        "content-encoding": encoding,
        "content-type": content_type,
        "headers": headers,
        "properties": {
            **template.properties,
            "correlation_id": task_id,
            "delivery_mode": PERSISTENT,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return json.dumps(envelope)


@functools.cache
def _task_message_template():
    """Celery's task message for this task, built once (building one costs ~0.1 ms of CPU)."""
    from config.celery import app

    return app.amqp.as_task_v2(
        "", RUN_JOB_TASK, args=[""], reply_to=app.thread_oid, ignore_result=None
    )


@functools.cache
def _serializer() -> str:
    from config.celery import app

    return app.conf.task_serializer


def _broker_client() -> redis.asyncio.Redis:
    from django.conf import settings

    return redis.asyncio.Redis.from_url(env.redis_url_of_broker(settings.CELERY_BROKER_URL))


_clients = PerLoop(_broker_client)


async def job_enqueue_async(job_id: UUID, queue: str) -> None:
    """``job_enqueue`` from the event loop: one ``LPUSH`` on a Redis broker. Never raises."""
    from django.conf import settings

    if env.redis_url_of_broker(settings.CELERY_BROKER_URL) is None:
        await sync_to_async(job_enqueue, thread_sensitive=False)(job_id, queue)
        return
    try:
        await _clients.get().lpush(queue, job_message(job_id, queue))
    except Exception as exc:  # the broker may be down; the sweep will retry
        outage.broker.failed(exc)  # logged once per interval, not once per job


async def aclose() -> None:
    """Close the running loop's broker client, if it made one."""
    client = _clients.pop()
    if client is not None:
        await client.aclose()
