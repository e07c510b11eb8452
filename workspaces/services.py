"""Writes for workspaces: create a workspace, insert builds.

Every build is inserted together with its provisioner job in one transaction, and the job is
handed to Celery only after that transaction commits (a worker must never see a job id whose row
does not exist yet). Execution lives in ``workspaces.jobs``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import partial
from uuid import UUID

from django.db import IntegrityError, transaction
from django.utils import timezone

from accounts import tokens
from accounts.models import User
from workspaces import jobs, routing
from workspaces.models import (
    ACTIVE_JOB_STATUSES,
    BuildReason,
    Provisioner,
    ProvisionerJob,
    Template,
    TemplateVersion,
    TemplateVersionPreset,
    Transition,
    Workspace,
    WorkspaceAgent,
    WorkspaceBuild,
)

WORKSPACE_NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$")


class WorkspaceError(Exception):
    """A refused workspace operation; ``code`` is a stable identifier, ``status`` an HTTP hint."""

    status = 400

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail


class WorkspaceConflict(WorkspaceError):
    status = 409


def workspace_name_validate(name: object) -> str:
    """The name if it is valid (lowercase letters, digits, inner dashes, 1-64), else an error."""
    if not isinstance(name, str) or not WORKSPACE_NAME_RE.fullmatch(name):
        raise WorkspaceError(
            "invalid_name",
            "name: use 1-64 lowercase letters, digits and dashes, starting and ending with a "
            "letter or digit.",
        )
    return name


def parameter_text(value: object) -> str:
    """A parameter value as the text a startup script sees (``true``/``false`` for booleans)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def build_parameters(version: TemplateVersion, preset: TemplateVersionPreset | None) -> dict:
    """Effective parameter values: the version's defaults overlaid with the preset's values."""
    values = {p["name"]: parameter_text(p.get("default", "")) for p in version.parameters}
    if preset is not None:
        values.update({k: parameter_text(v) for k, v in preset.parameters.items()})
    return values


@transaction.atomic
def workspace_create(
    *,
    owner: User,
    template: Template,
    name: str,
    preset: TemplateVersionPreset | None = None,
    initiator: User | None = None,
    reason: str = BuildReason.INITIATOR,
) -> Workspace:
    """Create a workspace on the template's active version and insert its first start build.

    Raises ``WorkspaceError`` for a bad name, a template without an active version or a preset
    of another version, and ``WorkspaceConflict`` when the owner already has a live workspace
    of that name (checked by the database's unique constraint, so two racing requests cannot
    both win). Nothing is written on error.
    """
    workspace_name_validate(name)
    version = template.active_version
    if template.deleted or version is None:
        raise WorkspaceError("template_unavailable", "template: it has no active version.")
    if preset is not None and preset.template_version_id != version.id:
        raise WorkspaceError(
            "invalid_preset", "template_version_preset_id: preset is not on the active version."
        )
    try:
        with transaction.atomic():
            workspace = Workspace.objects.create(
                organization_id=template.organization_id,
                template=template,
                owner=owner,
                name=name,
            )
    except IntegrityError:
        raise WorkspaceConflict(
            "name_taken", f"name: you already have a workspace named {name!r}."
        ) from None
    build_create(
        workspace=workspace,
        transition=Transition.START,
        initiator=initiator or owner,
        reason=reason,
        template_version=version,
        preset=preset,
    )
    return workspace


def job_queue(*, version: TemplateVersion, host_queue: str, prebuild: bool = False) -> str:
    """The Celery queue of a build's job on ``version`` for a workspace with ``host_queue``.

    Later builds of a local workspace must run on the worker host that holds its processes.
    A ``prebuild`` build (the reconciler's) goes to the prebuild queues, everything else (claims,
    people's builds) to the people's queues, whose workers the pool never occupies
    (``workspaces.routing``).
    """
    if version.provisioner != Provisioner.LOCAL:
        host_queue = ""
    return routing.build_queue(host_queue=host_queue, prebuild=prebuild)


@transaction.atomic
def build_create(
    *,
    workspace: Workspace,
    transition: str,
    initiator: User,
    reason: str = BuildReason.INITIATOR,
    is_claim: bool = False,
    template_version: TemplateVersion | None = None,
    preset: TemplateVersionPreset | None = None,
) -> WorkspaceBuild:
    """Insert the next build of ``workspace`` with a pending job, enqueued after commit.

    The workspace row is locked for the insert, so build numbers are gapless and two racing
    callers cannot both start a build: while the latest build's job is still active (pending,
    running, canceling), a new build is refused with ``WorkspaceConflict``. A deleted workspace
    takes no more builds. Without an explicit version and preset, a build reuses the latest
    build's.
    """
    if transition not in Transition.values:
        raise WorkspaceError("invalid_transition", "transition: use start, stop or delete.")
    locked = Workspace.objects.select_for_update().get(id=workspace.id)
    if locked.deleted:
        raise WorkspaceConflict("workspace_deleted", "The workspace is deleted.")
    latest = (
        WorkspaceBuild.objects.select_related("job", "template_version", "preset")
        .filter(workspace=locked)
        .order_by("-build_number")
        .first()
    )
    if latest is not None and latest.job.status in ACTIVE_JOB_STATUSES:
        raise WorkspaceConflict(
            "build_in_progress",
            f"Build #{latest.build_number} ({latest.transition}) is still {latest.job.status}.",
        )
    version = template_version or (latest.template_version if latest else None)
    if version is None:
        raise WorkspaceError("template_unavailable", "template: it has no active version.")
    if template_version is None and preset is None and latest is not None:
        preset = latest.preset
    number = (latest.build_number if latest is not None else 0) + 1
    queue = job_queue(
        version=version, host_queue=locked.host_queue, prebuild=reason == BuildReason.PREBUILD
    )
    job = ProvisionerJob.objects.create(organization_id=locked.organization_id, queue=queue)
    build = WorkspaceBuild.objects.create(
        workspace=locked,
        build_number=number,
        transition=transition,
        template_version=version,
        preset=preset,
        parameters=build_parameters(version, preset),
        initiator=initiator,
        reason=reason,
        is_claim=is_claim,
        job=job,
    )
    transaction.on_commit(partial(jobs.job_enqueue, job.id, queue))
    return build


def workspaces_forget_host(*, workspace_ids: Iterable[UUID]) -> int:
    """Let the next builds of these workspaces run on any worker; answer how many changed.

    For when the worker host that held a local workspace's processes is gone for good: its
    builds would wait for that host forever (and fail after ``PROVISIONER_HOST_QUEUE_TIMEOUT``).
    The processes went with the host, so a delete build succeeds anywhere (it finds nothing to
    stop) and a start build starts them afresh on the worker that takes it.
    """
    return (
        Workspace.objects.filter(id__in=list(workspace_ids))
        .exclude(host_queue="")
        .update(host_queue="", updated_at=timezone.now())
    )


AGENT_TOKEN_PREFIX = "wsa"


def agent_create(
    *, build: WorkspaceBuild, name: str, startup_script: str = ""
) -> tuple[WorkspaceAgent, str]:
    """Create an agent for ``build`` and return it with its plain token (stored hashed only).

    The token can be handed to the agent process now and never again: start builds of local
    workspaces create fresh agents (and tokens) each time their processes are started.
    """
    new = tokens.generate(AGENT_TOKEN_PREFIX)
    agent = WorkspaceAgent.objects.create(
        workspace_id=build.workspace_id,
        build=build,
        name=name,
        startup_script=startup_script,
        token_key_id=new.key_id,
        token_secret_hash=new.secret_hash,
    )
    return agent, new.token


def agents_retire(*, workspace: Workspace) -> int:
    """Retire the workspace's current agents (their tokens stop working)."""
    return WorkspaceAgent.objects.filter(workspace=workspace, retired_at__isnull=True).update(
        retired_at=timezone.now()
    )


def agent_authenticate(token: str) -> WorkspaceAgent | None:
    """The current (not retired) agent of a live workspace holding this token, else None."""
    parts = tokens.split(token, AGENT_TOKEN_PREFIX)
    if parts is None:
        return None
    key_id, secret = parts
    agent = (
        WorkspaceAgent.objects.select_related("workspace", "workspace__owner")
        .filter(token_key_id=key_id, retired_at__isnull=True, workspace__deleted=False)
        .first()
    )
    if agent is None or not tokens.secret_matches(secret, agent.token_secret_hash):
        return None
    return agent
