"""CPU per submission through the use case alone: N sequential ``Exchange.submit`` calls, SQLite, embedded.

    python bench/submit_cost.py [N]

Measures deciding and appending (and waiting for the committer's fsync), without
HTTP, in one process; run it against two commits' trees (``PYTHONPATH=TREE:TREE/plugin``)
to compare them.
"""

from __future__ import annotations

import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from nbexchange.app import NbExchange
from nbexchange.exchange import Exchange
from nbexchange.identity.base import User
from nbexchange.projections import catch_up_all
from nbexchange.runtime import Runtime


def main(n: int) -> None:
    settings = NbExchange(base_storage_location=str(Path(tempfile.mkdtemp())), check_defer_max=1000.0)
    runtime = Runtime(settings)
    exchange = Exchange(runtime, 10.0)
    teacher = User(name="ada", org_id=1, courses={"c": "Instructor"})
    upload = runtime.archives.store_bytes(b"\x1f\x8b" + b"x" * 100)
    exchange.release(teacher, "c", "a", ["nb1"], upload)
    catch_up_all(runtime.engine)  # code that decides on the read models needs them
    students = [User(name=f"s{i}", org_id=1, courses={"c": "Student"}) for i in range(n)]
    now = datetime.now(timezone.utc)
    wall, cpu = time.perf_counter(), time.process_time()
    for student in students:
        exchange.submit(student, "c", "a", now, upload)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(f"{n} submissions: {1000 * wall / n:.3f} ms wall, {1000 * cpu / n:.3f} ms CPU each")
    runtime.close()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000)
