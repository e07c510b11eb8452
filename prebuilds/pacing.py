"""Pacing pool fills: how many of the prebuilds a pass decided to create it creates now.

Pure (no Django, no database), beside the reconciliation core rather than in it: the core
decides what each pool needs (DESIGN.md §4); this decides how much of that the workers get at
once. A pass that wants 200 prebuilds would otherwise queue 200 builds at once, and every other
preset's refill (and, with one worker pool, every claim) would wait behind them.

Rules:

- a preset never has more than ``per_preset_limit`` prebuild builds in flight (pending or
  running), the deployment never more than ``limit``; 0 means no such cap;
- builds already in flight count, whoever queued them; deletions are never held back (they are
  not decided here), but the ones in flight count against the caps;
- when the global cap cannot serve everyone, the room goes round by round, one build per preset
  per round, the preset with the fewest prebuilds (running and in flight) first: an empty pool
  gets its first replacement before a nearly full one gets its last;
- what is not created now is created by a later pass (the next one after a build finishes).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Demand:
    """One preset's wish in a pass: ``want`` creations, ``in_flight`` prebuild builds pending or
    running now, ``supply`` prebuilds it has or will have (running and in flight)."""

    key: Hashable
    want: int
    in_flight: int
    supply: int


def allowed_creations(
    demands: Sequence[Demand], *, in_flight_total: int, limit: int, per_preset_limit: int
) -> dict[Hashable, int]:
    """How many creations each preset may make now (every key of ``demands``, 0 included).

    ``in_flight_total`` counts every prebuild build in flight in the deployment, including
    those of presets that want nothing this pass.
    """
    room: dict[Hashable, int] = {}
    for demand in demands:
        want = max(demand.want, 0)
        if per_preset_limit > 0:
            want = min(want, max(per_preset_limit - demand.in_flight, 0))
        room[demand.key] = want
    if limit <= 0:
        return room
    budget = max(limit - in_flight_total, 0)
    allowed = {demand.key: 0 for demand in demands}
    order = [d.key for d in sorted(demands, key=lambda d: d.supply)]  # stable: ties keep order
    while budget > 0:
        gave = False
        for key in order:
            if budget == 0:
                break
            if allowed[key] < room[key]:
                allowed[key] += 1
                budget -= 1
                gave = True
        if not gave:
            break
    return allowed
