"""The ``command`` provisioner: runs an executable the template names, like a Terraform apply.

``provisioner_config["command"]`` (a list: path and arguments) runs once per build with

- environment: ``WORKSPACE_TRANSITION``, ``WORKSPACE_ID``, ``WORKSPACE_NAME``, ``WORKSPACE_OWNER``,
  ``WORKSPACE_OWNER_ID``, ``WORKSPACE_IS_PREBUILD``, ``WORKSPACE_IS_PREBUILD_CLAIM`` (``true`` /
  ``false``), ``ACCESS_URL`` and ``WORKSPACE_AGENT_TOKEN_<AGENT NAME>`` for each agent that has a
  token (fresh agents of a non-claim start), plus a small allow-list of the worker's own
  variables (``PATH``, ``HOME``, locale): never the worker's secrets;
- standard input: one JSON document (``request_document``);
- standard output and error: streamed into the job log line by line as they come.

Exit status 0 is success; anything else raises ``ProvisionError`` naming the status (the output
is already in the log). The command runs in a session of its own, so an abort (cancel, lost
job) kills it and everything it started with one signal to its process group.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shlex
import signal
import subprocess
import threading
import time
from typing import IO, Any

from workspaces.provisioners.base import (
    AbortFn,
    LogFn,
    ProvisionAborted,
    Provisioner,
    ProvisionError,
    ProvisionRequest,
)

ENV_PASSTHROUGH = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "USER", "LOGNAME")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
KILL_GRACE = 5.0  # SIGTERM → SIGKILL on abort
# After the command exits, how long to wait for the rest of its output: a background process it
# started may hold the pipe open for ever, and the build's result must not wait for it.
OUTPUT_DRAIN_TIMEOUT = 1.0
MAX_LINE = 64 * 1024
POLL = 0.1
_EOF = None


def _flag(value: bool) -> str:
    return "true" if value else "false"


def token_variable(agent_name: str) -> str:
    """``WORKSPACE_AGENT_TOKEN_<NAME>``: the name upper-cased, other characters as ``_``."""
    return "WORKSPACE_AGENT_TOKEN_" + re.sub(r"[^A-Z0-9]", "_", agent_name.upper())


def command_environment(request: ProvisionRequest) -> dict[str, str]:
    env = {key: os.environ[key] for key in ENV_PASSTHROUGH if key in os.environ}
    env.setdefault("PATH", DEFAULT_PATH)
    env.update(
        {
            "WORKSPACE_TRANSITION": request.transition,
            "WORKSPACE_ID": str(request.workspace_id),
            "WORKSPACE_NAME": request.workspace_name,
            "WORKSPACE_OWNER": request.owner_username,
            "WORKSPACE_OWNER_ID": str(request.owner_id),
            "WORKSPACE_IS_PREBUILD": _flag(request.is_prebuild),
            "WORKSPACE_IS_PREBUILD_CLAIM": _flag(request.is_claim),
            "ACCESS_URL": request.access_url,
        }
    )
    for agent in request.agents:
        if agent.token:
            env[token_variable(agent.name)] = agent.token
    return env


def request_document(request: ProvisionRequest) -> dict[str, Any]:
    """The JSON document the command reads on standard input."""
    return {
        "transition": request.transition,
        "workspace": {"id": str(request.workspace_id), "name": request.workspace_name},
        "owner": {"id": str(request.owner_id), "username": request.owner_username},
        "is_prebuild": request.is_prebuild,
        "is_prebuild_claim": request.is_claim,
        "parameters": dict(request.parameters),
        "agents": [
            {"name": a.name, "startup_script": a.startup_script, "token": a.token}
            for a in request.agents
        ],
        "access_url": request.access_url,
        "build": {"id": str(request.build_id), "number": request.build_number},
        "template_version_id": str(request.template_version_id),
    }


class CommandProvisioner(Provisioner):
    kind = "command"

    def __init__(self, *, kill_grace: float = KILL_GRACE) -> None:
        self.kill_grace = kill_grace

    def apply(self, request: ProvisionRequest, log: LogFn, should_abort: AbortFn) -> None:
        command = request.provisioner_config.get("command")
        if (
            not isinstance(command, list)
            or not command
            or not all(isinstance(part, str) and part for part in command)
        ):
            raise ProvisionError(
                'provisioner_config: "command" must be a non-empty list of strings'
            )
        log(f"$ {shlex.join(command)}  (transition {request.transition})")
        payload = json.dumps(request_document(request)).encode()
        try:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=command_environment(request),
                close_fds=True,
                start_new_session=True,
            )
        except OSError as exc:
            raise ProvisionError(f"cannot run {command[0]}: {exc.strerror or exc}") from exc
        assert proc.stdin is not None and proc.stdout is not None
        lines: queue.Queue[str | None] = queue.Queue()
        # Threads, so that neither a command that never reads its input nor one that writes a lot
        # of output can block us: we keep heartbeating (should_abort) whatever it does.
        threading.Thread(
            target=_write_input, args=(proc.stdin, payload), name="command-stdin", daemon=True
        ).start()
        threading.Thread(
            target=_read_output, args=(proc.stdout, lines), name="command-stdout", daemon=True
        ).start()
        eof = False
        while proc.poll() is None:
            if should_abort():
                self._kill(proc, log)
                _drain(lines, log, time.monotonic() + OUTPUT_DRAIN_TIMEOUT)
                raise ProvisionAborted("aborted; the command was killed")
            if eof:  # the command closed its output but still runs
                time.sleep(POLL)
            else:
                eof = _drain(lines, log, time.monotonic() + POLL)
        if not eof:
            _drain(lines, log, time.monotonic() + OUTPUT_DRAIN_TIMEOUT)
        code = proc.returncode
        if code < 0:
            raise ProvisionError(f"command killed by signal {signal.Signals(-code).name}")
        if code != 0:
            raise ProvisionError(f"command exited with status {code}")

    def _kill(self, proc: subprocess.Popen, log: LogFn) -> None:
        # proc is not reaped until proc.wait()/poll() sees it exit, so its pid (= its process
        # group id) cannot have been reused when we signal the group.
        log(f"aborting: stopping the command (process group {proc.pid})")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=self.kill_grace)
        # Whatever is left of the group (children that ignore SIGTERM, or the leader itself) goes
        # now. The group id stays reserved while any member lives, so this cannot hit a stranger.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _write_input(pipe: IO[bytes], payload: bytes) -> None:
    # A command that exits without reading its input closes the pipe: not our failure.
    with contextlib.suppress(OSError), pipe:
        pipe.write(payload)


def _read_output(pipe: IO[bytes], lines: queue.Queue[str | None]) -> None:
    with pipe:
        for raw in iter(lambda: pipe.readline(MAX_LINE), b""):
            lines.put(raw.decode(errors="replace").rstrip("\r\n"))
    lines.put(_EOF)


def _drain(lines: queue.Queue[str | None], log: LogFn, deadline: float) -> bool:
    """Log the lines that arrive until ``deadline``; True once the output has ended."""
    while True:
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0))
        except queue.Empty:
            return False
        if line is _EOF:
            return True
        log(line)
