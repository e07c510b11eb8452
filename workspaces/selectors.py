"""Reads for workspaces: what a user may see and use, with the related rows prefetched.

Visibility rules, in one place so the JSON API, the pages and the admin cannot drift apart:

- a user may *use* a template of an organization they are a member of, when the template is not
  deleted and has an active version; a preset is usable when its template is usable (whether
  it sits on the active version is checked by the creation service, which says so clearly);
- a user may *see* a workspace they own; staff see every workspace. Anything else is answered
  as "not found" by the callers, never "forbidden", so ids of other people's workspaces leak
  nothing.

Querysets returned here carry fixed ``select_related``/``prefetch_related`` sets: the
serializers and templates read only prefetched data, so a page or answer costs the same
number of queries for one row or a thousand.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Iterable

from django.db import connection
from django.db.models import F, Prefetch, QuerySet
from django.db.models.functions import Length, Right

from accounts.models import Membership, Organization, User
from config.sql import Columns, columns, fetch_one
from workspaces.models import (
    ACTIVE_JOB_STATUSES,
    AgentLifecycle,
    JobStatus,
    ProvisionerJob,
    Template,
    TemplateVersion,
    TemplateVersionPreset,
    Transition,
    Workspace,
    WorkspaceAgent,
    WorkspaceBuild,
)

# Attribute names the prefetches below fill in (``to_attr``); the serializers read them.
LATEST_BUILDS = "latest_builds"
CURRENT_AGENTS = "current_agents"

# Agent states that mean "still coming up": a page keeps polling while an agent is in one.
AGENT_SETTLING_STATES = (AgentLifecycle.CREATED, AgentLifecycle.STARTING)


def parse_uuid(value: object) -> uuid.UUID | None:
    """``value`` as a UUID, or None when it is not a well-formed UUID string."""
    if isinstance(value, uuid.UUID):
        return value
    if not isinstance(value, str):
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


# -- templates and presets ------------------------------------------------------------------


def _member_organizations(user: User) -> QuerySet:
    return Membership.objects.filter(user=user).values("organization_id")


def template_usable_queryset(*, user: User) -> QuerySet[Template]:
    """Templates ``user`` may create workspaces from (no prefetch; for lookups and forms)."""
    return Template.objects.filter(
        organization_id__in=_member_organizations(user),
        deleted=False,
        active_version__isnull=False,
    ).select_related("organization", "active_version")


def template_list_usable(*, user: User) -> QuerySet[Template]:
    """Usable templates with every version (newest first) and its presets prefetched.

    Three queries whatever the number of templates, versions and presets.
    """
    presets = TemplateVersionPreset.objects.order_by("name", "id")
    versions = TemplateVersion.objects.order_by("-number").prefetch_related(
        Prefetch("presets", queryset=presets)
    )
    return template_usable_queryset(user=user).prefetch_related(
        Prefetch("versions", queryset=versions)
    )


def template_get_usable(*, user: User, template_id: object) -> Template | None:
    """The usable template with this id, or None (unknown, malformed id, or not visible)."""
    parsed = parse_uuid(template_id)
    if parsed is None:
        return None
    return template_usable_queryset(user=user).filter(id=parsed).first()


def preset_usable_queryset(*, user: User, active_only: bool = False) -> QuerySet:
    """Presets whose template ``user`` may use; ``active_only``: only on active versions."""
    queryset = TemplateVersionPreset.objects.filter(
        template_version__template__organization_id__in=_member_organizations(user),
        template_version__template__deleted=False,
        template_version__template__active_version__isnull=False,
    ).select_related(
        "template_version",
        "template_version__template",
        "template_version__template__organization",
        "template_version__template__active_version",
    )
    if active_only:
        queryset = queryset.filter(
            template_version_id=F("template_version__template__active_version_id")
        )
    return queryset


@functools.cache
def _preset_sql() -> tuple[str, tuple[Columns, ...]]:
    groups = (
        columns(TemplateVersionPreset),
        # The version's template file can be large and the claim never reads it.
        columns(TemplateVersion, ("source",)),
        columns(Template),
        columns(Organization),
    )
    preset, version, template, organization = groups
    sql = f"""
    SELECT {preset.select("p")}, {version.select("v")}, {template.select("t")},
           {organization.select("o")}
    FROM {TemplateVersionPreset._meta.db_table} p
    JOIN {TemplateVersion._meta.db_table} v ON v.id = p.template_version_id
    JOIN {Template._meta.db_table} t ON t.id = v.template_id
    JOIN {Organization._meta.db_table} o ON o.id = t.organization_id
    WHERE p.id = %s
    """
    return sql, groups


def preset_get(*, preset_id: object) -> TemplateVersionPreset | None:
    """The preset with this id, its version, template and organization loaded; or None.

    No visibility rule: for callers that check use themselves (``workspaces.creation``). This
    is the first read of every claim, so it is one hand-written statement (``config.sql``)
    rather than an ORM ``select_related`` that costs more to compile than to run. The
    version's ``source`` is deferred.
    """
    parsed = parse_uuid(preset_id)
    if parsed is None:
        return None
    sql, groups = _preset_sql()
    loaded = fetch_one(sql, [parsed], *groups)
    if loaded is None:
        return None
    preset, version, template, organization = loaded
    template.organization = organization
    version.template = template
    preset.template_version = version
    return preset


def user_may_use_template(*, user: User, template: Template) -> bool:
    """True when ``user`` is a member of the template's organization (one indexed lookup)."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT EXISTS (SELECT 1 FROM {Membership._meta.db_table} "
            "WHERE user_id = %s AND organization_id = %s)",
            [user.id, template.organization_id],
        )
        return cursor.fetchone()[0]


# -- workspaces -----------------------------------------------------------------------------


def workspace_queryset() -> QuerySet[Workspace]:
    """Workspaces with what the JSON and the pages show, in a fixed number of queries.

    Each workspace gets ``latest_builds`` (a list of at most one build, with its job and
    initiator) and ``current_agents`` (agents not retired, by name).
    """
    # Job logs can be large and only the detail page shows them (``job_log_tail``).
    latest = (
        WorkspaceBuild.objects.select_related("job", "initiator")
        .defer("job__logs")
        .order_by("workspace_id", "-build_number")
        .distinct("workspace_id")
    )
    agents = (
        WorkspaceAgent.objects.filter(retired_at__isnull=True)
        .select_related("initialized_owner")
        .order_by("name", "id")
    )
    return Workspace.objects.select_related("owner", "organization", "template").prefetch_related(
        Prefetch("builds", queryset=latest, to_attr=LATEST_BUILDS),
        Prefetch("agents", queryset=agents, to_attr=CURRENT_AGENTS),
    )


def workspace_loaded(workspace: Workspace) -> Workspace:
    """``workspace`` as ``workspace_queryset()`` loads it: itself when it already is (a claim
    answers so), else fetched again."""
    if hasattr(workspace, LATEST_BUILDS) and hasattr(workspace, CURRENT_AGENTS):
        return workspace
    return workspace_queryset().get(id=workspace.id)


def workspace_visible_queryset(*, user: User) -> QuerySet[Workspace]:
    """Workspaces ``user`` may see: their own; every workspace for staff."""
    queryset = workspace_queryset()
    if user.is_staff:
        return queryset
    return queryset.filter(owner=user)


def workspace_get_visible(*, user: User, workspace_id: object) -> Workspace | None:
    """The workspace if ``user`` may see it, else None (unknown, malformed id, not visible).

    Deleted workspaces stay visible to their owner: their last build says how they ended.
    """
    parsed = parse_uuid(workspace_id)
    if parsed is None:
        return None
    return workspace_visible_queryset(user=user).filter(id=parsed).first()


def workspace_list(
    *, user: User, owner_username: str = "", include_prebuilds: bool = False
) -> QuerySet[Workspace]:
    """Live workspaces for the list page, newest first.

    Users see their own. Staff see everybody's, optionally only one owner's; prebuilds (owned
    by the system user) only with ``include_prebuilds``, since a healthy pool can hold far more
    of them than there are user workspaces.
    """
    queryset = workspace_queryset().filter(deleted=False).order_by("-created_at", "id")
    if not user.is_staff:
        return queryset.filter(owner=user)
    if owner_username:
        queryset = queryset.filter(owner__username=owner_username)
    if not include_prebuilds:
        queryset = queryset.filter(owner__is_system=False)
    return queryset


def latest_build(workspace: Workspace) -> WorkspaceBuild | None:
    """The latest build of a workspace from ``workspace_queryset()`` (no query)."""
    builds = getattr(workspace, LATEST_BUILDS)
    return builds[0] if builds else None


def current_agents(workspace: Workspace) -> list[WorkspaceAgent]:
    """The current agents of a workspace from ``workspace_queryset()`` (no query)."""
    return getattr(workspace, CURRENT_AGENTS)


def build_history(*, workspace: Workspace, limit: int = 20) -> list[WorkspaceBuild]:
    """The newest ``limit`` builds with job and initiator (one query)."""
    return list(
        WorkspaceBuild.objects.filter(workspace=workspace)
        .select_related("job", "initiator")
        .defer("job__logs")
        .order_by("-build_number")[:limit]
    )


def job_log_tail(*, job_id: uuid.UUID, chars: int) -> tuple[str, bool]:
    """The last ``chars`` characters of a job's log and whether it was cut (one query).

    The cut happens in the database, so polling a page with a huge log stays cheap.
    """
    row = (
        ProvisionerJob.objects.filter(id=job_id)
        .annotate(tail=Right("logs", chars), size=Length("logs"))
        .values_list("tail", "size")
        .first()
    )
    if row is None:
        return "", False
    tail, size = row
    return tail, size > chars


def workspace_is_settling(build: WorkspaceBuild | None, agents: Iterable[WorkspaceAgent]) -> bool:
    """Whether the workspace's state may still change without anyone asking.

    True while the latest build's job is active, and after a succeeded start while an agent is
    still coming up. After a failed or canceled start, or a stop or delete, agents that never
    reported will not start any more, so they do not keep a page polling.
    """
    if build is None:
        return False
    if build.job.status in ACTIVE_JOB_STATUSES:
        return True
    if build.transition == Transition.START and build.job.status == JobStatus.SUCCEEDED:
        return any(agent.lifecycle_state in AGENT_SETTLING_STATES for agent in agents)
    return False
