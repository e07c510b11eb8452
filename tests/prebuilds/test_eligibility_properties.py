"""One definition of a claimable prebuild: what the claim can take is what the core calls eligible.

For generated pools in the real database (builds running, failed or stopped; agents ready or
not, connected, disconnected, never heard from or long gone; prebuilds expired; the template
deprecated or deleted; the preset on an old version), claiming until the claim answers None
takes exactly the core's `eligible` of the reconciler's snapshot. Both read
`prebuilds.eligibility`; the core adds expiry and activity in Python, so a divergence in
either shows up here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import pytest
from django.db import connection, transaction
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from prebuilds.claims import claim_prebuild
from prebuilds.reconciliation import calculate_state
from prebuilds.selectors import reconciliation_snapshot
from tests.accounts.factories import UserFactory
from tests.workspaces.factories import (
    AgentFactory,
    PresetFactory,
    TemplateVersionFactory,
    prebuild,
)
from workspaces.models import WorkspaceBuild

pytestmark = pytest.mark.django_db

TIMEOUT = 30.0  # AGENT_DISCONNECT_TIMEOUT here; the grace period is the same
# How long ago an agent was last heard from, relative to the database's now().
SEEN = {
    "fresh": timedelta(seconds=1),
    "stale": timedelta(seconds=TIMEOUT + 10),  # disconnected, within the grace period
    "lost": timedelta(hours=1),  # disconnected past the grace period: unhealthy
    "never": None,
}


@dataclass(frozen=True)
class PrebuildSpec:
    status: str
    transition: str
    expired: bool
    agents: tuple[tuple[str, str], ...]  # (lifecycle state, SEEN key)
    no_agents: bool = False


@dataclass(frozen=True)
class PoolSpec:
    deprecated: bool
    deleted: bool
    old_version: bool
    prebuilds: tuple[PrebuildSpec, ...]


CLAIMABLE = PrebuildSpec("succeeded", "start", False, (("ready", "fresh"),))
STALE_AGENT = PrebuildSpec("succeeded", "start", False, (("ready", "fresh"), ("ready", "stale")))
LOST_AGENT = PrebuildSpec("succeeded", "start", False, (("ready", "lost"),))
OFF_AGENT = PrebuildSpec("succeeded", "start", False, (("off", "fresh"),))

prebuild_specs = st.builds(
    PrebuildSpec,
    status=st.sampled_from(["succeeded", "succeeded", "succeeded", "failed", "running"]),
    transition=st.sampled_from(["start", "start", "start", "stop"]),
    expired=st.integers(0, 3).map(lambda n: n == 3),
    agents=st.lists(
        st.tuples(
            st.sampled_from(["ready", "ready", "ready", "starting", "off"]),
            st.sampled_from(["fresh", "fresh", "fresh", "stale", "lost", "never"]),
        ),
        min_size=1,  # (a prebuild with no agent at all is the `no_agents` case)
        max_size=2,
    ).map(tuple),
    no_agents=st.integers(0, 9).map(lambda n: n == 9),
)
pool_specs = st.builds(
    PoolSpec,
    # Rare, and the largest value: Hypothesis starts from (and shrinks toward) the smallest.
    deprecated=st.integers(0, 5).map(lambda n: n == 5),
    deleted=st.integers(0, 5).map(lambda n: n == 5),
    old_version=st.integers(0, 5).map(lambda n: n == 5),
    prebuilds=st.lists(prebuild_specs, max_size=5).map(tuple),
)


def _database_now() -> datetime:
    # The claim judges with the transaction's now(); the snapshot is read at the same instant.
    with connection.cursor() as cursor:
        cursor.execute("SELECT now()")
        return cursor.fetchone()[0]


def _make_pool(spec: PoolSpec, now: datetime):
    preset = PresetFactory(
        desired_instances=len(spec.prebuilds), invalidate_after=timedelta(hours=1)
    )
    for number, item in enumerate(spec.prebuilds):
        age = timedelta(hours=2) if item.expired else timedelta(minutes=number + 1)
        workspace = prebuild(
            preset,
            status=item.status,
            transition=item.transition,
            created_at=now - age,
            agents=0,
        )
        build = WorkspaceBuild.objects.get(workspace=workspace)
        for index, (state, seen) in enumerate(() if item.no_agents else item.agents):
            ago = SEEN[seen]
            AgentFactory(
                build=build,
                name=f"agent{index}",
                lifecycle_state=state,
                lifecycle_changed_at=now - timedelta(hours=1),
                last_seen_at=None if ago is None else now - ago,
                created_at=now - timedelta(hours=1),
            )
    template = preset.template_version.template
    if spec.old_version:
        template.active_version = TemplateVersionFactory(template=template)
    template.deprecated, template.deleted = spec.deprecated, spec.deleted
    template.save()
    return preset


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(spec=pool_specs)
# The cases where the copies of the rule used to differ, always tried.
@example(spec=PoolSpec(True, False, False, (CLAIMABLE, CLAIMABLE)))  # deprecated template
@example(spec=PoolSpec(False, False, False, (CLAIMABLE, STALE_AGENT)))  # an agent disconnected
@example(spec=PoolSpec(False, False, False, (CLAIMABLE, LOST_AGENT, OFF_AGENT)))  # unhealthy
def test_the_claim_takes_exactly_the_cores_eligible(spec: PoolSpec, django_settings):
    with transaction.atomic():
        now = _database_now()
        preset = _make_pool(spec, now)
        entries = [e for e in reconciliation_snapshot(now=now).presets if e.id == preset.id]
        eligible = calculate_state(entries[0].snapshot, now).eligible if entries else 0
        user = UserFactory()

        taken = 0
        while claim_prebuild(user, preset, f"dev-{taken}") is not None:
            taken += 1
            assert taken <= len(spec.prebuilds)

        assert taken == eligible
        transaction.set_rollback(True)  # the next example starts from an empty database


@pytest.fixture
def django_settings(settings):
    settings.AGENT_DISCONNECT_TIMEOUT = TIMEOUT
    return settings
