"""What a projection is, its checkpoint, and the runners: catch up, rebuild, replay."""

from __future__ import annotations

import contextlib
import functools
import logging
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine

from nbexchange.clock import utcnow
from nbexchange.db import (
    DriverInsert,
    Moment,
    driver_insert,
    is_sqlite,
    make_engine,
    metadata,
    translate_errors,
    write_transaction,
)
from nbexchange.events.sql import events_table, read_events
from nbexchange.events.store import RecordedEvent

log = logging.getLogger(__name__)

checkpoints_table = sa.Table(
    "projection_checkpoints",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("position", sa.BigInteger, nullable=False),
    sa.Column("updated_at", Moment, nullable=False),
)


class Rows:
    """A projection's write access to its tables within one transaction.

    Writes are queued and consecutive runs of the same statement are sent as
    one ``executemany``; a different statement first sends what is queued, so
    statements still take effect in the order ``apply`` issued them.
    """

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._statement: sa.Executable | DriverInsert | None = None
        self._pending: list[dict[str, Any]] = []

    def insert(self, table: sa.Table, row: dict[str, Any]) -> None:
        """Queue a row for ``table`` (every column named)."""
        self.write(driver_insert(self.conn.dialect, table), row)

    def write(self, statement: sa.Executable | DriverInsert, params: dict[str, Any]) -> None:
        """Queue a parameterised write (build ``statement`` once, with bind parameters)."""
        if statement is not self._statement:
            self.flush()
            self._statement = statement
        self._pending.append(params)

    def flush(self) -> None:
        """Send the queued writes."""
        statement = self._statement
        if self._pending and statement is not None:
            if isinstance(statement, DriverInsert):
                statement.execute(self.conn, self._pending)
            else:
                self.conn.execute(statement, self._pending)
        self._pending = []
        self._statement = None


class Projection(Protocol):
    """A read model: tables, and a pure function applying one event to their rows."""

    @property
    def name(self) -> str:
        """The projection's name, which keys its checkpoint."""
        ...

    @property
    def tables(self) -> Sequence[sa.Table]:
        """The tables it owns, parents first."""
        ...

    def apply(self, rows: Rows, event: RecordedEvent) -> None:
        """Change the rows as ``event`` says; must not read or write anything else."""
        ...

    def into(self, name: str, tables: Sequence[sa.Table]) -> Projection:
        """The same read model under another name (its checkpoint's), writing to tables of the same shape."""
        ...


#: The ``Index.info`` key marking an index that ``apply`` looks rows up by: a
#: rebuild's new table has it while it is filled. The others are made once it is full.
USED_BY_APPLY = "used_by_apply"

#: The suffix of a rebuild's new tables and checkpoints until they replace the live ones.
REBUILDING = "__rebuilding"


def checkpoint(conn: Connection, name: str) -> int:
    """The position a projection has applied up to (0 if it never ran)."""
    return checkpoints_of(conn, [name])[name]


def checkpoints_of(conn: Connection, names: Sequence[str]) -> dict[str, int]:
    """The positions these projections have applied up to (0 for one that never ran), in one query."""
    query = sa.select(checkpoints_table.c.name, checkpoints_table.c.position).where(checkpoints_table.c.name.in_(names))
    found = {row.name: int(row.position) for row in conn.execute(query)}
    return {name: found.get(name, 0) for name in names}


def checkpoints(engine: Engine) -> dict[str, int]:
    """Every projection's checkpoint."""
    with translate_errors(), engine.connect() as conn:
        return {row.name: int(row.position) for row in conn.execute(sa.select(checkpoints_table))}


def lock_checkpoint(conn: Connection, name: str) -> int:
    """Take a projection's checkpoint for this transaction (creating it at 0) and return it."""
    return lock_checkpoints(conn, [name])[name]


def lock_checkpoints(conn: Connection, names: Sequence[str]) -> dict[str, int]:
    """Take these projections' checkpoints for this transaction (creating them at 0); returns them.

    Two statements however many there are: one creates those missing, one
    takes them. On PostgreSQL that is a row lock on each, taken in the
    order of their names (every caller's order, so two callers never
    deadlock), and two workers catching up the same projection take turns
    instead of both applying the same events; SQLite's write lock is
    already held.
    """
    if not names:
        return {}
    insert = sqlite_insert if is_sqlite(conn) else pg_insert
    now = utcnow()
    conn.execute(
        insert(checkpoints_table)
        .values([{"name": name, "position": 0, "updated_at": now} for name in names])
        .on_conflict_do_nothing(index_elements=["name"])
    )
    query = (
        sa.select(checkpoints_table.c.name, checkpoints_table.c.position)
        .where(checkpoints_table.c.name.in_(names))
        .order_by(checkpoints_table.c.name)
    )
    if not is_sqlite(conn):
        query = query.with_for_update()
    return {row.name: int(row.position) for row in conn.execute(query)}


def _apply(conn: Connection, projection: Projection, events: Iterable[RecordedEvent]) -> int | None:
    """Apply events to a projection's rows on ``conn``; the last one's position (``None`` if there was none)."""
    rows = Rows(conn)
    last = None
    for event in events:
        projection.apply(rows, event)
        last = event.position
    rows.flush()
    return last


def move_checkpoint(conn: Connection, name: str, position: int) -> None:
    """Set a checkpoint taken with :func:`lock_checkpoint`."""
    move_checkpoints(conn, {name: position})


def move_checkpoints(conn: Connection, marks: dict[str, int]) -> None:
    """Set checkpoints taken with :func:`lock_checkpoints`, in one ``executemany``."""
    if marks:
        now = utcnow()
        conn.execute(
            _MOVE,
            [{"checkpoint_name": n, "checkpoint_position": p, "checkpoint_at": now} for n, p in marks.items()],
        )


_MOVE = (
    checkpoints_table.update()
    .where(checkpoints_table.c.name == sa.bindparam("checkpoint_name"))
    .values(position=sa.bindparam("checkpoint_position"), updated_at=sa.bindparam("checkpoint_at"))
)
_HEAD = sa.select(sa.func.coalesce(sa.func.max(events_table.c.position), 0))


def catch_up_many(
    engine: Engine, projections: Sequence[Projection], batch_size: int = 2000, until: int | None = None
) -> dict[str, int]:
    """Apply every event after each projection's checkpoint, a batch per transaction.

    Each batch is read and decoded once for all the projections; each
    projection's checkpoint moves in the same transaction as its rows, so a
    crash between batches loses nothing and applies nothing twice. The
    checkpoints are read, taken and moved together (a statement each, not
    one per projection).
    """
    with translate_errors(), engine.connect() as conn:
        head = int(conn.execute(_HEAD).scalar_one())
        marks = checkpoints_of(conn, [p.name for p in projections])
    target = head if until is None else min(head, until)
    if all(mark >= target for mark in marks.values()):
        return marks  # nothing to do: no write lock taken
    while True:
        with write_transaction(engine, durable=False) as conn:
            marks, read = _apply_next(conn, projections, batch_size, until)
        if read < batch_size:
            return marks


def _apply_next(
    conn: Connection, projections: Sequence[Projection], batch_size: int, until: int | None
) -> tuple[dict[str, int], int]:
    """Take the projections' checkpoints and apply the next batch of events; returns them and the events read."""
    marks = lock_checkpoints(conn, [p.name for p in projections])
    events = read_events(conn, min(marks.values()), batch_size, until_position=until)
    return _apply_past(conn, projections, marks, events), len(events)


def _apply_past(
    conn: Connection, projections: Sequence[Projection], marks: dict[str, int], events: Sequence[RecordedEvent]
) -> dict[str, int]:
    """Apply to each projection the events past its taken checkpoint, then move the checkpoints together."""
    moved: dict[str, int] = {}
    for projection in projections:
        mark = marks[projection.name]
        last = _apply(conn, projection, [e for e in events if e.position > mark])
        if last is not None:
            moved[projection.name] = last
    move_checkpoints(conn, moved)
    return {**marks, **moved}


def catch_up(engine: Engine, projection: Projection, batch_size: int = 2000, until: int | None = None) -> int:
    """Catch one projection up to the head of the log (or ``until``); returns its checkpoint."""
    return catch_up_many(engine, [projection], batch_size, until)[projection.name]


def rebuild_many(engine: Engine, projections: Sequence[Projection], batch_size: int = 5000) -> dict[str, int]:
    """Apply the whole log to new tables, then put them in place of the projections' live ones.

    The live tables keep answering, and catching up, while the new ones are
    filled a batch per transaction, as a catch-up goes (each new table has
    its key but not the indexes reads need: those are made once it is full,
    in one pass). One transaction then applies the events logged since,
    indexes the new tables and swaps them in, so a reader sees the old rows
    or the new, never a part. A crash leaves the live tables as they were and
    the next rebuild starts its new ones over. Run one at a time: of two at
    once, the later start empties the new tables (the other carries on from
    their checkpoint), and the later swap fails on finding them gone;
    neither can swap in a part.
    """
    dialect = engine.dialect.name
    builders = [p.into(p.name + REBUILDING, [_new_table(t, dialect) for t in p.tables]) for p in projections]
    with write_transaction(engine, durable=False) as conn:
        for builder in builders:
            for table in builder.tables:
                # IF EXISTS in the statement: on PostgreSQL it holds if the
                # table went while this waited for its lock (another rebuild's swap).
                conn.exec_driver_sql(f"DROP TABLE IF EXISTS {conn.dialect.identifier_preparer.format_table(table)}")
                table.create(conn)
            lock_checkpoint(conn, builder.name)
            move_checkpoint(conn, builder.name, 0)
    catch_up_many(engine, builders, batch_size)
    with write_transaction(engine, durable=False) as conn:
        lock_checkpoints(conn, [p.name for p in projections])  # the live catch-ups wait from here to the swap
        while True:
            marks, read = _apply_next(conn, builders, batch_size, None)
            if read < batch_size:
                break
        for projection, builder in zip(projections, builders, strict=True):
            for live, new in zip(projection.tables, builder.tables, strict=True):
                _swap_in(conn, live, new)
            move_checkpoint(conn, projection.name, marks[builder.name])
            conn.execute(checkpoints_table.delete().where(checkpoints_table.c.name == builder.name))
    return {p.name: marks[b.name] for p, b in zip(projections, builders, strict=True)}


#: Where a rebuild's new tables are declared, one collection per dialect
#: (their keys are named differently).
_NEW_TABLES: dict[str, sa.MetaData] = {}


@functools.cache
def _new_table(live: sa.Table, dialect: str) -> sa.Table:
    """The table a rebuild fills for ``live``: its columns and key, and the indexes ``apply`` uses."""
    # A key's name is unique on PostgreSQL (it names the key's index), so the
    # new table's is renamed at the swap; SQLite keeps it in the table's
    # text only, which the swap's rename carries over as it is.
    key = _key_name(live) + ("" if dialect == "sqlite" else REBUILDING)
    new = sa.Table(
        live.name + REBUILDING,
        _NEW_TABLES.setdefault(dialect, sa.MetaData()),
        *(sa.Column(c.name, c.type, nullable=c.nullable, autoincrement=c.autoincrement) for c in live.columns),
        sa.PrimaryKeyConstraint(*(c.name for c in live.primary_key.columns), name=key),
    )
    for index in live.indexes:
        if index.info.get(USED_BY_APPLY):
            sa.Index(f"{index.name}{REBUILDING}", *(new.c[c.name] for c in index.columns), unique=index.unique)
    return new


def _key_name(table: sa.Table) -> str:
    return str(table.primary_key.name)  # named by nbexchange.db.metadata's convention, as the migrations name it


def _swap_in(conn: Connection, live: sa.Table, new: sa.Table) -> None:
    """Drop ``live`` and give ``new`` its name, its key's name and its indexes."""
    quote = conn.dialect.identifier_preparer
    conn.exec_driver_sql(f"DROP TABLE {quote.format_table(live)}")
    for index in new.indexes:
        index.drop(conn)  # remade below under the live name
    conn.exec_driver_sql(f"ALTER TABLE {quote.format_table(new)} RENAME TO {quote.quote(live.name)}")
    if not is_sqlite(conn):
        conn.exec_driver_sql(
            f"ALTER TABLE {quote.format_table(live)} RENAME CONSTRAINT "
            f"{quote.quote(_key_name(new))} TO {quote.quote(_key_name(live))}"
        )
    for index in live.indexes:
        index.create(conn)


def rebuild(engine: Engine, projection: Projection, batch_size: int = 5000) -> int:
    """Empty one projection's tables and apply the whole log from position 0."""
    return rebuild_many(engine, [projection], batch_size)[projection.name]


def lag(engine: Engine, names: Iterable[str]) -> int:
    """How many positions the slowest of these projections is behind the log's head."""
    with translate_errors(), engine.connect() as conn:
        head = conn.execute(sa.select(sa.func.coalesce(sa.func.max(events_table.c.position), 0))).scalar_one()
        marks = dict(conn.execute(sa.select(checkpoints_table.c.name, checkpoints_table.c.position)).all())
    return max((int(head) - int(marks.get(name, 0)) for name in names), default=0)


@contextlib.contextmanager
def replay(
    source: Engine,
    projections: Sequence[Projection],
    *,
    until_position: int | None = None,
    until_time: datetime | None = None,
    batch_size: int = 5000,
    pages: Iterable[list[RecordedEvent]] | None = None,
) -> Iterator[Engine]:
    """Build projections in a private database as the log stood at a moment; yields its engine.

    The live rows are not touched (``source`` is only read); query the
    yielded engine with the projections' own query functions. Replaying the
    same moment twice gives identical rows. ``pages`` replaces the log read
    from ``source`` (a caller's selection of it, already cut at its moment),
    page by page.

    The private database is a SQLite file in a temporary folder (``TMPDIR``),
    removed on leaving, written without fsync (see ``make_engine``'s
    ``scratch``): the rows live on disk, so memory holds a page of events
    and SQLite's page cache whatever the length of the log (an in-memory
    database held 4 GB at 1,000,000 events).
    """
    with tempfile.TemporaryDirectory(prefix="nbexchange-replay-") as folder:
        private = make_engine(f"sqlite:///{Path(folder) / 'replay.sqlite'}", scratch=True)
        try:
            tables = [checkpoints_table, *(t for p in projections for t in p.tables)]
            metadata.create_all(private, tables=tables)
            if pages is None:
                pages = _log_pages(source, until_position, until_time, batch_size)
            for events in pages:
                with write_transaction(private, durable=False) as conn:
                    _apply_past(conn, projections, lock_checkpoints(conn, [p.name for p in projections]), events)
            yield private
        finally:
            private.dispose()


def _log_pages(
    source: Engine, until_position: int | None, until_time: datetime | None, batch_size: int
) -> Iterator[list[RecordedEvent]]:
    after = 0
    while True:
        with translate_errors(), source.connect() as conn:
            events = read_events(conn, after, batch_size, until_position=until_position, until_time=until_time)
        if not events:
            return
        yield events
        after = events[-1].position
        if len(events) < batch_size:
            return


def snapshot(engine: Engine, projection: Projection) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of a projection's tables in a stable order, for comparing two builds."""
    with engine.connect() as conn:
        out: dict[str, list[tuple[Any, ...]]] = {}
        for table in projection.tables:
            out[table.name] = sorted((tuple(row) for row in conn.execute(sa.select(table))), key=repr)
        return out
