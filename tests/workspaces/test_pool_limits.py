"""``workspaces.pool_limits``: the per-preset maximum, the organization total and its lock."""

from __future__ import annotations

import threading
import time

import pytest
from django.db import connection, transaction

from accounts.services import organization_default
from prebuilds.services import PrebuildsError, preset_set_desired_instances
from tests.accounts.factories import OrganizationFactory
from tests.workspaces.factories import PresetFactory, TemplateFactory, TemplateVersionFactory
from workspaces.models import PresetSchedule, Template, TemplateVersionPreset
from workspaces.pool_limits import (
    PoolSize,
    PoolSizeError,
    organization_pool_peaks,
    pool_sizes_check,
    preset_pool_size,
)

pytestmark = pytest.mark.django_db

TOTAL_ABOVE = (
    "instances: the organization's prebuilt instances would total {after} (now {before}), "
    "above the maximum of 20 (PREBUILDS_MAX_INSTANCES_PER_ORGANIZATION)"
)


@pytest.fixture(autouse=True)
def limits(settings):
    settings.PREBUILDS_MAX_INSTANCES_PER_PRESET = 10
    settings.PREBUILDS_MAX_INSTANCES_PER_ORGANIZATION = 20
    return settings


def check(pools, **kwargs) -> None:
    kwargs.setdefault("organization_id", organization_default().id)
    kwargs.setdefault("total_field", "instances")
    with transaction.atomic():
        pool_sizes_check(pools=pools, **kwargs)


def refused(pools, **kwargs) -> list[str]:
    with pytest.raises(PoolSizeError) as info:
        check(pools, **kwargs)
    return info.value.messages


def total() -> int:
    peaks = organization_pool_peaks(organization_id=organization_default().id)
    return sum(peak for _, peak in peaks.values())


def test_it_refuses_every_count_above_the_per_preset_maximum_naming_each_field():
    pool = PoolSize(
        instances=11,
        instances_field="presets[0].prebuilds.instances",
        schedules=(("presets[0].prebuilds.schedule[0].instances", 3), ("s[1]", 1_000_000_000)),
    )

    assert refused([pool]) == [
        "presets[0].prebuilds.instances: 11 is above the maximum of 10 "
        "(PREBUILDS_MAX_INSTANCES_PER_PRESET)",
        "s[1]: 1000000000 is above the maximum of 10 (PREBUILDS_MAX_INSTANCES_PER_PRESET)",
    ]


def test_it_accepts_counts_at_the_maxima():
    check([PoolSize(10, "a"), PoolSize(None, "b", (("c", 10),))], activates_template_id=None)


def test_the_total_counts_each_active_presets_peak_on_live_templates_only():
    PresetFactory(desired_instances=3)
    scheduled = PresetFactory(desired_instances=1)
    PresetSchedule.objects.create(preset=scheduled, cron="* 9-17 * * *", instances=4)
    PresetFactory(desired_instances=None)
    deprecated = PresetFactory(desired_instances=2)
    Template.objects.filter(id=deprecated.template_version.template_id).update(deprecated=True)
    # Not counted: a deleted template, an inactive version, another organization.
    deleted = PresetFactory(desired_instances=7)
    Template.objects.filter(id=deleted.template_version.template_id).update(deleted=True)
    PresetFactory(template_version=TemplateVersionFactory(template=TemplateFactory()))
    PresetFactory(
        template_version=TemplateFactory(organization=OrganizationFactory()).active_version,
        desired_instances=9,
    )

    assert total() == 3 + 4 + 0 + 2


def test_a_change_up_to_the_total_is_accepted_and_one_above_is_refused():
    PresetFactory(desired_instances=10)
    PresetFactory(desired_instances=5)
    changed = PresetFactory(desired_instances=0)

    check([PoolSize(5, "instances", preset_id=changed.id)])
    messages = refused([PoolSize(6, "instances", preset_id=changed.id)])

    assert messages == [TOTAL_ABOVE.format(after=21, before=15)]


def test_schedules_count_at_their_peak():
    PresetFactory(desired_instances=10)
    PresetFactory(desired_instances=1)
    changed = PresetFactory(desired_instances=0)

    messages = refused([PoolSize(1, "instances", (("s", 10), ("t", 2)), preset_id=changed.id)])

    assert messages == [TOTAL_ABOVE.format(after=21, before=11)]


def test_an_organization_over_its_maximum_may_shrink_or_keep_but_not_grow():
    presets = [PresetFactory(desired_instances=10) for _ in range(3)]  # 30: the setting was lowered
    idle = PresetFactory(desired_instances=0)

    check([PoolSize(5, "instances", preset_id=presets[0].id)])  # 25: lower, accepted
    check([PoolSize(10, "instances", preset_id=presets[1].id)])  # 30: unchanged, accepted
    messages = refused([PoolSize(1, "instances", preset_id=idle.id)])

    assert messages == [TOTAL_ABOVE.format(after=31, before=30)]


def test_a_preset_of_an_inactive_version_does_not_count():
    PresetFactory(desired_instances=10)
    PresetFactory(desired_instances=10)
    inactive = PresetFactory(template_version=TemplateVersionFactory(template=TemplateFactory()))

    check([PoolSize(10, "instances", preset_id=inactive.id)])


def test_activating_replaces_what_the_template_counts_now():
    other = PresetFactory(desired_instances=10)
    pushed = PresetFactory(desired_instances=8)  # 18 in all
    template_id = pushed.template_version.template_id

    check([PoolSize(10, "a")], activates_template_id=template_id)  # 10 + 10
    messages = refused([PoolSize(6, "a"), PoolSize(5, "b")], activates_template_id=template_id)
    check([PoolSize(6, "a"), PoolSize(5, "b")])  # not activated: counts nothing

    assert messages == [TOTAL_ABOVE.format(after=21, before=18)]
    assert other.desired_instances == 10


@pytest.mark.django_db(transaction=True)
def test_it_needs_the_callers_transaction():
    # The lock must last until the caller's write commits; outside a transaction it could not.
    with pytest.raises(transaction.TransactionManagementError):
        pool_sizes_check(
            organization_id=organization_default().id, pools=[], total_field="instances"
        )


def _waiting_on_a_lock(pid: int) -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", [pid])
        row = cursor.fetchone()
    return row is not None and row[0] == "Lock"


@pytest.mark.django_db(transaction=True)
def test_two_writers_each_under_the_total_cannot_exceed_it_together():
    # Race: each change alone fits (10 + 8 = 18 <= 20); both together (26) do not. Without the
    # organization lock, the second writer reads the total before the first commits and both
    # are accepted. The first writer holds its transaction open until the second is seen
    # waiting on a lock (or has finished, which happens only without the lock).
    PresetFactory(desired_instances=10)
    first_preset = PresetFactory(desired_instances=0)
    second_preset = PresetFactory(desired_instances=0)
    checked, release = threading.Event(), threading.Event()
    second_pid: list[int] = []
    outcomes: dict[str, str] = {}

    def first():
        try:
            with transaction.atomic():
                preset_set_desired_instances(preset=first_preset, instances=8)
                checked.set()
                release.wait(30)
            outcomes["first"] = "ok"
        finally:
            connection.close()

    def second():
        try:
            checked.wait(30)
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid()")
                second_pid.append(cursor.fetchone()[0])
            try:
                preset_set_desired_instances(preset=second_preset, instances=8)
                outcomes["second"] = "ok"
            except PrebuildsError as exc:
                outcomes["second"] = str(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "second" not in outcomes:
        if second_pid and _waiting_on_a_lock(second_pid[0]):
            break
        time.sleep(0.02)
    release.set()
    for thread in threads:
        thread.join(30)

    assert outcomes == {
        "first": "ok",
        "second": "instances: the organization's prebuilt instances would total 26 (now 18), "
        "above the maximum of 20 (PREBUILDS_MAX_INSTANCES_PER_ORGANIZATION)",
    }
    stored = dict(TemplateVersionPreset.objects.values_list("id", "desired_instances"))
    assert (stored[first_preset.id], stored[second_preset.id]) == (8, 0)


def test_max_instances_of_a_goal_counts_as_the_peak():
    PresetFactory(desired_instances=1, target_hit_rate=0.9, min_instances=1, max_instances=8)
    PresetFactory(desired_instances=3)
    changed = PresetFactory(desired_instances=2)
    assert total() == 8 + 3 + 2

    def goal(maximum: int) -> PoolSize:
        return PoolSize(
            2, "instances", preset_id=changed.id, max_instances=maximum, max_instances_field="m"
        )

    assert refused([goal(11)]) == [
        "m: 11 is above the maximum of 10 (PREBUILDS_MAX_INSTANCES_PER_PRESET)"
    ]
    check([goal(9)])  # 8 + 3 + 9 = 20
    assert refused([goal(10)]) == [TOTAL_ABOVE.format(after=21, before=13)]


def test_editing_desired_instances_keeps_counting_the_stored_max_instances():
    goal = PresetFactory(desired_instances=1, target_hit_rate=0.9, max_instances=15)
    PresetFactory(desired_instances=4)
    # 15 + 4 = 19: the goal preset's fallback may go up to its bound without changing its peak.
    check([preset_pool_size(goal, instances=3, instances_field="instances")])
    other = PresetFactory(desired_instances=0)
    assert refused([preset_pool_size(other, instances=2, instances_field="instances")]) == [
        TOTAL_ABOVE.format(after=21, before=19)
    ]
