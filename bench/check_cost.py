"""CPU per archive check through the worker's task alone: N submitted archives, checked a message at a time.

    python bench/check_cost.py [N] [--size 1MB] [--db-url URL] [--compressible] [--per-message 8] [--beside-loop]
                               [--walk-only]

Submits N students' archives (1 MB of incompressible bytes in deflate's
stored blocks, as ``bench/deadline.py`` sends; or, with ``--compressible``,
notebooks of JSON that compress about 45:1), then times ``check_archives`` on
their positions in messages of eight (``CHECKS_PER_MESSAGE``; while uploads
arrive the dispatcher sends ``CHECKS_PER_BUSY_MESSAGE``): read the
events, look for earlier outcomes, read each blob once (sha256, inflate, the
tar walk and the rules), append the outcomes; the CPU counted is the whole
process's, so the projector's catch-up after each commit is in it. One
process, no HTTP, no broker; SQLite by default, its files in a scratch folder
removed afterwards. Run it against two commits' trees
(``PYTHONPATH=TREE:TREE/plugin``) to compare them: end to end, the deadline
benchmark's runs differ by more than a change of this size.

With ``--walk-only`` it times ``inspect_archive`` alone on each stored blob
(inflate, the tar walk, the rules): no sha256, no events, no projections.

With ``--beside-loop`` the checks run beside a thread that stands for the
embedded process's event loop: short spells of Python work, each ended by a
call that gives the interpreter's lock up (``select`` with no wait), as the
loop's socket calls do. It reports the checking thread's own CPU and what the
loop got done meanwhile, against the loop alone for as long: in embedded mode
every hand-over of the lock between a check and the loop costs the uploads.
"""

from __future__ import annotations

import argparse
import select
import shutil
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from payloads import SubmissionBodies, notebooks_archive, random_blob

from nbexchange.app import NbExchange
from nbexchange.exchange import Exchange
from nbexchange.identity.base import User
from nbexchange.projections import catch_up_all
from nbexchange.runtime import Runtime
from nbexchange.workers.app import CHECKS_PER_MESSAGE, in_messages
from nbexchange.workers.archives import inspect_archive
from nbexchange.workers.tasks import check_archives


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", type=int, nargs="?", default=400)
    parser.add_argument("--size", type=int, default=1024 * 1024)
    parser.add_argument("--db-url", default="", help="the database (default: a SQLite file in a scratch folder)")
    parser.add_argument("--compressible", action="store_true", help="notebooks of JSON, not incompressible bytes")
    parser.add_argument("--per-message", type=int, default=CHECKS_PER_MESSAGE, help="archives per check message")
    parser.add_argument("--beside-loop", action="store_true", help="check beside a thread standing for the event loop")
    parser.add_argument(
        "--walk-only",
        action="store_true",
        help="time only the walk (inspect_archive on each stored blob: inflate, tar walk, rules), without the "
        "check's sha256 and bookkeeping",
    )
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="nbx-check-cost-"))
    settings = NbExchange(base_storage_location=str(folder), check_defer_max=1000.0)
    if args.db_url:
        settings.db_url = args.db_url
    runtime = Runtime(settings)
    exchange = Exchange(runtime, 10.0)
    release = runtime.archives.store_bytes(notebooks_archive("release", 1000))
    course = f"c{int(time.time())}"  # a shared database keeps earlier runs' events
    teacher = User(name="ada", org_id=1, courses={course: "Instructor"})
    exchange.release(teacher, course, "a", ["nb0"], release)
    catch_up_all(runtime.engine)
    bodies = SubmissionBodies(args.size, random_blob(args.size))
    now = datetime.now(timezone.utc)
    positions, blobs = [], []
    for i in range(args.n):
        student = User(name=f"s{i}", org_id=1, courses={course: "Student"})
        data = notebooks_archive(student.name, args.size) if args.compressible else b"".join(bodies.parts(student.name))
        upload = runtime.archives.store_bytes(data)
        blobs.append(upload.sha256)
        positions.append(exchange.submit(student, course, "a", now, upload).event.position)
    loop = Loop() if args.beside_loop else None
    if loop is not None:
        alone = loop.spells_per_second(2.0)
        loop.start()
    wall, cpu, own = time.perf_counter(), time.process_time(), time.thread_time()
    if args.walk_only:
        for sha in blobs:
            with runtime.archives.open(sha) as stored:
                inspect_archive(stored, runtime.limits)
    else:
        for message in in_messages(positions, args.per_message):
            check_archives(runtime, message)
    wall, cpu, own = time.perf_counter() - wall, time.process_time() - cpu, time.thread_time() - own
    kind = "notebooks" if args.compressible else "incompressible"
    how = "the walk alone" if args.walk_only else f"{args.per_message} to a message"
    print(
        f"{args.n} checks of {len(data)}-byte archives ({kind}), {how}: "
        f"{1000 * wall / args.n:.3f} ms wall, {1000 * cpu / args.n:.3f} ms CPU each (the process), "
        f"{1000 * own / args.n:.3f} ms of the checking thread's"
    )
    if loop is not None:
        beside = loop.stop() / wall
        lost = 1000 * (alone - beside) / alone * wall / args.n
        print(
            f"the loop alone: {alone:.0f} spells/s; beside the checks: {beside:.0f} spells/s "
            f"({beside / alone:.2f} x), {lost:.3f} ms of the loop's time lost per check"
        )
    runtime.close()
    shutil.rmtree(folder)


class Loop:
    """A thread standing for the event loop: spells of Python work, each ending in a call that lets the lock go."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._spells = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _spell() -> None:
        headers = {f"h{i}": str(i) for i in range(40)}
        sum(len(k) + len(v) for k, v in headers.items())
        select.select([], [], [], 0)

    def spells_per_second(self, seconds: float) -> float:
        """The spells this thread would do alone, measured here for ``seconds``."""
        count, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            self._spell()
            count += 1
        return count / seconds

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> int:
        """Stop; the spells done since the start."""
        self._stop.set()
        self._thread.join()
        return self._spells

    def _run(self) -> None:
        while not self._stop.is_set():
            self._spell()
            self._spells += 1


if __name__ == "__main__":
    main()
