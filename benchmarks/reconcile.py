"""The steady-state reconciliation pass at the scale of the goals.

1,000 presets (100 templates x 10 presets on their active versions, 10 prebuilds each) and
10,000 running, ready prebuilt workspaces with their builds, jobs and agents, inserted with
`bulk_create`. Every pass then finds nothing to do; we measure its wall time (median of
several passes) and its query count, and the query count at 10 presets to show it does not
grow with scale.
"""

from __future__ import annotations

import logging
import statistics
import time
import uuid
from typing import Any

TEMPLATES = 100
PRESETS_PER_TEMPLATE = 10
PREBUILDS_PER_PRESET = 10
BATCH = 2000


def _insert_pool(*, templates: int, offset: int) -> tuple[int, int]:
    """Insert `templates` templates with their presets and a full, ready pool; answer counts."""
    from django.db import transaction
    from django.utils import timezone

    from accounts.models import SYSTEM_USER_ID
    from accounts.services import organization_default
    from workspaces.models import (
        AgentLifecycle,
        BuildReason,
        JobStatus,
        ProvisionerJob,
        Template,
        TemplateVersion,
        TemplateVersionPreset,
        Workspace,
        WorkspaceAgent,
        WorkspaceBuild,
    )

    organization = organization_default()
    now = timezone.now()
    with transaction.atomic():
        template_rows = Template.objects.bulk_create(
            [
                Template(organization=organization, name=f"bench-{offset + index}")
                for index in range(templates)
            ]
        )
        versions = TemplateVersion.objects.bulk_create(
            [
                TemplateVersion(
                    template=template,
                    number=1,
                    name="v1",
                    provisioner="command",
                    parameters=[{"name": "repo", "default": "https://example.invalid"}],
                    agents=[{"name": "main", "startup_script": "true"}],
                )
                for template in template_rows
            ]
        )
        for template, version in zip(template_rows, versions, strict=True):
            template.active_version = version
        Template.objects.bulk_update(template_rows, ["active_version"])
        presets = TemplateVersionPreset.objects.bulk_create(
            [
                TemplateVersionPreset(
                    template_version=version,
                    name=f"preset-{index}",
                    parameters={"repo": f"https://example.invalid/{index}"},
                    desired_instances=PREBUILDS_PER_PRESET,
                )
                for version in versions
                for index in range(PRESETS_PER_TEMPLATE)
            ]
        )
        version_by_id = {version.id: version for version in versions}
        workspaces, jobs, builds, agents = [], [], [], []
        for preset in presets:
            version = version_by_id[preset.template_version_id]
            for _ in range(PREBUILDS_PER_PRESET):
                workspace = Workspace(
                    id=uuid.uuid4(),
                    organization=organization,
                    template_id=version.template_id,
                    owner_id=SYSTEM_USER_ID,
                    name=f"prebuild-{uuid.uuid4().hex[:16]}",
                    created_at=now,
                )
                job = ProvisionerJob(
                    id=uuid.uuid4(),
                    organization=organization,
                    status=JobStatus.SUCCEEDED,
                    started_at=now,
                    completed_at=now,
                )
                build = WorkspaceBuild(
                    id=uuid.uuid4(),
                    workspace=workspace,
                    build_number=1,
                    transition="start",
                    template_version=version,
                    preset=preset,
                    parameters=preset.parameters,
                    initiator_id=SYSTEM_USER_ID,
                    reason=BuildReason.PREBUILD,
                    job=job,
                )
                agent = WorkspaceAgent(
                    workspace=workspace,
                    build=build,
                    name="main",
                    token_key_id=uuid.uuid4().hex,
                    token_secret_hash=uuid.uuid4().hex,
                    lifecycle_state=AgentLifecycle.READY,
                    ready_at=now,
                    last_seen_at=now,
                )
                workspaces.append(workspace)
                jobs.append(job)
                builds.append(build)
                agents.append(agent)
        for model, rows in (
            (Workspace, workspaces),
            (ProvisionerJob, jobs),
            (WorkspaceBuild, builds),
            (WorkspaceAgent, agents),
        ):
            model.objects.bulk_create(rows, batch_size=BATCH)
    return len(presets), len(workspaces)


def _count_queries() -> tuple[int, int]:
    """Queries of one pass on the default connection, and the actions it took."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from prebuilds.reconciler import reconcile

    with CaptureQueriesContext(connection) as captured:
        result = reconcile()
    return len(captured), result.actions_taken


def run(*, quick: bool) -> dict[str, Any]:
    from django.db import connection

    from prebuilds.reconciler import reconcile

    logging.getLogger("prebuilds").setLevel(logging.WARNING)

    # Small scale first: 1 template, 10 presets, 100 prebuilds.
    _insert_pool(templates=1, offset=0)
    reconcile()  # warm-up: memberships, caches
    queries_small, _ = _count_queries()

    started = time.monotonic()
    _insert_pool(templates=TEMPLATES - 1, offset=1)
    insert_seconds = time.monotonic() - started
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")  # as autovacuum would after a bulk load

    reconcile()  # warm-up at full scale
    samples = []
    actions = 0
    for _ in range(5 if quick else 20):
        started = time.monotonic()
        result = reconcile()
        samples.append((time.monotonic() - started) * 1000)
        actions += result.actions_taken
        presets, workspaces = result.presets_seen, sum(p.state.actual for p in result.presets)
    queries, counted_actions = _count_queries()
    return {
        "reconcile_pass_ms": round(statistics.median(samples), 1),
        "reconcile_pass_max_ms": round(max(samples), 1),
        "reconcile_presets": presets,
        "reconcile_workspaces": workspaces,
        "reconcile_queries": queries,
        "reconcile_queries_10_presets": queries_small,
        "reconcile_steady_state_actions": actions + counted_actions,  # must be 0
        "reconcile_setup_insert_s": round(insert_seconds, 1),
    }
