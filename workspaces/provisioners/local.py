"""The ``local`` provisioner: a workspace is a directory plus one agent process per agent.

Layout, under ``<data_dir>/workspaces/<workspace_id>/``::

    .warmstart/agent-<name>.pid    pid of the agent process (also its process group id)
    .warmstart/agent-<name>.log    the agent's stdout and stderr, appended
    .warmstart/owner               {"id", "username"} of the owner the workspace was last built for

Guarantees:

- An agent is ``python -m workspaces.agent --url ACCESS_URL`` with its token **only** in the
  environment variable ``WORKSPACE_AGENT_TOKEN`` (a command line is readable by every local user),
  its working directory the workspace directory, started in a session of its own so that a
  worker restart (which kills the worker's process group) does not take workspaces down.
- The agent gets a small allow-listed environment, never the worker's (which holds the database
  URL and the secret key); the startup scripts it runs inherit that environment.
- A pid read from a pid file is only signalled after checking that the process really is an
  agent of this workspace (command line, environment marker or working directory, and that it
  leads its own process group): pids are reused, and a stale pid file must never kill a stranger.
- ``stop`` and ``delete`` also stop leftovers: any process of ours that carries this workspace's
  environment marker (background processes started by a startup script, or a startup script
  whose agent was SIGKILLed), so a deleted workspace leaves nothing running.
- Every transition is idempotent: starting a started workspace replaces its agents (the build
  brings fresh tokens), stopping a stopped one and deleting a deleted one do nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from workspaces.provisioners.base import (
    AbortFn,
    AgentSpec,
    LogFn,
    ProvisionAborted,
    Provisioner,
    ProvisionError,
    ProvisionRequest,
)

AGENT_MODULE = "workspaces.agent"
TOKEN_ENV = "WORKSPACE_AGENT_TOKEN"
# Set in every agent's environment and inherited by everything its startup scripts start:
# how ``stop`` recognises the processes of one workspace.
WORKSPACE_MARKER_ENV = "WARMSTART_WORKSPACE_ID"
AGENT_NAME_ENV = "WARMSTART_AGENT_NAME"
# The repository root, so ``-m workspaces.agent`` resolves whatever the working directory.
REPO_ROOT = Path(__file__).resolve().parents[2]
STATE_DIR = ".warmstart"
# What an agent may inherit from the worker. Everything else (DATABASE_URL, SECRET_KEY, broker
# credentials) stays out of the workspace.
ENV_PASSTHROUGH = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "USER", "LOGNAME")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
AGENT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

STOP_TIMEOUT = 10.0  # SIGTERM → SIGKILL for agents (they report "off" on the way out)
LEFTOVER_GRACE = 2.0  # SIGTERM → SIGKILL for leftovers found by the environment marker
STARTUP_CHECK = 0.3  # how long a new agent must survive before the start counts as done
POLL = 0.05

# Agents this process started, kept so they are reaped (no zombies, no ResourceWarning) and so
# "has it exited" is answered by ``poll()`` for our own children.
_children: dict[int, subprocess.Popen] = {}
_children_lock = threading.Lock()


class LocalProvisioner(Provisioner):
    kind = "local"

    def __init__(self, *, data_dir: Path, stop_timeout: float = STOP_TIMEOUT) -> None:
        self.root = Path(data_dir) / "workspaces"
        self.stop_timeout = stop_timeout

    def agent_log_tail(self, workspace_id: str, agent_name: str) -> str:
        return _tail(self.workspace_dir(workspace_id) / STATE_DIR / f"agent-{agent_name}.log")

    def workspace_dir(self, workspace_id: str) -> Path:
        return self.root / str(workspace_id)

    def stop_processes(self, workspace_id: str, log: LogFn) -> None:
        """Stop every process of one workspace (agents, then leftovers by the environment
        marker) without a build: a failed prebuild (workspaces.jobs) and ``manage.py
        stop_workspaces`` (workspaces.stopping)."""
        # What a stop does (agents, then leftovers carrying the marker), minus nothing: a stop
        # never removed the directory or the agents' logs either.
        _reap()
        self._stop(str(workspace_id), self.workspace_dir(workspace_id), log)

    def apply(self, request: ProvisionRequest, log: LogFn, should_abort: AbortFn) -> None:
        _reap()
        for agent in request.agents:
            if not AGENT_NAME_RE.fullmatch(agent.name):
                raise ProvisionError(f"invalid agent name {agent.name!r}")
        directory = self.workspace_dir(request.workspace_id)
        if request.transition == "start":
            if request.is_claim:
                self._claim(request, directory, log)
            else:
                self._start(request, directory, log, should_abort)
        elif request.transition == "stop":
            self._stop(request.workspace_id, directory, log)
            log("workspace stopped")
        elif request.transition == "delete":
            self._stop(request.workspace_id, directory, log)
            if directory.exists():
                try:
                    shutil.rmtree(directory)
                except OSError as exc:
                    raise ProvisionError(f"cannot remove {directory}: {exc}") from exc
                log(f"removed {directory}")
            log("workspace deleted")
        else:
            raise ProvisionError(f"unknown transition {request.transition!r}")

    # -- transitions ---------------------------------------------------------------------

    def _start(
        self, request: ProvisionRequest, directory: Path, log: LogFn, should_abort: AbortFn
    ) -> None:
        state = directory / STATE_DIR
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Idempotent start: agents of an earlier start hold tokens that this build retired.
        self._stop(request.workspace_id, directory, log)
        _write_atomic(
            state / "owner",
            json.dumps({"id": request.owner_id, "username": request.owner_username}),
        )
        started: list[tuple[str, subprocess.Popen]] = []
        for agent in request.agents:
            if should_abort():
                raise ProvisionAborted("aborted before all agents were started")
            started.append((agent.name, self._spawn(request, agent, directory)))
            log(f"starting agent {agent.name} (pid {started[-1][1].pid})")
        # An agent that dies at once (bad interpreter, import error) should fail the build, not
        # leave a workspace that never becomes ready. Later crashes are the agent's to report.
        deadline = time.monotonic() + STARTUP_CHECK
        while started and time.monotonic() < deadline:
            for name, proc in started:
                if proc.poll() is not None:
                    tail = _tail(state / f"agent-{name}.log")
                    raise ProvisionError(
                        f"agent {name} exited at once with status {proc.returncode}: {tail}"
                    )
            time.sleep(POLL)
        log(f"workspace started with {len(started)} agent(s) in {directory}")

    def _claim(self, request: ProvisionRequest, directory: Path, log: LogFn) -> None:
        # A claim keeps the running agents: they re-initialise for the new owner through the
        # reinit endpoint. Their tokens exist only hashed, so a dead agent cannot be restarted
        # here; the claim build fails and the workspace needs a normal start.
        state = directory / STATE_DIR
        missing = []
        for agent in request.agents:
            pid = _read_pid(state / f"agent-{agent.name}.pid")
            if pid is None or not _is_our_agent(pid, request.workspace_id, directory):
                missing.append(agent.name)
            else:
                log(f"keeping agent {agent.name} (pid {pid}) for {request.owner_username}")
        if missing:
            raise ProvisionError(
                f"agent(s) {', '.join(missing)} not running; start the workspace again"
            )
        _write_atomic(
            state / "owner",
            json.dumps({"id": request.owner_id, "username": request.owner_username}),
        )
        log(f"workspace claimed by {request.owner_username}")

    def _stop(self, workspace_id: str, directory: Path, log: LogFn) -> None:
        state = directory / STATE_DIR
        pid_files = sorted(state.glob("agent-*.pid")) if state.is_dir() else []
        stopping: list[tuple[str, int]] = []
        for pid_file in pid_files:
            name = pid_file.name[len("agent-") : -len(".pid")]
            pid = _read_pid(pid_file)
            if pid is not None and _is_our_agent(pid, workspace_id, directory):
                log(f"stopping agent {name} (pid {pid})")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGTERM)
                stopping.append((name, pid))
            else:
                log(f"agent {name} is not running")
        # All agents shut down in parallel (each reports "off" on its way out): one deadline.
        deadline = time.monotonic() + self.stop_timeout
        remaining = _wait_gone(stopping, deadline)
        for name, pid in remaining:
            # Race: the agent may exit (and, if it is not our child, its pid be reused) between
            # the wait and this signal; checking again narrows that window to almost nothing.
            if _is_our_agent(pid, workspace_id, directory):
                log(f"agent {name} did not stop within {self.stop_timeout:g} s; killing it")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
        _wait_gone(remaining, time.monotonic() + LEFTOVER_GRACE)
        for pid_file in pid_files:
            pid_file.unlink(missing_ok=True)
        self._stop_leftovers(workspace_id, log)

    def _stop_leftovers(self, workspace_id: str, log: LogFn) -> None:
        leftovers = list(_processes_with_marker(workspace_id))
        if not leftovers:
            return
        for pid in leftovers:
            log(f"stopping leftover process {pid} ({_comm(pid)})")
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        named = [(str(pid), pid) for pid in leftovers]
        for _, pid in _wait_gone(named, time.monotonic() + LEFTOVER_GRACE):
            # Same pid-reuse race as above; re-check the marker before the hard kill.
            if _has_marker(pid, workspace_id):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        _wait_gone(named, time.monotonic() + LEFTOVER_GRACE)

    # -- processes -----------------------------------------------------------------------

    def _spawn(self, request: ProvisionRequest, agent: AgentSpec, directory: Path):
        if not agent.token:
            raise ProvisionError(f"agent {agent.name} has no token; a start needs fresh agents")
        state = directory / STATE_DIR
        env = {key: os.environ[key] for key in ENV_PASSTHROUGH if key in os.environ}
        env.setdefault("PATH", DEFAULT_PATH)
        env.update(
            {
                "PYTHONPATH": str(REPO_ROOT),
                "PYTHONUNBUFFERED": "1",
                WORKSPACE_MARKER_ENV: str(request.workspace_id),
                AGENT_NAME_ENV: agent.name,
                TOKEN_ENV: agent.token,
            }
        )
        command = [sys.executable, "-m", AGENT_MODULE, "--url", request.access_url]
        try:
            with open(state / f"agent-{agent.name}.log", "ab") as output:
                proc = subprocess.Popen(
                    command,
                    cwd=directory,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    close_fds=True,
                    # Its own session: not killed with the worker, and its pid is its process
                    # group id, which is what stop signals.
                    start_new_session=True,
                )
        except OSError as exc:
            raise ProvisionError(f"cannot start agent {agent.name}: {exc}") from exc
        with _children_lock:
            _children[proc.pid] = proc
        _write_atomic(state / f"agent-{agent.name}.pid", f"{proc.pid}\n")
        return proc


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid > 0 else None


def _tail(path: Path, limit: int = 500) -> str:
    try:
        data = path.read_bytes()[-limit:]
    except OSError:
        return "(no output)"
    return data.decode(errors="replace").strip() or "(no output)"


def _proc_state(pid: int) -> str | None:
    """The state letter of ``/proc/<pid>/stat`` (``Z`` for a zombie), None if no such pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return "?"
    # The command name is in parentheses and may contain anything: the state follows the last ")".
    return stat.rpartition(")")[2].split()[0]


def _environ(pid: int) -> list[bytes] | None:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None


def _has_marker(pid: int, workspace_id: str) -> bool:
    environ = _environ(pid)
    return environ is not None and f"{WORKSPACE_MARKER_ENV}={workspace_id}".encode() in environ


def _is_our_agent(pid: int, workspace_id: str, directory: Path) -> bool:
    """Whether ``pid`` is a live agent process of this workspace that leads its own group."""
    if _proc_state(pid) in (None, "Z"):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if AGENT_MODULE.encode() not in cmdline or os.getpgid(pid) != pid:
            return False
    except (OSError, ProcessLookupError):
        return False
    if _environ(pid) is not None:
        return _has_marker(pid, workspace_id)
    # The environment is unreadable (another user's process); fall back to the working directory.
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd")) == directory.resolve()
    except OSError:
        return False


def _processes_with_marker(workspace_id: str) -> Iterable[int]:
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != me:
            pid = int(entry.name)
            if _proc_state(pid) not in (None, "Z") and _has_marker(pid, workspace_id):
                yield pid


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def _gone(pid: int) -> bool:
    """Whether ``pid`` has exited. Reaps it when it is our own child (else it stays a zombie)."""
    with _children_lock:
        proc = _children.get(pid)
        if proc is not None:
            if proc.poll() is None:
                return False
            del _children[pid]
            return True
    return _proc_state(pid) in (None, "Z")


def _reap() -> None:
    """Reap our children that exited on their own (a crashed agent), so they leave no zombie."""
    with _children_lock:
        for pid, proc in list(_children.items()):
            if proc.poll() is not None:
                del _children[pid]


def _wait_gone(processes: list[tuple[str, int]], deadline: float) -> list[tuple[str, int]]:
    """Wait until every process has exited or ``deadline`` passes; return those still alive."""
    remaining = list(processes)
    while remaining:
        remaining = [(name, pid) for name, pid in remaining if not _gone(pid)]
        if not remaining or time.monotonic() >= deadline:
            break
        time.sleep(POLL)
    return remaining
