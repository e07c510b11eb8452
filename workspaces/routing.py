"""Which Celery queue a provisioner job goes to.

Every worker consumes two queues: ``default`` and the queue of its own host. A first build (and
every ``command`` build, whose state lives in the external tool) goes to ``default`` and may run
anywhere. A ``local`` workspace's processes live on the host that started them, so once a worker
has started one, the workspace records that host's queue (``Workspace.host_queue``) and
``build_create`` routes its later builds there.
"""

from __future__ import annotations

import os
import socket

DEFAULT_QUEUE = "default"
HOST_QUEUE_PREFIX = "host."


def host_queue(hostname: str | None = None) -> str:
    """The queue of this host (or of ``hostname``): ``host.<hostname>``."""
    return f"{HOST_QUEUE_PREFIX}{hostname or socket.gethostname()}"


def worker_queues() -> list[str]:
    """The queues a worker on this host consumes, in the order Celery should list them."""
    return [DEFAULT_QUEUE, host_queue()]


def worker_identity() -> str:
    """``hostname:pid``: who holds a job. Unique per worker process (prefork children too)."""
    return f"{socket.gethostname()}:{os.getpid()}"
