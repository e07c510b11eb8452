"""The JSON shapes of DESIGN.md §7, as TypedDicts and the functions that produce them.

The shapes are a fixed contract: keys are never added or renamed here without changing the
design first. The functions read only the object they are given and its *prefetched* relations
(``workspaces.selectors.workspace_queryset`` / ``template_list_usable``), so serializing a list
costs no query per row; handing them an object without the prefetch raises ``AttributeError``
rather than silently querying.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypedDict

from accounts.models import User
from workspaces import liveness, selectors
from workspaces.models import (
    Template,
    TemplateVersion,
    TemplateVersionPreset,
    Workspace,
    WorkspaceAgent,
    WorkspaceBuild,
)


class PresetJSON(TypedDict):
    id: str
    name: str
    desired_instances: int | None


class VersionJSON(TypedDict):
    id: str
    name: str
    presets: list[PresetJSON]


class TemplateJSON(TypedDict):
    id: str
    name: str
    organization: str
    active_version_id: str | None
    versions: list[VersionJSON]


class OwnerJSON(TypedDict):
    id: str
    username: str


class BuildJSON(TypedDict):
    id: str
    build_number: int
    transition: str
    status: str
    initiator: str
    is_claim: bool


class AgentJSON(TypedDict):
    id: str
    name: str
    lifecycle_state: str
    initialized_owner_id: str | None
    connection: str  # "connected" | "disconnected" (workspaces.liveness)
    last_seen_at: str | None


class WorkspaceJSON(TypedDict):
    id: str
    name: str
    owner: OwnerJSON
    organization: str
    template_id: str
    template_version_id: str | None
    preset_id: str | None
    claimed_prebuild: bool
    created_at: str
    latest_build: BuildJSON | None
    agents: list[AgentJSON]


class ManifestJSON(TypedDict):
    agent_id: str
    agent_name: str
    workspace_id: str
    workspace_name: str
    owner: OwnerJSON
    is_prebuild: bool
    startup_script: str
    environment: dict[str, str]


def _str_or_none(value: object) -> str | None:
    return None if value is None else str(value)


def preset_json(preset: TemplateVersionPreset) -> PresetJSON:
    return {
        "id": str(preset.id),
        "name": preset.name,
        "desired_instances": preset.desired_instances,
    }


def version_json(version: TemplateVersion) -> VersionJSON:
    """Needs ``presets`` prefetched."""
    return {
        "id": str(version.id),
        "name": version.name,
        "presets": [preset_json(p) for p in version.presets.all()],
    }


def template_json(template: Template) -> TemplateJSON:
    """Needs ``organization`` selected and ``versions__presets`` prefetched."""
    return {
        "id": str(template.id),
        "name": template.name,
        "organization": template.organization.slug,
        "active_version_id": _str_or_none(template.active_version_id),
        "versions": [version_json(v) for v in template.versions.all()],
    }


def owner_json(user: User) -> OwnerJSON:
    return {"id": str(user.id), "username": user.username}


def build_json(build: WorkspaceBuild) -> BuildJSON:
    """Needs ``job`` and ``initiator`` selected (or just assigned by the service)."""
    return {
        "id": str(build.id),
        "build_number": build.build_number,
        "transition": build.transition,
        "status": build.job.status,
        "initiator": build.initiator.username,
        "is_claim": build.is_claim,
    }


def agent_json(agent: WorkspaceAgent) -> AgentJSON:
    return {
        "id": str(agent.id),
        "name": agent.name,
        "lifecycle_state": agent.lifecycle_state,
        "initialized_owner_id": _str_or_none(agent.initialized_owner_id),
        "connection": liveness.agent_connection(agent),
        "last_seen_at": agent.last_seen_at.isoformat() if agent.last_seen_at else None,
    }


def workspace_json(workspace: Workspace) -> WorkspaceJSON:
    """A workspace from ``selectors.workspace_queryset()``.

    Template version and preset are the latest build's (a workspace changes version through
    builds); ``claimed_prebuild`` says the workspace came from a prebuild pool.
    """
    build = selectors.latest_build(workspace)
    agents: Iterable[WorkspaceAgent] = selectors.current_agents(workspace)
    return {
        "id": str(workspace.id),
        "name": workspace.name,
        "owner": owner_json(workspace.owner),
        "organization": workspace.organization.slug,
        "template_id": str(workspace.template_id),
        "template_version_id": _str_or_none(build.template_version_id if build else None),
        "preset_id": _str_or_none(build.preset_id if build else None),
        "claimed_prebuild": workspace.claimed_at is not None,
        "created_at": workspace.created_at.isoformat(),
        "latest_build": build_json(build) if build else None,
        "agents": [agent_json(a) for a in agents],
    }


def manifest_json(
    *, agent: WorkspaceAgent, owner: User, parameters: Mapping[str, object]
) -> ManifestJSON:
    """The agent's manifest for ``owner`` (the owner it is being recorded as initialised for).

    The environment carries the ``WORKSPACE_*`` variables of DESIGN.md §9 plus one
    ``PARAM_<NAME>`` per parameter of the latest build; a name is upper-cased and any character
    a shell variable name cannot hold becomes ``_`` (``repo-url`` → ``PARAM_REPO_URL``).
    """
    workspace = agent.workspace
    is_prebuild = owner.is_system
    environment = {
        "WORKSPACE_ID": str(workspace.id),
        "WORKSPACE_NAME": workspace.name,
        "WORKSPACE_OWNER": owner.username,
        "WORKSPACE_IS_PREBUILD": "true" if is_prebuild else "false",
        "WORKSPACE_AGENT_NAME": agent.name,
    }
    for name, value in sorted(parameters.items()):
        environment[parameter_variable(name)] = "" if value is None else str(value)
    return {
        "agent_id": str(agent.id),
        "agent_name": agent.name,
        "workspace_id": str(workspace.id),
        "workspace_name": workspace.name,
        "owner": owner_json(owner),
        "is_prebuild": is_prebuild,
        "startup_script": agent.startup_script,
        "environment": environment,
    }


def parameter_variable(name: str) -> str:
    """``PARAM_`` + the parameter name as a portable environment variable name."""
    return "PARAM_" + "".join(c if c.isascii() and c.isalnum() else "_" for c in name.upper())
