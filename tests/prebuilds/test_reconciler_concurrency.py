"""Races on real PostgreSQL with real threads (each thread has its own database connection)."""

from __future__ import annotations

import threading
import time

import pytest
from django.db import connection

from accounts.models import SYSTEM_USER_ID
from prebuilds import reconciler
from prebuilds.reconciler import prebuild_delete, reconcile
from tests.accounts.factories import UserFactory
from tests.workspaces.factories import PresetFactory, prebuild, system_user
from workspaces.models import Workspace, WorkspaceBuild

pytestmark = pytest.mark.django_db(transaction=True)


def run_threads(targets, timeout: float = 60) -> list:
    """Start one thread per callable behind a barrier; return their results (or exceptions)."""
    barrier = threading.Barrier(len(targets))
    results: list = [None] * len(targets)

    def runner(index, target):
        try:
            barrier.wait()
            results[index] = target()
        except BaseException as exc:  # reported to the test, not lost in the thread
            results[index] = exc
        finally:
            connection.close()

    threads = [
        threading.Thread(target=runner, args=(index, target))
        for index, target in enumerate(targets)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
        assert not thread.is_alive(), "a thread did not finish"
    return results


def test_five_concurrent_reconcilers_create_the_pool_once(monkeypatch):
    preset = PresetFactory(desired_instances=3)
    real_create = reconciler.workspace_create

    def slow_create(**kwargs):
        # Keeps the winning pass inside its lock long enough that every other thread tries
        # the lock while it is held, whatever the scheduling.
        time.sleep(0.2)
        return real_create(**kwargs)

    monkeypatch.setattr(reconciler, "workspace_create", slow_create)

    results = run_threads([reconcile] * 5)

    assert not [r for r in results if isinstance(r, BaseException)], results
    winners = [r for r in results if r.lock_acquired]
    assert len(winners) == 1
    assert winners[0].actions_taken == 3
    assert all(r.actions_taken == 0 and r.presets == () for r in results if not r.lock_acquired)
    prebuilds = Workspace.objects.filter(owner_id=SYSTEM_USER_ID, builds__preset=preset)
    assert prebuilds.count() == 3


def test_a_claim_racing_a_delete_never_loses_the_claimed_workspace():
    from prebuilds.claims import claim_prebuild

    preset = PresetFactory(desired_instances=0)
    users = [UserFactory() for _ in range(4)]
    owner = system_user()
    claimed_total = deleted_total = 0
    for round_number in range(15):
        ids = [prebuild(preset).id for _ in range(4)]

        def claim(user, name=f"dev-{round_number}"):
            # Never a WorkspaceConflict: a prebuild whose delete build committed while the
            # claim was selecting is re-checked after the lock and passed over.
            return claim_prebuild(user, preset, name)

        def delete_all(order):
            # The reconciler's view of the pool is from before the claims (a stale snapshot).
            # Two deleters (as from two overlapping passes) walk it in opposite orders.
            return {i for i in order if prebuild_delete(workspace_id=i, owner=owner)}

        results = run_threads(
            [lambda u=u: claim(u) for u in users]
            + [lambda ids=ids: delete_all(ids), lambda ids=ids: delete_all(ids[::-1])]
        )

        assert not [r for r in results if isinstance(r, BaseException)], results
        claims = [w.id for w in results[:-2] if w is not None]
        assert not results[-2] & results[-1]  # one delete build per prebuild
        deletes = results[-2] | results[-1]
        assert len(claims) == len(set(claims))
        assert not set(claims) & deletes
        for workspace in Workspace.objects.filter(id__in=ids):
            delete_builds = WorkspaceBuild.objects.filter(
                workspace=workspace, transition="delete"
            ).count()
            if workspace.owner_id == SYSTEM_USER_ID:
                assert delete_builds == 1 and workspace.id in deletes
            else:
                assert workspace.id in claims
                assert workspace.claimed_at is not None and not workspace.deleted
                assert delete_builds == 0
        claimed_total += len(claims)
        deleted_total += len(deletes)

    # Both sides won some of the races, or the test proved nothing.
    assert claimed_total > 0 and deleted_total > 0


def test_dry_runs_never_make_a_pass_skip():
    # Dashboards run dry runs all the time; one that took the lock to see whether it was free
    # made a pass that tried in that instant skip. Dry runs in a loop race real passes here.
    PresetFactory(desired_instances=0)
    stop = threading.Event()

    def dry_runs() -> int:
        count = 0
        while not stop.is_set():
            assert reconcile(dry_run=True).lock_acquired in (True, False)
            count += 1
        return count

    def passes() -> list[bool]:
        try:
            return [reconcile().lock_acquired for _ in range(60)]
        finally:
            stop.set()

    results = run_threads([dry_runs, dry_runs, passes])

    assert not [r for r in results if isinstance(r, BaseException)], results
    assert results[0] > 0 and results[1] > 0
    assert all(results[2]), f"{results[2].count(False)} of 60 passes skipped"
