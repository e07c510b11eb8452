"""The one interface every provisioner implements, and the request it receives.

A provisioner turns one build (a *transition*: start, stop or delete) into reality. It knows
nothing about Django, jobs or heartbeats: the executor (``workspaces.jobs.job_execute``) hands it
a frozen ``ProvisionRequest``, a ``log`` callback and a ``should_abort`` callback, and reads the
outcome from whether ``apply`` returns or raises.

Contract of ``Provisioner.apply``:

- **Idempotent per transition.** Applying the same transition twice leaves the same result as
  applying it once (like a Terraform apply): a job can be retried after a lost worker.
- Returns normally on success; raises ``ProvisionError`` with a human message on failure. Any
  other exception is a bug and is also turned into a failed job by the executor.
- Calls ``log(line)`` with one line of human-readable output at a time (no trailing newline) and
  ``should_abort()`` at least every second or so while it waits on anything. Both are called only
  from the thread that called ``apply``: the executor relies on that to write the job log
  without locks. When ``should_abort()`` answers True the provisioner stops as soon as it
  safely can and raises ``ProvisionAborted``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

LogFn = Callable[[str], None]
AbortFn = Callable[[], bool]


class ProvisionError(Exception):
    """The provisioner could not bring the workspace to the requested state."""


class ProvisionAborted(ProvisionError):
    """The provisioner stopped because ``should_abort()`` answered True (cancel or lost job)."""


@dataclass(frozen=True)
class AgentSpec:
    """One agent of the workspace. ``token`` is the plain agent token, only for a non-claim
    start (a fresh agent); None otherwise, because tokens are stored hashed."""

    name: str
    startup_script: str = ""
    # repr=False: a request may be logged; the token must not be.
    token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class ProvisionRequest:
    """Everything a provisioner may know about one build."""

    transition: str  # "start" | "stop" | "delete"
    is_claim: bool
    workspace_id: str
    workspace_name: str
    owner_id: str
    owner_username: str
    # The owner is the system user: this workspace is a prebuild waiting in a pool.
    is_prebuild: bool
    access_url: str
    parameters: Mapping[str, str] = field(default_factory=dict)
    agents: tuple[AgentSpec, ...] = ()
    provisioner_config: Mapping[str, Any] = field(default_factory=dict)
    build_id: str = ""
    build_number: int = 0
    template_version_id: str = ""


class Provisioner(abc.ABC):
    """A provisioner backend; see the module docstring for the contract of ``apply``."""

    kind: ClassVar[str]

    @abc.abstractmethod
    def apply(self, request: ProvisionRequest, log: LogFn, should_abort: AbortFn) -> None:
        """Bring the workspace to ``request.transition``; raise ``ProvisionError`` on failure."""

    def agent_log_tail(self, workspace_id: str, agent_name: str) -> str:
        """The last lines an agent printed, when this provisioner keeps them ("" otherwise)."""
        return ""

    def stop_processes(self, workspace_id: str, log: LogFn) -> None:
        """Stop the workspace's processes on this host and keep everything else (its directory,
        its logs): what is left of a failed build is evidence. Idempotent. The default does
        nothing: the provisioner runs no processes of its own for a workspace."""
        return None
