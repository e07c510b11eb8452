"""Stopping every local workspace process of a ``DATA_DIR`` (``manage.py stop_workspaces``).

Workspaces outlive the control plane by design: stopping ``make run`` (or losing its web, worker
or database) leaves the agents and what their startup scripts started running, and the agents
reconnect when Warmstart is back, as machines outlive Coder's server. This is the one command
that ends them all, for a machine being shut down or a ``DATA_DIR`` being thrown away.

Guarantees: it reads no database row and needs no web or worker (it may run after everything
else stopped); it signals only processes that carry a workspace's environment marker (the
``local`` provisioner's) and belong to this ``DATA_DIR`` (the workspace's directory exists under
it, or the process's working directory is under it); agents get SIGTERM (they report ``off``
when they can), then SIGKILL after the provisioner's stop timeout. Workspace records and
directories are kept: a later start build of a workspace starts its agents again.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from workspaces.provisioners.local import WORKSPACE_MARKER_ENV, LocalProvisioner

_MARKER = f"{WORKSPACE_MARKER_ENV}=".encode()


def workspace_processes(data_dir: Path) -> dict[int, str]:
    """Live workspace processes of ``data_dir``: pid → workspace id."""
    root = Path(data_dir).resolve() / "workspaces"
    known = {entry.name for entry in root.iterdir()} if root.is_dir() else set()
    found: dict[int, str] = {}
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        marker = next((item for item in environ if item.startswith(_MARKER)), None)
        if marker is None or state == "Z":
            continue
        workspace_id = marker[len(_MARKER) :].decode(errors="replace")
        if workspace_id not in known:
            try:
                cwd = Path(os.readlink(entry / "cwd"))
            except OSError:
                continue
            if not cwd.is_relative_to(root):
                continue  # another DATA_DIR's workspace
        found[int(entry.name)] = workspace_id
    return found


def stop_workspaces(data_dir: Path, log: Callable[[str], None]) -> int:
    """Stop every workspace process of ``data_dir``; answer how many workspaces had some."""
    provisioner = LocalProvisioner(data_dir=data_dir)
    workspace_ids = sorted(set(workspace_processes(data_dir).values()))
    for workspace_id in workspace_ids:
        provisioner.stop_processes(workspace_id, lambda line, w=workspace_id: log(f"{w}: {line}"))
    return len(workspace_ids)
