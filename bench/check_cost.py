"""CPU per archive check through the worker's task alone: N submitted archives, checked eight to a message.

    python bench/check_cost.py [N] [--size 1MB] [--db-url URL] [--compressible]

Submits N students' archives (1 MB of incompressible bytes in deflate's
stored blocks, as ``bench/deadline.py`` sends; or, with ``--compressible``,
notebooks of JSON that compress about 45:1), then times ``check_archives`` on
their positions in messages of eight (``CHECKS_PER_MESSAGE``): read the
events, look for earlier outcomes, read each blob once (sha256, inflate, the
tar walk and the rules), append the outcomes; the CPU counted is the whole
process's, so the projector's catch-up after each commit is in it. One
process, no HTTP, no broker; SQLite by default, its files in a scratch folder
removed afterwards. Run it against two commits' trees
(``PYTHONPATH=TREE:TREE/plugin``) to compare them: end to end, the deadline
benchmark's runs differ by more than a change of this size.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from payloads import SubmissionBodies, notebooks_archive, random_blob

from nbexchange.app import NbExchange
from nbexchange.exchange import Exchange
from nbexchange.identity.base import User
from nbexchange.projections import catch_up_all
from nbexchange.runtime import Runtime
from nbexchange.workers.app import CHECKS_PER_MESSAGE
from nbexchange.workers.tasks import check_archives


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", type=int, nargs="?", default=400)
    parser.add_argument("--size", type=int, default=1024 * 1024)
    parser.add_argument("--db-url", default="", help="the database (default: a SQLite file in a scratch folder)")
    parser.add_argument("--compressible", action="store_true", help="notebooks of JSON, not incompressible bytes")
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
    positions = []
    for i in range(args.n):
        student = User(name=f"s{i}", org_id=1, courses={course: "Student"})
        data = notebooks_archive(student.name, args.size) if args.compressible else b"".join(bodies.parts(student.name))
        upload = runtime.archives.store_bytes(data)
        positions.append(exchange.submit(student, course, "a", now, upload).event.position)
    wall, cpu = time.perf_counter(), time.process_time()
    for start in range(0, len(positions), CHECKS_PER_MESSAGE):
        check_archives(runtime, positions[start : start + CHECKS_PER_MESSAGE])
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    kind = "notebooks" if args.compressible else "incompressible"
    print(
        f"{args.n} checks of {len(data)}-byte archives ({kind}): "
        f"{1000 * wall / args.n:.3f} ms wall, {1000 * cpu / args.n:.3f} ms CPU each"
    )
    runtime.close()
    shutil.rmtree(folder)


if __name__ == "__main__":
    main()
