"""Process-wide settings every long-running nbexchange process starts with."""

from __future__ import annotations

import gc


def tune_gc() -> None:
    """Keep the garbage collector out of answers' tail latency and out of rebuilds.

    Call it once the process has made its long-lived objects (modules, the
    app, the Celery worker): they are collected once and frozen, so later
    collections skip them. The youngest generation is then collected every
    50,000 allocations, not 700. Listing 10,000 submissions allocates that
    many rows, and each collection it triggered walked the heap: measured
    over 200 such lists on a quiet exchange, p95 93 → 62–65 ms, p99 99 →
    67–80 ms. A rebuild allocates a few dicts per event and spent 7–9 % of
    its time collecting them (bench/README.md).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 10, 10)
