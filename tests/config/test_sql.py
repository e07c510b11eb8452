"""Hand-written statements read back into models exactly as the ORM builds them."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from accounts.services import organization_default
from config.sql import columns, insert, load_row
from prebuilds.models import PrebuildClaim
from tests.accounts.factories import UserFactory
from tests.workspaces.factories import PresetFactory
from workspaces.models import ProvisionerJob, Template, TemplateVersion, TemplateVersionPreset

pytestmark = pytest.mark.django_db


def _select(sql: str, params: list) -> tuple:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()


def test_it_loads_joined_rows_like_the_orm_with_json_decoded_and_excluded_fields_deferred():
    preset = PresetFactory(
        parameters={"repo": "x", "depth": 3}, invalidate_after=timedelta(hours=2)
    )
    groups = (columns(TemplateVersionPreset), columns(TemplateVersion, ("source",)))
    row = _select(
        f"SELECT {groups[0].select('p')}, {groups[1].select('v')} "
        "FROM workspaces_templateversionpreset p "
        "JOIN workspaces_templateversion v ON v.id = p.template_version_id WHERE p.id = %s",
        [preset.id],
    )

    loaded, version = load_row(row, *groups)

    expected = TemplateVersionPreset.objects.get(id=preset.id)
    assert loaded.parameters == {"repo": "x", "depth": 3}  # decoded, not a JSON string
    assert loaded.invalidate_after == timedelta(hours=2)
    for field in TemplateVersionPreset._meta.concrete_fields:
        assert getattr(loaded, field.attname) == getattr(expected, field.attname), field.name
    assert version.agents == preset.template_version.agents
    assert version.get_deferred_fields() == {"source"}
    assert not loaded._state.adding and loaded._state.db == "default"


def test_it_inserts_what_save_would_insert():
    job = ProvisionerJob(organization=organization_default(), queue="host-a")
    sql, params = insert(job)
    with connection.cursor() as cursor:
        cursor.execute(sql, params)

    stored = ProvisionerJob.objects.get(id=job.id)
    assert (stored.queue, stored.status, stored.organization_id) == (
        "host-a",
        "pending",
        job.organization_id,
    )
    assert abs(stored.created_at - timezone.now()) < timedelta(minutes=1)


def test_it_leaves_an_auto_increment_key_to_the_database():
    preset, user = PresetFactory(), UserFactory()
    claim = PrebuildClaim(preset=preset, user=user, claimed=False, miss_reason="pool_empty")
    sql, params = insert(claim)
    with connection.cursor() as cursor:
        cursor.execute(sql, params)

    assert claim.pk is None
    assert PrebuildClaim.objects.filter(preset=preset, user=user, claimed=False).count() == 1


def test_the_column_lists_follow_the_models():
    template = columns(Template)
    assert len(template) == len(Template._meta.concrete_fields)
    assert template.select("t").split(", ")[0] == 't."id"'
