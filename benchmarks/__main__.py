"""Entry point: `python -m benchmarks [--quick] --json` (the JSON object is the last line)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from benchmarks import MODULES, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="Same scale, fewer samples.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object last.")
    parser.add_argument(
        "--only",
        default="",
        metavar="NAMES",
        help="Comma-separated modules to run (e.g. mixed,load); default: all of them.",
    )
    args = parser.parse_args(argv)
    logging.getLogger("prebuilds").setLevel(logging.WARNING)  # one INFO line per pass otherwise
    only = tuple(name.strip() for name in args.only.split(",") if name.strip())
    unknown = sorted(name for name in only if f"benchmarks.{name}" not in MODULES)
    if unknown:
        parser.error(f"--only: no such module: {', '.join(unknown)}")
    results = run(quick=args.quick, only=only)
    if args.json:
        print(json.dumps(results), flush=True)
    else:
        for key, value in results.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
