"""Which Celery queue a task goes to: queues by role, so people never wait behind the pool.

Three kinds of work share the workers, and each has queues of its own:

- **control** (``control``): reconciliation passes, the event-driven refills and the job sweeps.
  Short, periodic, and what keeps everything else moving; served by a small worker that no
  build can occupy (``worker_queues("control")``), so a pass runs on time whatever the backlog.
- **people's builds** (``default`` and ``host.<hostname>``): claim builds and every build a
  user (or an operator) asks for. Served by their own workers (``worker_queues("builds")``), so a
  claim's build starts at once even while hundreds of prebuild builds wait.
- **prebuild builds** (``prebuilds`` and ``host.<hostname>.prebuilds``): what the reconciler
  inserts (``BuildReason.PREBUILD``: pool fills, deletions). Served by their own workers
  (``worker_queues("prebuilds")``); how many are in flight at once is capped by the reconciler
  (``PREBUILDS_MAX_IN_FLIGHT``), so a fill is paced instead of flooding them.

A first build (and every ``command`` build, whose state lives in the external tool) goes to its
role's shared queue and may run anywhere. A ``local`` workspace's processes live on the host
that started them, so once a worker has started one, the workspace records that host's queue
(``Workspace.host_queue``, always the people's ``host.<hostname>``) and its later builds go to
that host's queue of their role: a prebuild's deletion to ``host.<hostname>.prebuilds``, its
claim build to ``host.<hostname>``.

``worker_queues()`` without a role is every queue: one worker serving everything, for tests and
the smallest installations (then nothing is reserved).
"""

from __future__ import annotations

import os
import socket
from typing import Literal

DEFAULT_QUEUE = "default"
PREBUILDS_QUEUE = "prebuilds"
CONTROL_QUEUE = "control"
HOST_QUEUE_PREFIX = "host."
PREBUILDS_HOST_SUFFIX = ".prebuilds"

Role = Literal["builds", "prebuilds", "control", "all"]
ROLES: tuple[Role, ...] = ("builds", "prebuilds", "control", "all")


def host_queue(hostname: str | None = None) -> str:
    """The people's queue of this host (or of ``hostname``): ``host.<hostname>``."""
    return f"{HOST_QUEUE_PREFIX}{hostname or socket.gethostname()}"


def build_queue(*, host_queue: str, prebuild: bool) -> str:
    """The queue of a build: its role's shared queue, or that role's queue of ``host_queue``
    (a workspace's recorded host) when the build must run where the workspace's processes are."""
    if not host_queue:
        return PREBUILDS_QUEUE if prebuild else DEFAULT_QUEUE
    return host_queue + PREBUILDS_HOST_SUFFIX if prebuild else host_queue


def queue_host(queue: str) -> str | None:
    """The host name a per-host queue belongs to (either role's); None for a shared queue."""
    if not queue.startswith(HOST_QUEUE_PREFIX):
        return None
    return queue.removeprefix(HOST_QUEUE_PREFIX).removesuffix(PREBUILDS_HOST_SUFFIX)


def worker_queues(role: Role = "all") -> list[str]:
    """The queues a worker of ``role`` on this host consumes (``all``: every queue)."""
    here = host_queue()
    queues = {
        "builds": [DEFAULT_QUEUE, here],
        "prebuilds": [PREBUILDS_QUEUE, here + PREBUILDS_HOST_SUFFIX],
        "control": [CONTROL_QUEUE],
    }
    if role == "all":
        return [*queues["builds"], *queues["prebuilds"], *queues["control"]]
    return queues[role]


def worker_identity() -> str:
    """``hostname:pid``: who holds a job. Unique per worker process (prefork children too)."""
    return f"{socket.gethostname()}:{os.getpid()}"
