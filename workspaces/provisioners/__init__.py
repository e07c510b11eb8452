"""Provisioner backends: ``local`` (agents as local processes) and ``command`` (an executable).

The backends import nothing from Django: the executor (``workspaces.jobs``) reads the settings
and passes what they need, so they can be tested (and reasoned about) on their own.
"""

from __future__ import annotations

from pathlib import Path

from workspaces.provisioners.base import (
    AgentSpec,
    ProvisionAborted,
    Provisioner,
    ProvisionError,
    ProvisionRequest,
)
from workspaces.provisioners.command import CommandProvisioner
from workspaces.provisioners.local import LocalProvisioner

__all__ = [
    "AgentSpec",
    "CommandProvisioner",
    "LocalProvisioner",
    "ProvisionAborted",
    "ProvisionError",
    "ProvisionRequest",
    "Provisioner",
    "provisioner_for",
]


def provisioner_for(kind: str, *, data_dir: Path) -> Provisioner:
    """The backend for a template version's ``provisioner`` value; ``ProvisionError`` if
    unknown (a version is immutable, so an unknown kind fails its builds rather than crash)."""
    if kind == LocalProvisioner.kind:
        return LocalProvisioner(data_dir=data_dir)
    if kind == CommandProvisioner.kind:
        return CommandProvisioner()
    raise ProvisionError(f"unknown provisioner {kind!r}")
