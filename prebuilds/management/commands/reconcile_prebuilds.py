"""`python manage.py reconcile_prebuilds [--dry-run] [--json] [--loop] [--interval SECONDS]`.

One pass, or with `--loop` a pass every `--interval` seconds until SIGTERM or SIGINT, after
which the command finishes the pass in flight and exits 0. `--json` prints the document of
DESIGN.md section 8, one line per pass.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import threading
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand
from django.db import close_old_connections

from prebuilds.reconciler import PassResult, action_document, pass_document, reconcile


def positive_seconds(value: str) -> float:
    """argparse type for `--interval`: a finite number of seconds > 0."""
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise argparse.ArgumentTypeError(
            f"--interval must be a positive number of seconds (got {value!r})"
        )
    return seconds


class Command(BaseCommand):
    help = "Reconcile the prebuild pools once, or in a loop until SIGTERM/SIGINT."

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--dry-run", action="store_true", help="Compute, execute nothing.")
        parser.add_argument("--json", action="store_true", help="Print the JSON document.")
        parser.add_argument("--loop", action="store_true", help="Repeat until SIGTERM/SIGINT.")
        parser.add_argument(
            "--interval",
            type=positive_seconds,
            default=None,
            metavar="SECONDS",
            help="Seconds between passes with --loop (default PREBUILDS_RECONCILIATION_INTERVAL).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        self.dry_run = options["dry_run"]
        self.as_json = options["json"]
        self.stopping = threading.Event()
        if not options["loop"]:
            self.run_pass()
            return
        interval = options["interval"] or settings.PREBUILDS_RECONCILIATION_INTERVAL
        self.install_signal_handlers()
        self.loop(interval)

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT only ask the loop to stop, so a pass is never cut in half."""
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)

    def on_signal(self, signum: int, frame: object) -> None:
        self.stopping.set()

    def loop(self, interval: float) -> None:
        while not self.stopping.is_set():
            self.loop_step()
            # Event.wait returns as soon as a signal handler sets the event.
            self.stopping.wait(interval)
        self.stderr.write("reconcile_prebuilds: stopped")

    def loop_step(self) -> bool:
        """One pass inside the loop; answers whether it ran. A failing pass (database down) is
        reported and retried at the next interval instead of ending the loop."""
        # A long-lived loop must not reuse a connection past CONN_MAX_AGE or after the server
        # dropped it (done here, not in `run_pass`: it would close a caller's open transaction).
        close_old_connections()
        try:
            self.run_pass()
        except Exception as exc:
            self.stderr.write(f"reconcile_prebuilds: pass failed: {type(exc).__name__}: {exc}")
            return False
        return True

    def run_pass(self) -> PassResult:
        """One pass, printed."""
        result = reconcile(dry_run=self.dry_run)
        self.print_result(result)
        return result

    def print_result(self, result: PassResult) -> None:
        if self.as_json:
            self.stdout.write(json.dumps(pass_document(result)))
            return
        if not result.lock_acquired and not result.dry_run:
            self.stdout.write("Another reconciliation pass holds the lock; nothing done.")
            return
        mode = "dry run" if result.dry_run else ("paused" if result.paused else "pass")
        self.stdout.write(
            f"{mode}: {result.presets_seen} presets, {result.actions_taken} actions taken, "
            f"{result.errors} errors, {result.duration_seconds * 1000:.0f} ms"
        )
        for preset in result.presets:
            state, entry = preset.state, preset.entry
            actions = ", ".join(_describe(action_document(action)) for action in preset.actions)
            self.stdout.write(
                f"  {entry.organization}/{entry.template}/{entry.template_version}/{entry.name} "
                f"[{preset.status}] desired={state.desired} actual={state.actual} "
                f"eligible={state.eligible} starting={state.starting} -> "
                f"{actions or 'nothing to do'}"
            )


def _describe(action: dict[str, object]) -> str:
    if action["type"] == "delete":
        return f"delete {len(action['workspace_ids'])}"  # type: ignore[arg-type]
    if action["type"] == "backoff":
        return f"backoff until {action['until']}"
    return f"{action['type']} {action['count']}"
