"""The workspace agent: the program that runs inside every workspace.

It fetches its manifest, reports its lifecycle, runs the startup script and,
after a claim, re-initialises for the new owner (DESIGN.md §§6, 7, 9). It runs
without Django and with nothing but the Python 3.11 standard library, because
a workspace may hold nothing more than a bare Python.

Threads, and why:

- a *worker* thread does the work (manifest, lifecycle, script, reinit
  long-poll) in order;
- the *main* thread only waits for the worker and for SIGTERM/SIGINT. Signal
  handlers run in the main thread, so keeping it idle means a signal never
  lands in the middle of an HTTP call or a subprocess hand-over, and shutdown
  does not have to wait for a 30-second long-poll to end;
- one *output* thread per startup script forwards its output line by line;
- a *heartbeat* thread tells the control plane every few seconds that the
  agent is alive (``POST …/heartbeat``; the answer sets the next interval), so
  the agent stays *connected* while its startup script runs and no reinit
  wait is open. A dead agent stops sending, and its prebuild stops being
  claimable after ``AGENT_DISCONNECT_TIMEOUT``.

Two locks make the shutdown race-free:

- ``_report_lock`` is held for every single lifecycle attempt and the worker
  checks the stop flag under it, so once shutdown holds it no ``ready`` can be
  sent after ``off``;
- ``_proc_lock`` is held while the script is spawned and while it is reaped,
  so shutdown sees either no script or a script whose process is not yet
  reaped (its pid, which is also its process group id, cannot be reused).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

from .client import (
    ControlPlaneClient,
    ControlPlaneError,
    InvalidTokenError,
    LifecycleState,
    ReinitEvent,
    TransientError,
)

logger = logging.getLogger("warmstart.agent")

TOKEN_ENV = "WORKSPACE_AGENT_TOKEN"
SCRIPT_OUTPUT_PREFIX = "[startup_script] "

EXIT_OK = 0
EXIT_CRASHED = 1
EXIT_USAGE = 2
EXIT_INVALID_TOKEN = 3

DEFAULT_BACKOFF_BASE = 0.5
DEFAULT_BACKOFF_MAX = 10.0
DEFAULT_REINIT_WAIT = 30
DEFAULT_SHUTDOWN_TIMEOUT = 3.0
# Until the control plane says otherwise (a third of its default disconnect timeout of 30 s).
DEFAULT_HEARTBEAT_INTERVAL = 10.0
# After SIGTERM to the script's process group, how long its shell gets to exit
# before the whole group is SIGKILLed.
SCRIPT_KILL_GRACE = 2.0
# After the script's shell exits, how long to wait for the rest of its output.
# Background processes it started may hold the pipe open for ever; their output
# keeps being forwarded, but the script's result must not wait for them.
OUTPUT_DRAIN_TIMEOUT = 1.0

T = TypeVar("T")


class ManifestError(ValueError):
    """The manifest does not have the shape DESIGN.md §7 promises."""


class TokenError(Exception):
    """No usable agent token was given."""


class _Stopped(Exception):
    """Raised in the worker thread once shutdown has been requested."""


@dataclass(frozen=True)
class Manifest:
    agent_id: str
    agent_name: str
    workspace_id: str
    workspace_name: str
    owner_id: str
    owner_username: str
    is_prebuild: bool
    startup_script: str
    environment: Mapping[str, str]

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> Manifest:
        """Validate a manifest document; raise ``ManifestError`` naming the first bad field."""

        def text(mapping: Mapping[str, Any], key: str, label: str | None = None) -> str:
            value = mapping.get(key)
            if not isinstance(value, str):
                raise ManifestError(f"manifest field {label or key!r} must be a string")
            return value

        owner = document.get("owner")
        if not isinstance(owner, Mapping):
            raise ManifestError("manifest field 'owner' must be an object")
        is_prebuild = document.get("is_prebuild")
        if not isinstance(is_prebuild, bool):
            raise ManifestError("manifest field 'is_prebuild' must be a boolean")
        script = document.get("startup_script")
        if script is None:
            script = ""
        if not isinstance(script, str):
            raise ManifestError("manifest field 'startup_script' must be a string")
        return cls(
            agent_id=text(document, "agent_id"),
            agent_name=text(document, "agent_name"),
            workspace_id=text(document, "workspace_id"),
            workspace_name=text(document, "workspace_name"),
            owner_id=text(owner, "id", "owner.id"),
            owner_username=text(owner, "username", "owner.username"),
            is_prebuild=is_prebuild,
            startup_script=script,
            environment=_environment_from_json(document.get("environment")),
        )


def _environment_from_json(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ManifestError("manifest field 'environment' must be an object")
    environment = {}
    for key, item in value.items():
        if not key or "=" in key or "\0" in key:
            raise ManifestError(f"manifest environment name {key!r} is not a valid variable name")
        if isinstance(item, str):
            environment[key] = item
        elif isinstance(item, bool | int | float):
            # Numbers and booleans as JSON spells them ("3", "true"), which is
            # what a shell script compares against.
            environment[key] = json.dumps(item)
        else:
            raise ManifestError(f"manifest environment value of {key!r} must be a string")
        if "\0" in environment[key]:
            raise ManifestError(f"manifest environment value of {key!r} contains a NUL byte")
    return environment


def script_environment(manifest: Manifest, base: Mapping[str, str]) -> dict[str, str]:
    """The environment a startup script runs with (DESIGN.md §9).

    ``base`` (the agent's own environment), overlaid with the manifest's
    ``environment``, overlaid with the ``WORKSPACE_*`` variables taken from the
    manifest fields, which therefore always win. The agent token is never
    passed on: the script does not need the agent's credential.
    """
    environment = dict(base)
    environment.update(manifest.environment)
    environment.update(
        WORKSPACE_ID=manifest.workspace_id,
        WORKSPACE_NAME=manifest.workspace_name,
        WORKSPACE_OWNER=manifest.owner_username,
        WORKSPACE_IS_PREBUILD="true" if manifest.is_prebuild else "false",
    )
    environment.pop(TOKEN_ENV, None)
    return environment


@dataclass
class Backoff:
    """Capped exponential backoff with jitter.

    Attempt ``n`` (from 0) waits a random time between half and all of
    ``min(maximum, base * 2**n)``: the delay grows quickly to the cap, and
    agents that lost the control plane at the same moment do not come back in
    lockstep.
    """

    base: float
    maximum: float
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def next_delay(self) -> float:
        cap = min(self.maximum, self.base * 2 ** min(self.attempt, 32))
        self.attempt += 1
        return cap / 2 + self.rng.uniform(0, cap / 2)


class Agent:
    """Keeps one workspace agent initialised for the workspace's current owner.

    Guarantees:

    - the startup script runs only after the manifest was fetched and
      ``starting`` was delivered, and its result is reported as ``ready``
      (exit code 0, or no script) or ``start_error``;
    - lifecycle states are delivered in order; a failed report is retried
      with backoff until it arrives or the agent shuts down — never dropped;
    - only a 200 answer of the reinit endpoint re-initialises the agent;
    - connection errors, timeouts and unexpected answers are retried with
      capped exponential backoff; only a 401 (token invalid for good) ends
      ``run()`` with ``EXIT_INVALID_TOKEN``;
    - after ``request_stop()``, ``run()`` reports ``shutting_down``, kills the
      running startup script's process group, reports ``off`` (both reports
      best-effort within ``shutdown_timeout``) and returns ``EXIT_OK``; no
      lifecycle state is sent after ``off``.
    """

    def __init__(
        self,
        client: ControlPlaneClient,
        *,
        backoff_base: float = DEFAULT_BACKOFF_BASE,
        backoff_max: float = DEFAULT_BACKOFF_MAX,
        reinit_wait: int = DEFAULT_REINIT_WAIT,
        shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        output_fd: int | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._client = client
        self._backoff_base = backoff_base
        self._backoff_max = max(backoff_max, backoff_base)
        self._reinit_wait = reinit_wait
        self._shutdown_timeout = shutdown_timeout
        self._heartbeat_interval = heartbeat_interval
        # Script output is written to the file descriptor with os.write, not
        # through sys.stdout: a daemon thread caught holding sys.stdout's
        # buffer lock when the interpreter exits is a fatal error.
        self._output_fd = output_fd if output_fd is not None else sys.stdout.fileno()
        self._rng = rng or random.Random()

        self._stop = threading.Event()
        self._stop_reason: str | None = None
        self._report_lock = threading.Lock()
        self._proc_lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._output_lock = threading.Lock()
        self._forwarder: threading.Thread | None = None  # the running script's output
        self._worker_exit_code = EXIT_OK

    # -- the main thread ---------------------------------------------------

    def run(self) -> int:
        """Run until stopped or until the token is rejected; return the exit status."""
        worker = threading.Thread(target=self._worker_main, name="agent-worker", daemon=True)
        worker.start()
        threading.Thread(target=self._heartbeat_main, name="agent-heartbeat", daemon=True).start()
        # A short join timeout rather than an Event wait: the signal handler
        # must not take a lock the interrupted main thread might be holding.
        while worker.is_alive() and self._stop_reason is None:
            worker.join(0.1)
        if self._stop_reason is None:
            return self._worker_exit_code
        logger.info("received %s, shutting down", self._stop_reason)
        self.shutdown()
        return EXIT_OK

    def request_stop(self, reason: str) -> None:
        """Ask ``run()`` to shut down. Safe to call from a signal handler, repeatedly."""
        if self._stop_reason is not None:
            return
        self._stop_reason = reason
        self._stop.set()

    def shutdown(self) -> None:
        """Report ``shutting_down``, kill the running script's group, report ``off``.

        The reports are best-effort: each gets half of ``shutdown_timeout``,
        and a failure is logged, not raised.
        """
        self._stop.set()
        budget = self._shutdown_timeout / 2
        # Wait for an in-flight lifecycle attempt of the worker to finish, so
        # that its state cannot arrive after ours; it checks the stop flag
        # before its next attempt. If it hangs, report anyway (best-effort).
        holds_lock = self._report_lock.acquire(timeout=budget)
        try:
            self._report_final("shutting_down", budget)
            forwarder = self._kill_startup_script()
            if forwarder is not None:
                forwarder.join(OUTPUT_DRAIN_TIMEOUT)  # its last words
            self._report_final("off", budget)
        finally:
            if holds_lock:
                self._report_lock.release()

    def _report_final(self, state: LifecycleState, budget: float) -> None:
        deadline = time.monotonic() + budget
        backoff = self._new_backoff()
        while True:
            remaining = deadline - time.monotonic()
            try:
                self._client.post_lifecycle(state, timeout=max(remaining, 0.1))
            except InvalidTokenError as exc:
                logger.warning("could not report lifecycle %s: %s", state, exc)
                return
            except ControlPlaneError as exc:
                delay = backoff.next_delay()
                if time.monotonic() + delay >= deadline:
                    logger.warning("could not report lifecycle %s: %s; giving up", state, exc)
                    return
                time.sleep(delay)
            else:
                logger.info("lifecycle: %s", state)
                return

    def _kill_startup_script(self) -> threading.Thread | None:
        """Kill the running script's process group; return its output forwarder, if any."""
        with self._proc_lock:
            proc = self._proc
            if proc is None:
                return None
            # The worker reaps the script only under _proc_lock, so the shell
            # is at worst a zombie here: its pid (= the group id, see
            # start_new_session) cannot belong to anyone else yet.
            logger.info("stopping the startup script (process group %d)", proc.pid)
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                return self._forwarder
            deadline = time.monotonic() + SCRIPT_KILL_GRACE
            while time.monotonic() < deadline and not _has_exited(proc.pid):
                time.sleep(0.02)
            # Whatever is left of the group (children that ignore SIGTERM, or
            # a shell that did) goes now.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            return self._forwarder

    # -- the heartbeat thread ----------------------------------------------

    def _heartbeat_main(self) -> None:
        """Report liveness every interval until stopped; failures only delay the next one.

        A 401 ends the heartbeats (the worker thread ends the agent on it); other failures
        are logged once per streak, since the worker already reports outages loudly.
        """
        interval = self._heartbeat_interval
        failing = False
        while not self._stop.wait(interval):
            try:
                interval = self._client.post_heartbeat() or interval
            except InvalidTokenError:
                return
            except ControlPlaneError as exc:
                if not failing:
                    logger.warning("heartbeat failed: %s; retrying every %.1fs", exc, interval)
                failing = True
            else:
                failing = False

    # -- the worker thread -------------------------------------------------

    def _worker_main(self) -> None:
        try:
            self.serve()
        except _Stopped:
            pass
        except InvalidTokenError as exc:
            logger.error(
                "the control plane rejected the agent token (%s); it is invalid for good, exiting",
                exc,
            )
            self._worker_exit_code = EXIT_INVALID_TOKEN
        except Exception:
            logger.exception("the agent crashed")
            self._worker_exit_code = EXIT_CRASHED

    def serve(self) -> None:
        """Initialise, then re-initialise after every reinit event, until stopped.

        Never returns normally; raises ``InvalidTokenError`` on a 401 and
        ``_Stopped`` once a stop was requested.
        """
        self.initialise()
        while True:
            event = self.wait_for_reinit()
            if event is None:
                continue
            logger.info(
                "reinit: reason=%s workspace_id=%s owner_id=%s",
                event["reason"],
                event["workspace_id"],
                event["owner_id"],
            )
            self.initialise()

    def initialise(self) -> bool:
        """Fetch the manifest, report ``starting``, run the script, report its result.

        Re-fetching the manifest is what records the agent as initialised for
        the current owner on the server. Returns whether the script succeeded.
        """
        manifest = self.fetch_manifest()
        logger.info(
            "manifest: agent=%s workspace=%s owner=%s is_prebuild=%s",
            manifest.agent_name,
            manifest.workspace_name,
            manifest.owner_username,
            manifest.is_prebuild,
        )
        self.report_lifecycle("starting")
        exit_code = self.run_startup_script(manifest)
        succeeded = exit_code == 0
        self.report_lifecycle("ready" if succeeded else "start_error")
        return succeeded

    def fetch_manifest(self) -> Manifest:
        """The current manifest, retried until one arrives (401 raises ``InvalidTokenError``)."""

        def fetch() -> Manifest:
            try:
                return Manifest.from_json(self._client.get_manifest())
            except ManifestError as exc:
                raise ControlPlaneError(str(exc)) from exc

        return self._retrying("fetch manifest", fetch)

    def report_lifecycle(self, state: LifecycleState) -> None:
        """Deliver ``state``, retrying until it arrives; raises ``_Stopped`` once stopping."""

        def post() -> None:
            with self._report_lock:
                self._check_stop()
                self._client.post_lifecycle(state)

        self._retrying(f"report lifecycle {state}", post)
        logger.info("lifecycle: %s", state)

    def wait_for_reinit(self) -> ReinitEvent | None:
        """One long-poll of the reinit endpoint (errors retried); ``None`` when it timed out."""
        started = time.monotonic()
        event = self._retrying(
            "wait for reinit", lambda: self._client.wait_for_reinit(self._reinit_wait)
        )
        # A proxy that answers 204 at once would turn the long-poll into a busy
        # loop; pace polls to at most one per backoff_base.
        elapsed = time.monotonic() - started
        if event is None and elapsed < self._backoff_base:
            self._sleep(self._backoff_base - elapsed)
        return event

    def run_startup_script(self, manifest: Manifest) -> int:
        """Run the startup script with ``/bin/sh -c`` in the working directory; return its status.

        An empty script succeeds without starting anything. The script runs in
        its own session (process group) so shutdown can stop everything it
        started; its output goes to our stdout line by line, prefixed.
        """
        if not manifest.startup_script.strip():
            logger.info("no startup script")
            return 0
        environment = script_environment(manifest, os.environ)
        with self._proc_lock:
            self._check_stop()
            try:
                proc = subprocess.Popen(
                    ["/bin/sh", "-c", manifest.startup_script],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    env=environment,
                    start_new_session=True,
                )
            except OSError as exc:
                logger.error("could not start the startup script: %s", exc)
                return 127
            assert proc.stdout is not None
            forwarder = threading.Thread(
                target=self._forward_output, args=(proc.stdout,), name="script-output", daemon=True
            )
            forwarder.start()
            self._proc = proc
            self._forwarder = forwarder
        logger.info("startup script started (pid %d)", proc.pid)

        # Wait without reaping (WNOWAIT): the pid must stay ours until we hold
        # _proc_lock, or shutdown could signal a recycled process group.
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        with self._proc_lock:
            exit_code = proc.wait()
            self._proc = None
            self._forwarder = None
        forwarder.join(OUTPUT_DRAIN_TIMEOUT)
        self._check_stop()
        logger.info("startup script exited with code %d", exit_code)
        return exit_code

    def _forward_output(self, pipe: IO[bytes]) -> None:
        # Runs until EOF, which background processes started by the script may
        # delay for ever; their output keeps being forwarded meanwhile.
        prefix = SCRIPT_OUTPUT_PREFIX.encode()
        writable = True
        with pipe:
            for line in iter(pipe.readline, b""):
                if not writable:
                    continue  # keep draining, or the script blocks on a full pipe
                data = prefix + line.rstrip(b"\r\n") + b"\n"
                try:
                    with self._output_lock:
                        while data:
                            data = data[os.write(self._output_fd, data) :]
                except OSError as exc:
                    logger.warning("cannot forward startup script output any more: %s", exc)
                    writable = False

    # -- helpers -----------------------------------------------------------

    def _retrying(self, what: str, call: Callable[[], T]) -> T:
        backoff = self._new_backoff()
        while True:
            self._check_stop()
            try:
                return call()
            except InvalidTokenError:
                raise
            except ControlPlaneError as exc:
                delay = backoff.next_delay()
                # Outages are expected; an answer outside the contract is a bug
                # somewhere and deserves to be louder.
                level = logging.WARNING if isinstance(exc, TransientError) else logging.ERROR
                logger.log(
                    level,
                    "%s failed (attempt %d): %s; retrying in %.2fs",
                    what,
                    backoff.attempt,
                    exc,
                    delay,
                )
                self._sleep(delay)

    def _new_backoff(self) -> Backoff:
        return Backoff(self._backoff_base, self._backoff_max, self._rng)

    def _sleep(self, seconds: float) -> None:
        if self._stop.wait(seconds):
            raise _Stopped

    def _check_stop(self) -> None:
        if self._stop.is_set():
            raise _Stopped


def _has_exited(pid: int) -> bool:
    """Whether our child ``pid`` has exited, without reaping it."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


# -- command line --------------------------------------------------------------


def load_token(token_file: Path | None, environ: Mapping[str, str]) -> str:
    """The agent token: from ``token_file`` when given, else from ``$WORKSPACE_AGENT_TOKEN``.

    The explicit flag wins over the ambient environment. Raises ``TokenError``
    when neither yields a non-empty token.
    """
    if token_file is not None:
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            raise TokenError(f"cannot read --token-file {token_file}: {exc.strerror}") from exc
        if not token:
            raise TokenError(f"--token-file {token_file} is empty")
        return token
    token = environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise TokenError(
            f"no agent token: set {TOKEN_ENV} or pass --token-file PATH "
            "(a token is never accepted on the command line)"
        )
    return token


def _access_url(value: str) -> str:
    parsed = urllib.parse.urlsplit(value)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise argparse.ArgumentTypeError(f"not an http(s) URL: {value!r}")
    return value.rstrip("/")


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be positive: {value!r}")
    return number


def _reinit_wait(value: str) -> int:
    number = int(value)
    if not 1 <= number <= 300:
        raise argparse.ArgumentTypeError(f"must be between 1 and 300: {value!r}")
    return number


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: otherwise "--token SECRET" would be taken as
    # "--token-file SECRET" instead of being refused.
    parser = argparse.ArgumentParser(
        prog="python -m workspaces.agent",
        description="Warmstart workspace agent.",
        allow_abbrev=False,
    )
    parser.add_argument("--url", required=True, type=_access_url, help="the control plane's URL")
    parser.add_argument(
        "--token-file", type=Path, help=f"file holding the agent token (default: ${TOKEN_ENV})"
    )
    parser.add_argument(
        "--log-level",
        default="info",
        type=str.lower,
        choices=["debug", "info", "warning", "error"],
    )
    # Tuning knobs for tests and operators; not part of the contract.
    hidden = argparse.SUPPRESS
    parser.add_argument(
        "--backoff-base", type=_positive_float, default=DEFAULT_BACKOFF_BASE, help=hidden
    )
    parser.add_argument(
        "--backoff-max", type=_positive_float, default=DEFAULT_BACKOFF_MAX, help=hidden
    )
    parser.add_argument(
        "--reinit-wait", type=_reinit_wait, default=DEFAULT_REINIT_WAIT, help=hidden
    )
    parser.add_argument(
        "--shutdown-timeout", type=_positive_float, default=DEFAULT_SHUTDOWN_TIMEOUT, help=hidden
    )
    parser.add_argument(
        "--heartbeat-interval",
        type=_positive_float,
        default=DEFAULT_HEARTBEAT_INTERVAL,
        help=hidden,
    )
    return parser


def configure_logging(level: str) -> None:
    logging.basicConfig(
        stream=sys.stderr,
        level=level.upper(),
        format="%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m workspaces.agent``; returns the exit status."""
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level)
    try:
        token = load_token(args.token_file, os.environ)
    except TokenError as exc:
        logger.error("%s", exc)
        return EXIT_USAGE
    agent = Agent(
        ControlPlaneClient(args.url, token),
        backoff_base=args.backoff_base,
        backoff_max=args.backoff_max,
        reinit_wait=args.reinit_wait,
        shutdown_timeout=args.shutdown_timeout,
        heartbeat_interval=args.heartbeat_interval,
    )

    def on_signal(signum: int, frame: object) -> None:
        agent.request_stop(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    logger.info("agent starting; control plane %s", args.url)
    return agent.run()
