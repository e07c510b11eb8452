"""The event loop's job publisher writes exactly the message Celery's ``send_task`` writes."""

from __future__ import annotations

import asyncio
import base64
import json
import uuid

import redis
from django.conf import settings

from config import env
from config.celery import app
from workspaces import job_publisher
from workspaces.jobs import RUN_JOB_TASK

# Differ between any two messages (fresh ids), or name the queue each was sent to.
PER_MESSAGE = {
    "headers": ("id", "root_id"),
    "properties": ("correlation_id", "delivery_tag"),
}


def _pop(client: redis.Redis, queue: str) -> dict:
    [raw] = client.lrange(queue, 0, -1)
    client.delete(queue)
    message = json.loads(raw)
    message["body"] = json.loads(base64.b64decode(message["body"]))
    assert message["headers"]["id"] == message["headers"]["root_id"]
    assert message["properties"]["correlation_id"] == message["headers"]["id"]
    assert message["properties"]["delivery_info"]["routing_key"] == queue
    for part, keys in PER_MESSAGE.items():
        for key in keys:
            message[part].pop(key)
    message["properties"]["delivery_info"].pop("routing_key")
    return message


def test_the_message_is_the_one_send_task_writes():
    client = redis.Redis.from_url(env.redis_url_of_broker(settings.CELERY_BROKER_URL))
    celery_queue, ours = f"test-celery-{uuid.uuid4().hex}", f"test-ours-{uuid.uuid4().hex}"
    job_id = uuid.uuid4()

    async def publish() -> None:
        await job_publisher.job_enqueue_async(job_id, ours)
        await job_publisher.aclose()

    try:
        app.send_task(RUN_JOB_TASK, args=[str(job_id)], queue=celery_queue)
        asyncio.run(publish())
        sent_by_celery, sent_by_us = _pop(client, celery_queue), _pop(client, ours)
    finally:
        client.delete(celery_queue, ours)
        client.close()

    assert sent_by_us == sent_by_celery
    assert sent_by_us["headers"]["task"] == RUN_JOB_TASK
    assert sent_by_us["body"][0] == [str(job_id)]


def test_two_messages_carry_fresh_ids():
    first = json.loads(job_publisher.job_message(uuid.uuid4(), "q"))
    second = json.loads(job_publisher.job_message(uuid.uuid4(), "q"))

    for part, keys in PER_MESSAGE.items():
        for key in keys:
            assert first[part][key] != second[part][key]
    assert first["body"] != second["body"]
