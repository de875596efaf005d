"""Benchmark of the log: appends per second (one writer, four writers) and projection rebuild rate.

Usage::

    python bench/core.py                       # SQLite file and PostgreSQL, default sizes
    python bench/core.py --backends sqlite --appends 5000 --rebuild-events 100000

Not part of the test suite: it prints figures for ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import sqlalchemy as sa

from nbexchange.committer import GroupCommitter
from nbexchange.db import make_engine, upgrade
from nbexchange.events.domain import STUDENT, Actor, Released, Submitted
from nbexchange.events.sql import SQLEventStore
from nbexchange.events.store import AppendRequest
from nbexchange.projections import PROJECTIONS, rebuild, rebuild_many
from nbexchange.tuning import tune_gc

PG_URL = os.environ.get("NBEX_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
T0 = datetime(2026, 1, 31, 23, 0, tzinfo=timezone.utc)


def fsync_latency_ms(folder: Path, rounds: int = 50) -> float:
    """Median time of a small write + fsync in ``folder``, in milliseconds."""
    path = folder / f"fsync-probe-{uuid.uuid4().hex}"
    times = []
    with open(path, "wb") as f:
        for _ in range(rounds):
            f.write(b"x" * 512)
            f.flush()
            start = time.perf_counter()
            os.fsync(f.fileno())
            times.append(time.perf_counter() - start)
    path.unlink()
    times.sort()
    return 1000 * times[len(times) // 2]


def submission(i: int, student: str) -> AppendRequest:
    return AppendRequest(
        Submitted(
            1,
            "phys101",
            "ps1",
            student,
            timestamp=T0 + timedelta(seconds=i),
            archive_sha256="b" * 64,
            archive_size=1024,
        ),
        Actor(student, STUDENT, full_name=student, email=f"{student}@example.org"),
    )


def open_backend(name: str, root: Path) -> tuple[sa.Engine, str | None]:
    """A fresh, migrated database: a SQLite file, or a new PostgreSQL schema."""
    if name == "sqlite":
        engine = make_engine(f"sqlite:///{root / f'bench-{uuid.uuid4().hex[:6]}.sqlite'}")
        upgrade(engine)
        return engine, None
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    admin.dispose()
    engine = make_engine(f"{PG_URL}?options=-csearch_path%3D{schema}")
    upgrade(engine)
    return engine, schema


def drop(schema: str | None) -> None:
    if schema:
        admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()


def appends_per_second(engine: sa.Engine, writers: int, total: int, grouped: bool) -> float:
    """Appends per second with ``writers`` threads, each waiting for its own commit."""
    store = SQLEventStore(engine)
    committer = GroupCommitter(store) if grouped else None
    append = committer.append if committer else store.append
    per_writer = total // writers

    def work(w: int) -> None:
        for i in range(per_writer):
            append(submission(i, f"w{w}-s{i % 50}"))

    threads = [threading.Thread(target=work, args=(w,)) for w in range(writers)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if committer:
        committer.close()
    assert store.verify().ok
    return per_writer * writers / elapsed


def seed(engine: sa.Engine, events: int) -> None:
    """Fill the log quickly (large batches) with a realistic mix: releases and submissions."""
    store = SQLEventStore(engine)
    batch: list[AppendRequest] = []
    for i in range(events):
        if i % 1000 == 0:
            batch.append(
                AppendRequest(
                    Released(1, "phys101", f"ps{i // 1000}", ("nb1", "nb2"), "a" * 64, 10),
                    Actor("ada", "Instructor"),
                )
            )
        else:
            request = submission(i, f"s{i % 2000}")
            event = request.event
            assert isinstance(event, Submitted)
            batch.append(
                AppendRequest(
                    Submitted(1, "phys101", f"ps{i // 1000}", event.student_id, event.timestamp, "b" * 64, 1024),
                    request.actor,
                )
            )
        if len(batch) >= 5000:
            store.append_batch(batch)
            batch = []
    store.append_batch(batch)


#: How many times the rebuild of all projections is measured.
REBUILD_PASSES = 3


def rebuild_rate(engine: sa.Engine, events: int) -> tuple[list[float], dict[str, float]]:
    """Events per second to rebuild all projections from 0, per pass (and per projection, once)."""
    seed(engine, events)
    per: dict[str, float] = {}
    for projection in PROJECTIONS:
        t = time.perf_counter()
        rebuild(engine, projection, batch_size=5000)
        per[projection.name] = events / (time.perf_counter() - t)
    # The real thing: all projections in one pass over the log (each batch read
    # and decoded once), three times: this machine's speed drifts by a quarter
    # within minutes, so one pass says little.
    rates = []
    for _ in range(REBUILD_PASSES):
        start = time.perf_counter()
        rebuild_many(engine, PROJECTIONS, batch_size=5000)
        rates.append(events / (time.perf_counter() - start))
    return rates, per


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--appends", type=int, default=4000, help="appends per measurement")
    parser.add_argument("--rebuild-events", type=int, default=100_000)
    parser.add_argument("--dir", default=None, help="folder for SQLite files (default: a temp dir on /tmp's disk)")
    args = parser.parse_args()
    # As every nbexchange process that appends or rebuilds does once it has started.
    tune_gc()
    root = Path(args.dir or tempfile.mkdtemp(prefix="nbex-bench-"))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; commit {commit}")
    print(f"fsync latency before: {fsync_latency_ms(root):.3f} ms (median of 50)")
    for backend in args.backends.split(","):
        for writers, grouped in ((1, False), (4, False), (4, True), (64, True)):
            engine, schema = open_backend(backend, root)
            try:
                rate = appends_per_second(engine, writers, args.appends, grouped)
            finally:
                engine.dispose()
                drop(schema)
            how = "group commit" if grouped else "one commit each"
            print(f"{backend:10} appends/s, {writers:2} writer(s), {how:15}: {rate:9.0f}")
        engine, schema = open_backend(backend, root)
        try:
            passes, per = rebuild_rate(engine, args.rebuild_events)
        finally:
            engine.dispose()
            drop(schema)
        detail = ", ".join(f"{name} {rate:.0f}" for name, rate in per.items())
        print(
            f"{backend:10} rebuild of {args.rebuild_events} events: {statistics.median(passes):.0f} events/s, "
            f"all projections in one pass (median of {len(passes)}: {', '.join(f'{r:.0f}' for r in passes)})"
        )
        print(f"{backend:10}   one projection alone, events/s: {detail}")
    print(f"fsync latency after: {fsync_latency_ms(root):.3f} ms")


if __name__ == "__main__":
    sys.exit(main())
