"""Benchmark of the audit commands on a large SQLite log: verify, export, replay, report (time and peak memory).

Usage::

    python bench/audit.py                          # 1,000,000 events
    python bench/audit.py --events 200000 --dir /tmp/nbex-audit   # keeps (and reuses) the seeded log there

Each command runs as its own ``nbexchange`` process, as an auditor runs it,
so its peak resident memory (``ru_maxrss`` of the child) is its own. The log:
2,000 students of one course submitting to an assignment every 1,000 events
(one release each), plus one assignment with 2,000 students, each of whom
fetched, submitted twice and was collected, for the report. Not part of the
test suite: it prints figures for ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from nbexchange.clock import utcnow
from nbexchange.db import make_engine, upgrade
from nbexchange.events.domain import INSTRUCTOR, STUDENT, Actor, Collected, Fetched, Released, Submitted
from nbexchange.events.sql import SQLEventStore
from nbexchange.events.store import AppendRequest
from nbexchange.storage import LocalArchiveStore

TEACHER = Actor("ada", INSTRUCTOR)
STUDENTS = 2000


def seed(root: Path, events: int) -> None:
    """The log and the two archives its events name, in ``root``."""
    engine = make_engine(f"sqlite:///{root / 'nbexchange.sqlite'}")
    upgrade(engine)
    store, archives = SQLEventStore(engine), LocalArchiveStore(root)
    released = archives.store_bytes(b"the assignment").sha256
    work = archives.store_bytes(b"a submission").sha256
    actors = [Actor(f"s{i}", STUDENT, full_name=f"Student {i}", email=f"s{i}@example.org") for i in range(STUDENTS)]
    start = utcnow()
    batch: list[AppendRequest] = []

    def add(request: AppendRequest) -> None:
        batch.append(request)
        if len(batch) >= 5000:
            store.append_batch(batch)
            batch.clear()

    # The report's assignment: 2,000 students, each fetching, submitting twice, collected once.
    add(AppendRequest(Released(1, "phys101", "exam", ("nb1",), released, 14, start + timedelta(days=1)), TEACHER))
    positions = {}
    for round_ in range(2):
        for i, actor in enumerate(actors):
            stamp = start + timedelta(seconds=round_ * STUDENTS + i)
            add(AppendRequest(Submitted(1, "phys101", "exam", actor.name, stamp, work, 12), actor))
    n = 1 + 2 * STUDENTS
    store.append_batch(batch)
    batch.clear()
    for event in store.read(limit=n):
        if event.type == "submitted":
            positions[event.payload["student_id"]] = event.position
    for actor in actors:
        add(AppendRequest(Fetched(1, "phys101", "exam", actor.name, 1, released), actor))
        add(AppendRequest(Collected(1, "phys101", "exam", actor.name, positions[actor.name], work), TEACHER))
    n += 2 * STUDENTS
    i = 0
    while n < events:
        if i % 1000 == 0:
            add(AppendRequest(Released(1, "phys101", f"ps{i // 1000}", ("nb1", "nb2"), released, 14), TEACHER))
        else:
            actor = actors[i % STUDENTS]
            stamp = start + timedelta(seconds=i)
            add(AppendRequest(Submitted(1, "phys101", f"ps{i // 1000}", actor.name, stamp, work, 12), actor))
        i += 1
        n += 1
    store.append_batch(batch)
    engine.dispose()


def run(root: Path, *args: str) -> tuple[float, float, int]:
    """Seconds and peak RSS (MB) of one ``nbexchange`` command; its exit status."""
    flags = [
        f"--NbExchange.db_url=sqlite:///{root / 'nbexchange.sqlite'}",
        f"--NbExchange.base_storage_location={root}",
    ]
    start = time.perf_counter()
    with open(os.devnull, "w") as sink:
        child = subprocess.Popen(
            [sys.executable, "-m", "nbexchange", *args, *flags, "--log-level=WARN"],
            stdout=sink,
            stderr=subprocess.PIPE,
            text=True,
        )
        # wait4: this child's own peak resident memory, not the largest of any child so far.
        _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        assert child.stderr is not None
        print(f"  {args[0]} exited {code}: {child.stderr.read().strip()[-300:]}")
    return seconds, usage.ru_maxrss / 1024, code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--dir", default=None, help="folder of the log (seeded once, reused if present)")
    parser.add_argument("--commands", default="verify,export,replay,report", help="which to measure")
    args = parser.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="nbex-audit-"))
    root.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; commit {commit}")
    if not (root / "nbexchange.sqlite").exists():
        start = time.perf_counter()
        seed(root, args.events)
        print(f"seeded {args.events:,} events in {time.perf_counter() - start:.0f} s")
    size = (root / "nbexchange.sqlite").stat().st_size / 1e6
    print(f"log: {root / 'nbexchange.sqlite'} ({size:.0f} MB)")
    middle = args.events // 2
    commands = {
        "verify": ("verify",),
        "export": ("export", f"--output={root / 'export.jsonl'}"),
        "replay": ("replay", f"--until-position={middle}", "--course=phys101", "--assignment=ps100"),
        "report": ("report", "--course=phys101", "--assignment=exam", "--format=csv"),
    }
    for name in args.commands.split(","):
        (root / "export.jsonl").unlink(missing_ok=True)
        seconds, peak, status = run(root, *commands[name])
        print(f"{name:8} {seconds:7.1f} s   peak RSS {peak:7.0f} MB   exit {status}")


if __name__ == "__main__":
    main()
