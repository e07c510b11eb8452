#!/usr/bin/env python3
"""An example ``command`` provisioner: one directory per workspace (stdlib only).

Warmstart runs the template's ``command`` for every build with the transition, the workspace
and its owner in the environment (``WORKSPACE_TRANSITION``, ``WORKSPACE_ID``,
``WORKSPACE_NAME``, ``WORKSPACE_OWNER``, …) and a JSON document on standard input. A real
provisioner would create a VM or container here and start the agents in it with the agent
tokens it was given; this one only keeps a directory, which is enough to see the contract:

- ``start``  creates ``$DIR_PROVISIONER_ROOT/<workspace id>/`` and records the build in
  ``state.json`` (the transition, names and parameters; never the tokens);
- ``stop``   marks the directory as stopped and keeps its contents;
- ``delete`` removes the directory.

Every transition is idempotent (DESIGN.md §9): running it twice leaves the same state and
exits 0, so a retried job never fails because the first attempt got half way. The root
defaults to ``/tmp/warmstart-dir-provisioner``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

DEFAULT_ROOT = "/tmp/warmstart-dir-provisioner"
# The id becomes a directory name that `delete` removes recursively: accept nothing that could
# point outside the root.
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
# Never written to disk: the agent tokens are secrets.
SECRET_KEY_PARTS = ("token", "secret", "password")


def log(message: str) -> None:
    print(f"dir-provisioner: {message}", flush=True)


def read_request() -> dict:
    """The JSON document on standard input; an empty or unreadable one counts as {}."""
    if sys.stdin is None or sys.stdin.isatty():
        return {}
    text = sys.stdin.read()
    if not text.strip():
        return {}
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        log(f"ignoring standard input that is not JSON ({exc})")
        return {}
    return document if isinstance(document, dict) else {}


def without_secrets(value: object) -> object:
    if isinstance(value, dict):
        return {
            key: without_secrets(item)
            for key, item in value.items()
            if not any(part in str(key).lower() for part in SECRET_KEY_PARTS)
        }
    if isinstance(value, list):
        return [without_secrets(item) for item in value]
    return value


def write_state(directory: Path, state: dict) -> None:
    # Write then rename, so a crash never leaves a half-written state file behind.
    temporary = directory / "state.json.tmp"
    temporary.write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    temporary.replace(directory / "state.json")


def main() -> int:
    transition = os.environ.get("WORKSPACE_TRANSITION", "")
    workspace_id = os.environ.get("WORKSPACE_ID", "")
    if transition not in ("start", "stop", "delete"):
        log(f"unknown WORKSPACE_TRANSITION {transition!r} (expected start, stop or delete)")
        return 2
    if not SAFE_ID.fullmatch(workspace_id):
        log(f"refusing unsafe or missing WORKSPACE_ID {workspace_id!r}")
        return 2
    root = Path(os.environ.get("DIR_PROVISIONER_ROOT") or DEFAULT_ROOT)
    directory = root / workspace_id
    request = read_request()

    if transition == "delete":
        if directory.exists():
            shutil.rmtree(directory)
            log(f"deleted {directory}")
        else:
            log(f"{directory} is already gone")
        return 0

    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "state": "running" if transition == "start" else "stopped",
        "workspace_id": workspace_id,
        "workspace_name": os.environ.get("WORKSPACE_NAME", ""),
        "owner": os.environ.get("WORKSPACE_OWNER", ""),
        "request": without_secrets(request),
    }
    write_state(directory, state)
    log(f"{transition}: {directory} is {state['state']} (owner {state['owner'] or '?'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
