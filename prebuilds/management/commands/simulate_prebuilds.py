"""`python manage.py simulate_prebuilds [--preset ID] [--days N] [--demand FILE]
[--policy fixed:N|schedule|target:R ...] [--seed N] [--json]` (DESIGN.md section 8).

Replays a preset's recorded demand (or a CSV file's) through the pure core in simulated time
and reports, per policy, `hit_rate`, `misses`, `wait_p95_s`, `idle_prebuild_hours` and
`builds`. Writes nothing. Bad input: a message naming the option, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from prebuilds.backtest import BacktestError, backtest_prepare


def _positive(option: str):
    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number) or number <= 0:
            raise argparse.ArgumentTypeError(f"{option} must be a positive number (got {value!r})")
        return number

    return parse


def _seed(value: str) -> int:
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"--seed must be a whole number >= 0 (got {value!r})")
    return int(value)


class Command(BaseCommand):
    help = "Backtest pool sizing policies on recorded demand (simulated time; writes nothing)."

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--preset", metavar="ID", help="The preset whose demand to replay.")
        parser.add_argument(
            "--days", type=_positive("--days"), default=7.0, help="Days to replay (default 7)."
        )
        parser.add_argument(
            "--demand", metavar="FILE", help="CSV with columns requested_at, preset."
        )
        parser.add_argument(
            "--build-seconds-file",
            metavar="FILE",
            help="Build durations to draw from, one number of seconds a line.",
        )
        parser.add_argument(
            "--policy",
            action="extend",
            nargs="+",
            default=[],
            metavar="POLICY",
            help="fixed:N, schedule or target:R; several (`--policy a b` or `--policy a "
            "--policy b`) to compare (default: the preset's own).",
        )
        parser.add_argument("--seed", type=_seed, default=0)
        parser.add_argument(
            "--interval",
            type=_positive("--interval"),
            default=None,
            metavar="SECONDS",
            help="Seconds between simulated passes (default PREBUILDS_RECONCILIATION_INTERVAL).",
        )
        parser.add_argument("--json", action="store_true", help="Print one JSON document.")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            backtest = backtest_prepare(
                preset_id=options["preset"],
                days=options["days"],
                demand_path=options["demand"],
                build_seconds_path=options["build_seconds_file"],
                policies=options["policy"],
                interval=options["interval"],
            )
        except BacktestError as exc:
            raise CommandError(str(exc), returncode=2) from None
        reports = backtest.run(options["seed"])
        document = {
            "preset": backtest.preset,
            "start": backtest.start.isoformat(),
            "end": backtest.end.isoformat(),
            "requests": backtest.scored_requests(),
            "build_samples": len(backtest.build_seconds),
            "seed": options["seed"],
            "policies": [report.as_dict() for report in reports],
        }
        if options["json"]:
            self.stdout.write(json.dumps(document))
            return
        self.stdout.write(
            f"{backtest.preset}: {document['requests']} requests from "
            f"{backtest.start:%Y-%m-%d %H:%M} to {backtest.end:%Y-%m-%d %H:%M} UTC, "
            f"{len(backtest.build_seconds)} build durations, seed {options['seed']}"
        )
        self.stdout.write(
            f"{'policy':<14} {'hit rate':>8} {'misses':>7} {'wait p95 s':>10} "
            f"{'idle prebuild h':>15} {'builds':>7}"
        )
        for report in reports:
            rate = "-" if report.hit_rate is None else f"{report.hit_rate:.3f}"
            self.stdout.write(
                f"{report.policy:<14} {rate:>8} {report.misses:>7} {report.wait_p95_s:>10.0f} "
                f"{report.idle_prebuild_hours:>15.1f} {report.builds:>7}"
            )
