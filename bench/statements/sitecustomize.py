"""Counts the SQL statements a benchmarked nbexchange process sends, by statement and by the code that sent it.

``bench/deadline.py --count-statements`` puts this folder first on the
servers' ``PYTHONPATH`` and names a folder in ``BENCH_STATEMENTS_DIR``;
Python imports this module at start (``site``). It wraps psycopg's cursor
methods (every statement, SQLAlchemy's and those sent on the driver's own
cursor alike, and the BEGIN psycopg sends before a transaction's first) and
the connection's commit and rollback (those it sends), and every 0.5 s
writes ``<pid>.json`` there: counts keyed by "kind, the statement's start @
the nbexchange functions that sent it". Nothing is counted in a process
that is not nbexchange's, or without the variable.
"""

from __future__ import annotations

import collections
import json
import os
import re
import sys
import threading
import time
from typing import Any

_FOLDER = os.environ.get("BENCH_STATEMENTS_DIR")
_SPACES = re.compile(r"\s+")


def _caller() -> str:
    frame: Any = sys._getframe(3)
    names: list[str] = []
    while frame is not None and len(names) < 3:
        path = frame.f_code.co_filename
        if "/nbexchange/" in path and not path.endswith("/nbexchange/db.py"):
            names.append(f"{path.rsplit('/nbexchange/', 1)[1]}:{frame.f_code.co_name}")
        frame = frame.f_back
    return " < ".join(names) or "?"


def _install(folder: str) -> None:
    import psycopg

    counts: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()

    def count(kind: str, statement: Any) -> None:
        text = statement.decode() if isinstance(statement, bytes) else str(statement)
        key = f"{kind} {_SPACES.sub(' ', text)[:70]} @ {_caller()}"
        with lock:
            counts[key] += 1

    idle = psycopg.pq.TransactionStatus.IDLE

    def wrap_statement(name: str) -> None:
        original = getattr(psycopg.Cursor, name)

        def counted(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
            conn = self.connection
            if not conn.autocommit and conn.pgconn.transaction_status == idle:
                count("BEGIN", "")  # psycopg opens the transaction first, a statement of its own
            count(name, query)
            return original(self, query, *args, **kwargs)

        setattr(psycopg.Cursor, name, counted)

    def wrap_end(name: str) -> None:
        original = getattr(psycopg.Connection, name)

        def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
            if self.pgconn.transaction_status != idle:  # outside a transaction psycopg sends nothing
                count(name.upper(), "")
            return original(self, *args, **kwargs)

        setattr(psycopg.Connection, name, counted)

    for name in ("execute", "executemany", "copy"):
        wrap_statement(name)
    for name in ("commit", "rollback"):
        wrap_end(name)

    path = os.path.join(folder, f"{os.getpid()}.json")

    def dump() -> None:
        while True:
            time.sleep(0.5)
            with lock:
                data = dict(counts)
            with open(path + ".tmp", "w") as out:
                json.dump(data, out)
            os.replace(path + ".tmp", path)

    threading.Thread(target=dump, name="bench-statements", daemon=True).start()


# At this point `python -m nbexchange` has only its flags in sys.argv (all of them --NbExchange.*).
if _FOLDER and any("nbexchange" in arg.lower() for arg in sys.argv):
    _install(_FOLDER)
