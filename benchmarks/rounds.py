"""Variants timed in rounds within one process (the probes' A/B method): each round times every variant once, in
order, and reads each as its ratio to the first variant's time in that round, so that a drift of the card's clock or of
the host hits every variant alike; the medians over rounds are the result."""
from __future__ import annotations

import statistics


def interleaved_rounds(records: dict, timers: dict, rounds: int, unit: str, digits: int) -> None:
    """Run `rounds` rounds of `timers` (name -> a function returning one timing, in `unit`), in their order. Each
    records[name] gets the list `unit` of its timings (rounded to `digits`), the list "ratio" of its timing over the
    first timer's in the same round, and their medians, "median_<unit>" and "median_ratio"."""
    for _ in range(rounds):
        base = None
        for name, timer in timers.items():
            t = timer()
            base = t if base is None else base
            records[name].setdefault(unit, []).append(round(t, digits))
            records[name].setdefault("ratio", []).append(round(t / base, 4))
    for name in timers:
        r = records[name]
        r[f"median_{unit}"] = statistics.median(r[unit])
        r["median_ratio"] = statistics.median(r["ratio"])


def median_speedup(records: dict, ref: str, name: str, unit: str) -> float:
    """The median over rounds of ref's timing over name's (above 1: name was faster than ref)."""
    return statistics.median(a / b for a, b in zip(records[ref][unit], records[name][unit]))
