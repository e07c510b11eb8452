"""Event-driven refill (``prebuilds.refill``): after commit, once per pass, safe with the lock.

On the real test broker (Redis): the refill tasks are read back from the ``control`` queue, the
pending flag from the shared cache. Transactional tests: "after commit" needs real commits.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import redis
from django.conf import settings
from django.core.cache import cache
from django.db import connection, transaction
from django.utils import timezone

from config import env
from prebuilds import refill
from prebuilds.models import ReconciliationPass
from prebuilds.reconciler import reconciliation_lock
from tests.accounts.factories import UserFactory
from tests.workspaces.factories import PresetFactory, prebuild
from workspaces import routing
from workspaces.creation import workspace_request
from workspaces.models import JobStatus, Workspace, WorkspaceBuild

pytestmark = pytest.mark.django_db(transaction=True)


def broker() -> redis.Redis:
    return redis.Redis.from_url(env.redis_url_of_broker(settings.CELERY_BROKER_URL))


def refills_queued() -> int:
    """Refill tasks waiting on the control queue."""
    client = broker()
    try:
        messages = [json.loads(raw) for raw in client.lrange(routing.CONTROL_QUEUE, 0, -1)]
    finally:
        client.close()
    return sum(m["headers"]["task"] == refill.REFILL_TASK for m in messages)


@pytest.fixture(autouse=True)
def _no_refill_pending():
    """Nothing pending or queued from an earlier test (nobody consumes ``control`` here)."""
    cache.delete(refill.PENDING_KEY)
    client = broker()
    client.delete(routing.CONTROL_QUEUE)
    client.close()
    yield
    cache.delete(refill.PENDING_KEY)


def test_a_claim_asks_for_one_pass_after_it_commits_never_before():
    preset = PresetFactory(desired_instances=2)
    prebuild(preset)
    prebuild(preset)

    with transaction.atomic():
        claimed = workspace_request(user=UserFactory(), name="dev", preset=preset)
        assert claimed.claimed_prebuild
        # Not committed: a pass now would read the pool as it was before the claim.
        assert refills_queued() == 0 and cache.get(refill.PENDING_KEY) is None

    assert refills_queued() == 1
    assert cache.get(refill.PENDING_KEY) is not None


def test_a_claim_that_rolls_back_asks_for_nothing():
    preset = PresetFactory(desired_instances=1)
    prebuild(preset)

    with pytest.raises(RuntimeError), transaction.atomic():
        workspace_request(user=UserFactory(), name="dev", preset=preset)
        raise RuntimeError("rolled back")

    assert refills_queued() == 0


def test_a_miss_asks_for_a_pass_too():
    preset = PresetFactory(desired_instances=1)

    workspace = workspace_request(user=UserFactory(), name="dev", preset=preset)

    assert not workspace.claimed_prebuild
    assert refills_queued() == 1


def test_claims_coalesce_until_a_pass_holds_the_lock():
    preset = PresetFactory(desired_instances=3)
    for _ in range(3):
        prebuild(preset)
    users = [UserFactory() for _ in range(3)]

    workspace_request(user=users[0], name="dev", preset=preset)
    workspace_request(user=users[1], name="dev", preset=preset)
    assert refills_queued() == 1  # the second found a pass on its way

    # The queued pass runs: once it holds the lock it clears the flag, then reads the snapshot.
    result = refill.refill_run()
    assert result.lock_acquired
    assert cache.get(refill.PENDING_KEY) is None
    # It saw both claims: two replacements are on their way.
    assert result.actions_taken == 2
    # A claim after that pass's snapshot asks for a pass of its own.
    workspace_request(user=users[2], name="dev", preset=preset)
    assert refills_queued() == 2


def test_requests_are_coalesced_however_many():
    sent = [refill.refill_request(reason="test") for _ in range(20)]

    assert sent.count(True) == 1 and refills_queued() == 1


def test_the_flag_expires_so_a_lost_task_only_delays_refills():
    refill.refill_request(reason="test")

    ttl = broker().ttl(cache.make_and_validate_key(refill.PENDING_KEY))

    assert 0 < ttl <= refill.pending_ttl() == 2 * settings.PREBUILDS_RECONCILIATION_INTERVAL


def test_a_refill_waits_for_a_running_pass_instead_of_skipping(settings):
    """Race: a periodic pass holding the lock may have read its snapshot before the claim; the
    refill must run after it, not return at once as a periodic pass does."""
    settings.PREBUILDS_RECONCILIATION_INTERVAL = 10
    preset = PresetFactory(desired_instances=1)
    refill.refill_request(reason="test")
    held, release = threading.Event(), threading.Event()

    def running_pass() -> None:
        try:
            with reconciliation_lock() as acquired:
                assert acquired
                held.set()
                release.wait(10)
        finally:
            connection.close()

    holder = threading.Thread(target=running_pass)
    holder.start()
    try:
        assert held.wait(10)
        released_at = []

        def release_lock() -> None:
            released_at.append(timezone.now())
            release.set()

        threading.Timer(0.5, release_lock).start()
        result = refill.refill_run()
    finally:
        release.set()
        holder.join(10)

    assert result.lock_acquired and result.actions_taken == 1
    # Recorded as starting when it got the lock (the gap metric reads it), not when it queued.
    assert ReconciliationPass.objects.get(lock_acquired=True).started_at >= released_at[0]
    assert Workspace.objects.filter(builds__preset=preset).count() == 1
    assert cache.get(refill.PENDING_KEY) is None


def test_a_refill_gives_up_after_its_wait_and_leaves_the_request_pending(settings):
    settings.PREBUILDS_RECONCILIATION_INTERVAL = 0.3
    PresetFactory(desired_instances=1)
    refill.refill_request(reason="test")

    with reconciliation_lock() as held:
        assert held
        started = time.monotonic()
        result = refill.refill_run()
        waited = time.monotonic() - started

    assert not result.lock_acquired and waited >= 0.3
    assert not Workspace.objects.exists()
    assert ReconciliationPass.objects.get().lock_acquired is False
    assert cache.get(refill.PENDING_KEY) is not None  # the periodic pass or its expiry covers it


def test_a_finished_prebuild_build_asks_for_a_pass():
    from workspaces.tasks import _refill_after_prebuild_build

    preset = PresetFactory(desired_instances=1)
    workspace = prebuild(preset, status=JobStatus.SUCCEEDED)
    people = prebuild(preset, status=JobStatus.SUCCEEDED)
    people.builds.update(reason="initiator")

    _refill_after_prebuild_build(people.builds.get().job)
    assert refills_queued() == 0
    _refill_after_prebuild_build(workspace.builds.get().job)
    assert refills_queued() == 1


def test_control_tasks_are_routed_to_the_control_queue():
    from config.celery import app

    app.loader.import_default_modules()
    for name in (
        "prebuilds.reconcile",
        refill.REFILL_TASK,
        "workspaces.fail_stale_jobs",
        "workspaces.requeue_pending_jobs",
    ):
        assert name in app.tasks
        route = app.amqp.router.route({}, name, (), {})
        assert route["queue"].name == routing.CONTROL_QUEUE, name


def test_no_claim_is_left_unrefilled_when_claims_race_the_passes(settings):
    """Race: claims commit while refill passes run (real threads on PostgreSQL). Whatever the
    interleaving, every claim is seen by a pass that started after it: once the last pending
    request is served, each claimed prebuild has exactly one replacement on its way."""
    settings.PREBUILDS_MAX_IN_FLIGHT = settings.PREBUILDS_MAX_IN_FLIGHT_PER_PRESET = 0
    claims = 12
    preset = PresetFactory(desired_instances=claims)
    for _ in range(claims):
        prebuild(preset)
    users = [UserFactory() for _ in range(claims)]
    claimed, failures = [], []
    done = threading.Event()

    def claimant(index: int, user) -> None:
        time.sleep(0.01 * index)  # spread over several passes: some commit while one runs
        try:
            claimed.append(workspace_request(user=user, name="dev", preset=preset))
        except BaseException as exc:  # reported below
            failures.append(exc)
        finally:
            connection.close()

    def control_worker() -> None:
        # What the control worker does with the queued task: a pass whenever one is pending.
        try:
            while not done.is_set():
                if cache.get(refill.PENDING_KEY) is not None:
                    refill.refill_run()
                time.sleep(0.005)
        finally:
            connection.close()

    worker = threading.Thread(target=control_worker)
    worker.start()
    threads = [threading.Thread(target=claimant, args=item) for item in enumerate(users)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    done.set()
    worker.join(30)
    if cache.get(refill.PENDING_KEY) is not None:
        refill.refill_run()  # the task still queued for the last request

    assert not failures, failures
    assert all(w.claimed_prebuild for w in claimed) and len(claimed) == claims
    replacements = WorkspaceBuild.objects.filter(
        preset=preset, reason="prebuild", job__status=JobStatus.PENDING
    ).count()
    assert replacements == claims
