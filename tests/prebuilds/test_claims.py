from __future__ import annotations

import dataclasses
import threading
from datetime import timedelta

import psycopg
import pytest
from django.db import connection, transaction
from django.utils import timezone

from accounts.models import SYSTEM_USER_ID
from prebuilds import claims
from prebuilds.claims import claim_prebuild
from tests.accounts.factories import UserFactory
from tests.workspaces.factories import PresetFactory, TemplateVersionFactory, prebuild
from workspaces.models import Workspace, WorkspaceAgent, WorkspaceBuild
from workspaces.services import WorkspaceConflict, WorkspaceError

pytestmark = pytest.mark.django_db


def test_it_transfers_an_eligible_prebuild_with_a_claim_build():
    preset = PresetFactory()
    pool = prebuild(preset)
    alice = UserFactory()

    workspace = claim_prebuild(alice, preset, "dev")

    assert workspace.id == pool.id
    workspace.refresh_from_db()
    assert (workspace.owner, workspace.name) == (alice, "dev")
    assert workspace.claimed_prebuild
    build = workspace.builds.order_by("-build_number").first()
    assert (build.transition, build.is_claim, build.initiator, build.reason) == (
        "start",
        True,
        alice,
        "claim",
    )
    assert build.preset == preset
    assert build.job.status == "pending"


def test_it_answers_none_when_the_pool_is_empty():
    assert claim_prebuild(UserFactory(), PresetFactory(), "dev") is None


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda p: prebuild(p, ready=False), id="agent-not-ready"),
        pytest.param(lambda p: prebuild(p, status="running"), id="build-running"),
        pytest.param(lambda p: prebuild(p, status="failed"), id="build-failed"),
        pytest.param(lambda p: prebuild(p, transition="stop"), id="stopped"),
        pytest.param(lambda p: prebuild(p, agents=0), id="no-agents"),
    ],
)
def test_it_never_claims_an_ineligible_prebuild(make):
    preset = PresetFactory()
    make(preset)

    assert claim_prebuild(UserFactory(), preset, "dev") is None
    assert Workspace.objects.filter(owner_id=SYSTEM_USER_ID).count() == 1


def test_it_hands_out_the_oldest_eligible_prebuild_first():
    preset = PresetFactory()
    now = timezone.now()
    newest = prebuild(preset, created_at=now - timedelta(minutes=1))
    oldest = prebuild(preset, created_at=now - timedelta(minutes=30))
    middle = prebuild(preset, created_at=now - timedelta(minutes=10))
    alice = UserFactory()

    claimed = [claim_prebuild(alice, preset, f"dev-{n}").id for n in range(3)]

    assert claimed == [oldest.id, middle.id, newest.id]


def test_it_takes_only_this_presets_prebuilds_among_its_templates_pools():
    preset = PresetFactory()
    sibling = PresetFactory(template_version=preset.template_version)
    # Older prebuilds of another preset of the same template come first in the scan.
    for minutes in (50, 40, 30):
        prebuild(sibling, created_at=timezone.now() - timedelta(minutes=minutes))
    mine = prebuild(preset, created_at=timezone.now() - timedelta(minutes=5))

    assert claim_prebuild(UserFactory(), preset, "dev").id == mine.id
    assert claim_prebuild(UserFactory(), preset, "dev") is None


@pytest.fixture
def claim_statements(monkeypatch):
    """The statements the claim sends on its own cursor (Django's query capture misses them)."""
    sent: list[str] = []

    class Recording(psycopg.Cursor):
        def execute(self, query, params=None, **kwargs):
            sent.append(query)
            return super().execute(query, params, **kwargs)

    monkeypatch.setattr(claims.psycopg, "Cursor", Recording)
    return sent


def test_it_looks_past_the_window_of_oldest_candidates_when_none_of_them_is_eligible(
    monkeypatch, claim_statements
):
    monkeypatch.setattr(claims, "CANDIDATE_WINDOW", 2)
    preset = PresetFactory()
    sibling = PresetFactory(template_version=preset.template_version)
    for minutes in (50, 40):  # the whole window: another preset's prebuilds
        prebuild(sibling, created_at=timezone.now() - timedelta(minutes=minutes))
    mine = prebuild(preset, created_at=timezone.now() - timedelta(minutes=5))

    assert claim_prebuild(UserFactory(), preset, "dev").id == mine.id
    locks = claim_statements[:2]
    assert locks == [claims.ELIGIBLE_PREBUILD_SQL] * 2  # window, then the whole pool
    assert len(claim_statements) == 4  # then transfer and inserts


def test_a_claim_within_the_window_takes_one_lock_statement(claim_statements):
    preset = PresetFactory()
    pool = prebuild(preset)

    assert claim_prebuild(UserFactory(), preset, "dev").id == pool.id
    assert claim_statements == [
        claims.ELIGIBLE_PREBUILD_SQL,
        claims.TRANSFER_SQL,
        claim_statements[2],  # the inserts, whose text depends on the rows
    ]


def test_the_lock_walks_the_pool_oldest_first_and_stops_at_the_first_eligible_one():
    """On the generic plan the claim runs on, the pool is read in order and only until a
    prebuild is locked (not all judged, then sorted): the cost does not grow with the pool."""
    preset = PresetFactory()
    for minutes in range(30):
        prebuild(preset, created_at=timezone.now() - timedelta(minutes=minutes))
    params = claims._lock_tries(preset)[1]  # no window: the planner could sort the pool
    sql = claims.ELIGIBLE_PREBUILD_SQL.replace("%(template)s", "$1").replace("%(preset)s", "$2")
    sql = sql.replace("%(disconnect_timeout)s", "$4")
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")
        cursor.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        cursor.execute(
            "PREPARE lock_probe(uuid, uuid, bigint, float8) AS " + sql.replace("%(window)s", "$3")
        )
        cursor.execute(
            "EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE lock_probe(%s, %s, %s, %s)",
            [params["template"], params["preset"], params["window"], params["disconnect_timeout"]],
        )
        plan = cursor.fetchone()[0][0]["Plan"]
        cursor.execute("DEALLOCATE lock_probe")

    def path_to_candidates(node, above=()):
        """The plan nodes from the top down to the candidates' scan (None if there is none)."""
        if node.get("Alias") == "candidate":
            return [*above, node]
        for child in node.get("Plans", ()):
            if found := path_to_candidates(child, (*above, node)):
                return found
        return None

    path = path_to_candidates(plan)
    assert "Sort" not in [node["Node Type"] for node in path]  # ordered by the candidates
    assert path[-1]["Actual Rows"] == 1  # of 30: it stopped at the first


def stale_first_lock(monkeypatch) -> list:
    """The first prebuild locked looks as if its latest build changed before the lock (a build
    committed between the statement's snapshot and its lock): the guarded transfer must match
    nothing, and the claim look again. Answers the locks taken."""
    locks: list = []
    real = claims._Locked

    def locked(*row):
        lock = real(*row)
        locks.append(lock)
        if len(locks) == 1:
            return dataclasses.replace(lock, latest_build_number=lock.latest_build_number - 1)
        return lock

    monkeypatch.setattr(claims, "_Locked", locked)
    return locks


def test_a_prebuild_whose_latest_build_changed_before_the_lock_is_looked_at_again(monkeypatch):
    preset = PresetFactory()
    pool = prebuild(preset)
    locks = stale_first_lock(monkeypatch)

    workspace = claim_prebuild(UserFactory(), preset, "dev")

    assert [lock.id for lock in locks] == [pool.id, pool.id]  # the second look sees it current
    assert workspace.id == pool.id
    assert list(pool.builds.order_by("build_number").values_list("build_number", "is_claim")) == [
        (1, False),
        (2, True),
    ]


def test_one_agent_not_ready_makes_the_whole_prebuild_ineligible():
    preset = PresetFactory()
    pool = prebuild(preset, agents=2)
    WorkspaceAgent.objects.filter(id=pool.created_agents[1].id).update(lifecycle_state="starting")

    assert claim_prebuild(UserFactory(), preset, "dev") is None

    WorkspaceAgent.objects.filter(workspace=pool).update(lifecycle_state="ready")
    assert claim_prebuild(UserFactory(), preset, "dev").id == pool.id


def test_it_skips_expired_and_invalidated_prebuilds():
    preset = PresetFactory(invalidate_after=timedelta(hours=1))
    prebuild(preset, created_at=timezone.now() - timedelta(hours=2))
    invalidated = prebuild(preset, created_at=timezone.now() - timedelta(minutes=10))
    preset.last_invalidated_at = timezone.now() - timedelta(minutes=5)
    preset.save()

    assert claim_prebuild(UserFactory(), preset, "dev") is None

    fresh = prebuild(preset)
    assert claim_prebuild(UserFactory(), preset, "dev").id == fresh.id
    assert Workspace.objects.get(id=invalidated.id).owner_id == SYSTEM_USER_ID


def test_it_skips_prebuilds_of_a_version_that_is_no_longer_active():
    preset = PresetFactory()
    prebuild(preset)
    template = preset.template_version.template
    template.active_version = TemplateVersionFactory(template=template)
    template.save()

    assert claim_prebuild(UserFactory(), preset, "dev") is None


def test_a_taken_name_changes_nothing():
    preset = PresetFactory()
    pool = prebuild(preset)
    alice = UserFactory()
    Workspace.objects.create(
        organization=pool.organization, template=pool.template, owner=alice, name="dev"
    )
    builds = WorkspaceBuild.objects.count()

    with pytest.raises(WorkspaceConflict):
        claim_prebuild(alice, preset, "dev")

    pool.refresh_from_db()
    assert pool.owner_id == SYSTEM_USER_ID and pool.claimed_at is None
    assert WorkspaceBuild.objects.count() == builds


def test_a_bad_name_changes_nothing():
    preset = PresetFactory()
    prebuild(preset)

    with pytest.raises(WorkspaceError, match="name:"):
        claim_prebuild(UserFactory(), preset, "Not Valid")

    assert Workspace.objects.filter(owner_id=SYSTEM_USER_ID).count() == 1


def test_a_rolled_back_claim_leaves_the_prebuild_in_the_pool():
    preset = PresetFactory()
    pool = prebuild(preset)

    with pytest.raises(RuntimeError), transaction.atomic():
        claim_prebuild(UserFactory(), preset, "dev")
        raise RuntimeError("caller failed after the claim")

    pool.refresh_from_db()
    assert pool.owner_id == SYSTEM_USER_ID
    assert pool.builds.count() == 1


@pytest.mark.django_db(transaction=True)
def test_fifty_concurrent_claims_on_a_pool_of_twenty_never_share_a_workspace():
    preset = PresetFactory()
    pool = {prebuild(preset).id for _ in range(20)}
    users = [UserFactory() for _ in range(50)]
    barrier = threading.Barrier(50)
    claimed: list = []
    misses: list = []
    errors: list = []

    def claim(user):
        try:
            barrier.wait()
            workspace = claim_prebuild(user, preset, "dev")
            (claimed if workspace else misses).append(workspace.id if workspace else user.id)
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=claim, args=(user,)) for user in users]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert len(claimed) == 20 and len(misses) == 30
    assert set(claimed) == pool
    owners = Workspace.objects.filter(id__in=pool).values_list("owner_id", flat=True)
    assert len(set(owners)) == 20 and SYSTEM_USER_ID not in owners
    assert WorkspaceBuild.objects.filter(is_claim=True).count() == 20


def test_it_answers_the_workspace_loaded_for_the_answer_without_another_query(
    django_assert_num_queries,
):
    from workspaces import selectors, serializers

    preset = PresetFactory()
    pool = prebuild(preset, agents=2)
    alice = UserFactory()
    workspace = claim_prebuild(alice, preset, "dev")

    with django_assert_num_queries(0):
        answer = serializers.workspace_json(selectors.workspace_loaded(workspace))

    assert answer == serializers.workspace_json(selectors.workspace_queryset().get(id=pool.id))
    assert answer["latest_build"]["is_claim"] and answer["latest_build"]["status"] == "pending"
    # The agents are partial rows: what was not read loads on access, never from thin air.
    agent = selectors.current_agents(workspace)[0]
    assert agent.startup_script == type(agent).objects.get(id=agent.id).startup_script


# -- liveness and the one definition (issue 12) ------------------------------------------------


def _agents_last_seen(workspace: Workspace, seconds_ago: float | None) -> None:
    seen = None if seconds_ago is None else timezone.now() - timedelta(seconds=seconds_ago)
    WorkspaceAgent.objects.filter(workspace=workspace).update(last_seen_at=seen)


@pytest.mark.parametrize("seconds_ago", [31, 3600, None], ids=["just-gone", "long-gone", "never"])
def test_it_never_claims_a_prebuild_whose_agent_is_disconnected(settings, seconds_ago):
    settings.AGENT_DISCONNECT_TIMEOUT = 30
    preset = PresetFactory()
    gone = prebuild(preset)
    _agents_last_seen(gone, seconds_ago)

    assert claim_prebuild(UserFactory(), preset, "dev") is None
    assert Workspace.objects.get(id=gone.id).owner_id == SYSTEM_USER_ID


def test_it_claims_a_connected_prebuild_and_skips_one_whose_agent_is_gone(settings):
    """Of two agents, one gone is enough to skip the prebuild, even the oldest one."""
    settings.AGENT_DISCONNECT_TIMEOUT = 30
    preset = PresetFactory()
    now = timezone.now()
    half_gone = prebuild(preset, agents=2, created_at=now - timedelta(minutes=5))
    WorkspaceAgent.objects.filter(workspace=half_gone, name="agent1").update(
        last_seen_at=now - timedelta(seconds=40)
    )
    alive = prebuild(preset, agents=2, created_at=now - timedelta(minutes=1))
    _agents_last_seen(alive, 29)  # within the timeout: connected

    workspace = claim_prebuild(UserFactory(), preset, "dev")

    assert workspace is not None and workspace.id == alive.id
    assert Workspace.objects.get(id=half_gone.id).owner_id == SYSTEM_USER_ID


def test_it_never_claims_a_prebuild_of_a_deprecated_template():
    """The claim read `deleted` but not `deprecated`; the snapshot treats both as inactive."""
    preset = PresetFactory()
    prebuild(preset)
    template = preset.template_version.template
    template.deprecated = True
    template.save(update_fields=["deprecated"])

    assert claim_prebuild(UserFactory(), preset, "dev") is None
