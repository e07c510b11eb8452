"""The overview one web process shares between its viewers, with real threads on PostgreSQL."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
import time_machine
from django.db import connection
from django.utils import timezone

from prebuilds import dashboard
from tests.workspaces.factories import PresetFactory, prebuild

pytestmark = pytest.mark.django_db(transaction=True)


def counting_overview(monkeypatch) -> list[int]:
    """Count the overview's computations; each lasts long enough for every thread to queue."""
    calls: list[int] = []
    real = dashboard.overview

    def slow_overview(**kwargs):
        calls.append(1)
        time.sleep(0.2)
        return real(**kwargs)

    monkeypatch.setattr(dashboard, "overview", slow_overview)
    return calls


def in_threads(target, count: int) -> list:
    barrier = threading.Barrier(count)
    results: list = [None] * count

    def runner(index: int) -> None:
        try:
            barrier.wait()
            results[index] = target()
        except BaseException as exc:  # reported to the test
            results[index] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=runner, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


@pytest.mark.parametrize("share", ["overview_shared", "overview_fresh"])
def test_concurrent_viewers_cost_at_most_two_computations(monkeypatch, share):
    prebuild(PresetFactory(desired_instances=2))
    calls = counting_overview(monkeypatch)

    boards = in_threads(getattr(dashboard, share), 8)

    assert not [b for b in boards if isinstance(b, BaseException)], boards
    assert all(board.preset_count == 1 for board in boards)
    # The first computes; the others waited for it. A fresh one may compute once more for
    # those that arrived after the first had begun, never once per viewer.
    assert len(calls) <= 2


def test_a_fresh_overview_sees_what_was_committed_before_it_was_asked_for():
    preset = PresetFactory(desired_instances=2)
    before = dashboard.overview_fresh()
    prebuild(preset)

    after = dashboard.overview_fresh()

    assert dashboard.preset_row(before, preset.id).actual == 0
    assert dashboard.preset_row(after, preset.id).actual == 1
    assert dashboard.overview_shared() is after  # and polls are answered from it


def test_a_poll_is_answered_from_the_current_overview_while_the_next_is_computed(monkeypatch):
    preset = PresetFactory(desired_instances=2)
    old = dashboard.overview_shared()
    prebuild(preset)
    computing, release = threading.Event(), threading.Event()
    real = dashboard.overview

    def held_overview(**kwargs):
        computing.set()
        release.wait(30)
        return real(**kwargs)

    monkeypatch.setattr(dashboard, "overview", held_overview)
    expired = dashboard.OVERVIEW_MAX_AGE + timedelta(seconds=1)
    with time_machine.travel(timezone.now() + expired, tick=False):

        def recompute() -> None:
            try:
                dashboard.overview_shared()
            finally:
                connection.close()

        recomputing = threading.Thread(target=recompute)
        recomputing.start()
        assert computing.wait(30)

        meanwhile = dashboard.overview_shared()  # does not wait for the computation
        release.set()
        recomputing.join(30)
        after = dashboard.overview_shared()

    assert meanwhile is old
    assert dashboard.preset_row(after, preset.id).actual == 1
