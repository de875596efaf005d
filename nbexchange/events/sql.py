"""The event store's SQL adapter: one append-only table on SQLite or PostgreSQL."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection, Engine

from nbexchange.clock import as_utc, utcnow
from nbexchange.db import (
    Moment,
    compile_named,
    driver_cursor,
    driver_insert,
    is_sqlite,
    metadata,
    translate_errors,
    write_transaction,
)
from nbexchange.errors import ConflictError, ExchangeError, KeyReused, NotFound, Unavailable
from nbexchange.events.domain import Actor
from nbexchange.events.store import (
    GENESIS,
    Appended,
    AppendRequest,
    RecordedEvent,
    VerifyReport,
    canonical_json,
    chain_hash,
    same_request,
    verify_chain,
)

STREAM = sa.String(1024).with_variant(sa.String(1024, collation="C"), "postgresql")

events_table = sa.Table(
    "events",
    metadata,
    sa.Column("position", sa.BigInteger, primary_key=True, autoincrement=False),
    # In byte order on PostgreSQL too (collation "C", migration 0006), as SQLite's
    # BINARY is: the events route's exact prefix match is then a range of the
    # unique index, whatever the database's own collation.
    sa.Column("stream", STREAM, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("type", sa.String(64), nullable=False),
    sa.Column("schema", sa.Integer, nullable=False),
    sa.Column("actor", sa.Text, nullable=False),
    sa.Column("recorded_at", Moment, nullable=False, index=True),
    sa.Column("idempotency_key", sa.String(512), nullable=True, unique=True),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("prev_hash", sa.String(64), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
    # The fingerprint of the request that made the event, for its idempotency
    # key: outside the hash chain, since it is no fact of the action (migration 0006).
    sa.Column("request_hash", sa.String(64), nullable=True),
    sa.UniqueConstraint("stream", "version", name="uq_events_stream_version"),
)

#: Any constant will do: every appender on PostgreSQL takes this one advisory lock.
_APPEND_LOCK = 0x6E6265786368

# Statements built once: an append runs them in a tight, serialised loop.
_HEAD = (
    sa.select(events_table.c.position, events_table.c.hash, events_table.c.recorded_at)
    .order_by(events_table.c.position.desc())
    .limit(1)
)
# One stream (the usual append): the head and that stream's version in one statement.
_HEAD_AND_VERSION = _HEAD.add_columns(
    sa.select(sa.func.max(events_table.c.version))
    .where(events_table.c.stream == sa.bindparam("stream"))
    .scalar_subquery()
    .label("stream_version")
)


class _HeadQuery:
    """SQLite: the single-stream head query, compiled once and sent on the driver's own cursor.

    It runs on every append under the lock; skipping SQLAlchemy's execution
    machinery there (and for the append's INSERT) is worth about a tenth of
    one writer's throughput. PostgreSQL reads under its lock with
    :class:`_LockedReads`.
    """

    def __init__(self, dialect: sa.Dialect) -> None:
        self.sql, self.constants = compile_named(dialect, _HEAD_AND_VERSION)
        self.recorded_at = Moment().result_processor(dialect, None)  # the column's type, as SQLAlchemy reads it

    def first(self, conn: Connection, stream: str) -> tuple[int, str, datetime, int | None] | None:
        with driver_cursor(conn, self.sql) as cursor:
            cursor.execute(self.sql, {**self.constants, "stream": stream})
            row = cursor.fetchone()
        if row is None:
            return None
        position, hash_, stored_at, version = row
        recorded_at = self.recorded_at(stored_at)
        assert recorded_at is not None  # a NOT NULL column
        return position, hash_, recorded_at, version


@functools.cache
def _head_query(dialect: sa.Dialect) -> _HeadQuery:
    return _HeadQuery(dialect)


def _read_head(conn: Connection, stream: str) -> tuple[int, str, datetime, int | None] | None:
    return _head_query(conn.dialect).first(conn, stream)


# A write decides on these, once or twice per request: built once, not per call.
# One stream by (stream, version): the unique index serves it whole, whatever plan
# a prepared statement settles on (ordering by position could walk the log).
_STREAM = (
    sa.select(events_table).where(events_table.c.stream == sa.bindparam("stream")).order_by(events_table.c.version)
)
_BY_KEY = sa.select(events_table).where(events_table.c.idempotency_key == sa.bindparam("key"))
_BY_KEYS = sa.select(events_table).where(events_table.c.idempotency_key.in_(sa.bindparam("keys", expanding=True)))
_AT_POSITIONS = sa.select(events_table).where(events_table.c.position.in_(sa.bindparam("positions", expanding=True)))
_VERSIONS = (
    sa.select(events_table.c.stream, sa.func.max(events_table.c.version))
    .where(events_table.c.stream.in_(sa.bindparam("streams", expanding=True)))
    .group_by(events_table.c.stream)
)
# PostgreSQL: one index lookup per stream or key, whatever the statistics say.
# With the list as parameters, the driver's prepared statement gets a generic
# plan after five runs, and on a log not yet analysed that plan scanned the
# whole table, testing each row against the list one by one: 0.5 s per group
# commit of 500 streams at 45,000 events, growing with the log.
_TEXTS = postgresql.ARRAY(sa.String)
# Several streams (a group commit): on PostgreSQL the lock, the head and each
# stream's version in one round trip (migration 0007), one row per stream.
_LOCK_HEADS = sa.select(
    sa.func.nbexchange_lock_heads(_APPEND_LOCK, sa.bindparam("streams", type_=_TEXTS))
    .table_valued(
        sa.column("head_position", sa.BigInteger),
        sa.column("head_hash", sa.String),
        sa.column("head_recorded_at", Moment),
        sa.column("stream_name", sa.String),
        sa.column("stream_version", sa.Integer),
    )
    .render_derived()
)
_WANTED_KEYS = sa.func.unnest(sa.bindparam("keys", type_=_TEXTS)).table_valued("key").render_derived()
# LIMIT keeps the planner from flattening the lookup into a join it may hash.
_KEYED = sa.select(events_table).where(events_table.c.idempotency_key == _WANTED_KEYS.c.key).limit(1).lateral()
_BY_KEYS_PG = sa.select(_KEYED).select_from(_WANTED_KEYS.join(_KEYED, sa.true()))


class _LockedReads:
    """PostgreSQL: what an append reads under the lock, on the driver's own cursors, in one round trip.

    The lock with the head and each stream's version (migration 0007), then
    the events already appended with the batch's idempotency keys, pipelined:
    the server runs the second after the first took the lock, in the same
    transaction, so it sees every append committed before. Every write of
    nbgrader's plugin carries a key; through SQLAlchemy's execution, each
    statement a round trip of its own, these reads cost a group commit more
    than its INSERT.
    """

    def __init__(self, dialect: sa.Dialect) -> None:
        self.heads_sql, self.heads_constants = compile_named(dialect, _LOCK_HEADS)
        self.keys_sql, self.keys_constants = compile_named(dialect, _BY_KEYS_PG)
        self.moment = Moment().result_processor(dialect, None)

    def run(
        self, conn: Connection, streams: list[str], keys: list[str]
    ) -> tuple[tuple[int, str, datetime] | None, dict[str, int], list[RecordedEvent]]:
        """The head (``None`` on an empty log), the streams' versions, and the events with these keys."""
        with driver_cursor(conn, self.heads_sql) as heads, driver_cursor(conn, self.keys_sql) as keyed:
            with heads.connection.pipeline():
                heads.execute(self.heads_sql, {**self.heads_constants, "streams": streams})
                if keys:
                    keyed.execute(self.keys_sql, {**self.keys_constants, "keys": keys})
            head_rows = heads.fetchall()
            keyed_rows = keyed.fetchall() if keys else []
        position, hash_, recorded_at = head_rows[0][:3]
        head: tuple[int, str, datetime] | None = None
        if position is not None:
            at = self.moment(recorded_at)
            assert at is not None  # a NOT NULL column
            head = (position, hash_, at)
        versions: dict[str, int] = {stream: version or 0 for *_, stream, version in head_rows}
        moment = self.moment
        known = [_row_to_event((*row[:6], moment(row[6]), *row[7:])) for row in keyed_rows]
        return head, versions, known


@functools.cache
def _locked_reads(dialect: sa.Dialect) -> _LockedReads:
    return _LockedReads(dialect)


class StoredRow(NamedTuple):
    """One event's row as the log stores it: the actor and the payload as the JSON text the chain hashed."""

    position: int
    stream: str
    version: int
    type: str
    schema: int
    actor: str
    recorded_at: datetime
    idempotency_key: str | None
    payload: str
    prev_hash: str
    hash: str

    def event(self, payload: Mapping[str, Any] | None = None) -> RecordedEvent:
        """The event this row holds (``payload``: the row's payload, if already decoded)."""
        return RecordedEvent.stored(
            position=self.position,
            stream=self.stream,
            version=self.version,
            type=self.type,
            schema=self.schema,
            actor=_actor(self.actor),
            recorded_at=self.recorded_at,
            idempotency_key=self.idempotency_key,
            payload=orjson.loads(self.payload) if payload is None else payload,
            prev_hash=self.prev_hash,
            hash=self.hash,
        )


#: An ``until_position`` past any log.
_NO_LIMIT = 2**63 - 1


class _RowsQuery:
    """A page of stored rows by position, compiled once per dialect for the driver's own cursor."""

    def __init__(self, dialect: sa.Dialect) -> None:
        columns = [events_table.c[name] for name in StoredRow._fields]
        statement = (
            sa.select(*columns)
            .where(
                events_table.c.position > sa.bindparam("after", type_=sa.BigInteger),
                events_table.c.position <= sa.bindparam("until", type_=sa.BigInteger),
            )
            .order_by(events_table.c.position)
            .limit(sa.bindparam("size", type_=sa.Integer))
        )
        self.sql, self.constants = compile_named(dialect, statement)
        self.recorded_at = Moment().result_processor(dialect, None)


@functools.cache
def _rows_query(dialect: sa.Dialect) -> _RowsQuery:
    return _RowsQuery(dialect)


@functools.lru_cache(maxsize=4096)
def _actor(text: str) -> Actor:
    # Actors repeat along the log (a course's students act again and again),
    # and an Actor is immutable: decode each stored encoding once.
    return Actor.from_json(orjson.loads(text))


def _row_to_event(row: Any) -> RecordedEvent:
    # By position: rows are ``select(events_table)``, in the table's column order.
    position, stream, version, type_, schema, actor, recorded_at, key, payload, prev_hash, hash_, request_hash = row
    return RecordedEvent.stored(
        position=position,
        stream=stream,
        version=version,
        type=type_,
        schema=schema,
        actor=_actor(actor),
        recorded_at=recorded_at,
        idempotency_key=key,
        payload=orjson.loads(payload),
        prev_hash=prev_hash,
        hash=hash_,
        request_hash=request_hash,
    )


class SQLEventStore:
    """The log in a SQL database.

    Appends are serialised by one lock (SQLite's write lock, a PostgreSQL
    advisory lock): the hash chain needs the previous hash anyway, and it
    makes commit order equal position order, so a reader tailing the log can
    never see position N+1 before N. ``UNIQUE(stream, version)`` and the
    unique idempotency key stay in the schema as the last line of defence.
    Throughput comes from :meth:`append_batch`, which commits many appends
    with one fsync.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- writing ---------------------------------------------------------

    def append(self, request: AppendRequest) -> Appended:
        """Append one event; raise ``ConflictError`` for a stale ``expected_version``."""
        (outcome,) = self.append_batch([request])
        if isinstance(outcome, ExchangeError):
            raise outcome
        return outcome

    def append_batch(self, requests: Sequence[AppendRequest]) -> list[Appended | ExchangeError]:
        """Append many events in one transaction; each fails or succeeds on its own."""
        if not requests:
            return []
        for attempt in (1, 2):
            committing = False
            try:
                with write_transaction(self.engine) as conn:
                    outcomes, rows = self._append_locked(conn, requests)
                    committing = True
                    if rows:
                        # On PostgreSQL the COMMIT goes with the INSERT, in one round trip under the lock.
                        driver_insert(conn.dialect, events_table).execute(conn, rows, commit=True)
                return outcomes
            except Unavailable as e:
                # A connection the server dropped fails at its first statement;
                # nothing was written, so one retry on a fresh connection is safe.
                # A failure once the rows are sent (with the COMMIT, on PostgreSQL)
                # has an unknown outcome: that one is raised.
                dropped = getattr(e.__cause__, "connection_invalidated", False)
                if attempt == 2 or committing or not dropped:
                    raise
        raise AssertionError("unreachable")

    def _append_locked(
        self, conn: Connection, requests: Sequence[AppendRequest]
    ) -> tuple[list[Appended | ExchangeError], list[dict[str, Any]]]:
        """Under the lock, each request's outcome, and the rows of the events to insert."""
        streams = sorted({r.stream for r in requests} | {stream for r in requests for stream, _ in r.requires})
        keys = [r.idempotency_key for r in requests if r.idempotency_key]
        versions: dict[str, int] = dict.fromkeys(streams, 0)
        head: tuple[int, str, datetime] | None
        known: dict[str, RecordedEvent] = {}
        if not is_sqlite(conn):
            head, found, keyed = _locked_reads(conn.dialect).run(conn, streams, keys)
            versions.update(found)
            known = {event.idempotency_key: event for event in keyed if event.idempotency_key}
        else:
            if len(streams) == 1:
                found_head = _read_head(conn, streams[0])
                head = found_head[:3] if found_head else None
                if found_head is not None:
                    versions[streams[0]] = found_head[3] or 0
            else:
                row = conn.execute(_HEAD).first()
                head = (row[0], row[1], row[2]) if row else None
                # SQLite takes at most 32,766 parameters a statement.
                for start in range(0, len(streams), 500):
                    for stream, version in conn.execute(_VERSIONS, {"streams": streams[start : start + 500]}):
                        versions[stream] = version or 0
            if keys:
                for row in conn.execute(_BY_KEYS, {"keys": keys}):
                    known[row.idempotency_key] = _row_to_event(row)
        position, prev_hash = (head[0], head[1]) if head else (0, GENESIS)
        # recorded_at never runs backwards along the log, even if the clock does,
        # so replaying "as of a time" and "as of a position" agree.
        now = utcnow()
        if head is not None and head[2] > now:
            now = head[2]

        outcomes: list[Appended | ExchangeError] = []
        rows: list[dict[str, Any]] = []
        for request in requests:
            key = request.idempotency_key
            if key and key in known:
                earlier = known[key]
                same = same_request(earlier, request.event.TYPE, request.stream, request.request_hash)
                outcomes.append(Appended(earlier, duplicate=True) if same else KeyReused())
                continue
            current = versions[request.stream]
            if request.expected_version is not None and request.expected_version != current:
                outcomes.append(ConflictError(request.stream, request.expected_version, current))
                continue
            moved = [(stream, seen) for stream, seen in request.requires if versions[stream] != seen]
            if moved:
                stream, seen = moved[0]
                outcomes.append(ConflictError(stream, seen, versions[stream]))
                continue
            position += 1
            event = RecordedEvent(
                position=position,
                stream=request.stream,
                version=current + 1,
                type=request.event.TYPE,
                schema=request.event.SCHEMA,
                actor=request.actor,
                recorded_at=now,
                idempotency_key=key,
                payload=request.event.to_payload(),
                prev_hash=prev_hash,
                hash="",
                request_hash=request.request_hash,
            )
            fields = event.hashed_fields()
            event_hash = chain_hash(prev_hash, fields)
            event = dataclasses.replace(event, hash=event_hash)
            # The row stores exactly the canonical encodings the hash covered.
            rows.append(
                {
                    **fields,
                    "actor": canonical_json(fields["actor"]),
                    "payload": canonical_json(fields["payload"]),
                    "recorded_at": now,
                    "prev_hash": prev_hash,
                    "hash": event_hash,
                    "request_hash": request.request_hash,
                }
            )
            prev_hash = event_hash
            versions[request.stream] = current + 1
            if key:
                known[key] = event
            outcomes.append(Appended(event))
        return outcomes, rows

    # -- reading ---------------------------------------------------------

    def read(
        self,
        after: int = 0,
        limit: int | None = None,
        *,
        until_position: int | None = None,
        until_time: datetime | None = None,
        stream: str | None = None,
    ) -> Iterator[RecordedEvent]:
        """Events with position greater than ``after``, in log order, fetched in pages."""
        page = 2000
        remaining = limit
        while remaining is None or remaining > 0:
            size = page if remaining is None else min(page, remaining)
            with translate_errors(), self.engine.connect() as conn:
                batch = read_events(
                    conn,
                    after,
                    size,
                    until_position=until_position,
                    until_time=until_time,
                    stream=stream,
                )
            yield from batch
            if len(batch) < size:
                return
            after = batch[-1].position
            if remaining is not None:
                remaining -= len(batch)

    def read_rows(
        self, after: int = 0, *, until_position: int | None = None, page: int = 20000
    ) -> Iterator[list[StoredRow]]:
        """The log's rows after ``after`` in order, page by page, as stored: ``actor`` and ``payload`` undecoded.

        For a pass over the whole log that checks or copies the stored
        encodings (``verify``, ``export``): read on the driver's own cursor,
        with no event built per row, it costs a third of :meth:`read` per
        event. ``recorded_at`` is read back aware, in UTC, as :meth:`read` has it.
        """
        rows_query = _rows_query(self.engine.dialect)
        until = _NO_LIMIT if until_position is None else until_position
        with translate_errors(), self.engine.connect() as conn:
            while True:
                with driver_cursor(conn, rows_query.sql) as cursor:
                    bounds = {"after": after, "until": until, "size": page}
                    cursor.execute(rows_query.sql, {**rows_query.constants, **bounds})
                    rows = cursor.fetchall()
                if not rows:
                    return
                moment, make = rows_query.recorded_at, StoredRow._make
                yield [make((*row[:6], moment(row[6]), *row[7:])) for row in rows]
                if len(rows) < page:
                    return
                after = rows[-1][0]

    def read_streams(
        self, streams: Sequence[str] = (), prefixes: Sequence[str] = (), after: int = 0, limit: int = 100
    ) -> list[RecordedEvent]:
        """A page of events in any of ``streams`` or in a stream starting with one of ``prefixes``.

        Both compare exactly, byte for byte, on every backend: ``PHYS101/`` is not a prefix of ``phys101/…``.
        """
        # SQLite's LIKE ignores ASCII case, and PostgreSQL's collation may be linguistic (a range
        # there would miss streams or take in others): prefixes compare in the bytes' own order.
        binary = "BINARY" if self.engine.dialect.name == "sqlite" else "C"
        matches = [_starts_with(events_table.c.stream, p, binary) for p in prefixes]
        if streams:
            matches.append(events_table.c.stream.in_(list(streams)))
        query = (
            sa.select(events_table)
            .where(events_table.c.position > after, sa.or_(*matches))
            .order_by(events_table.c.position)
            .limit(limit)
        )
        with translate_errors(), self.engine.connect() as conn:
            return [_row_to_event(row) for row in conn.execute(query)]

    def get(self, position: int) -> RecordedEvent:
        """The event at ``position``; ``NotFound`` if there is none."""
        with translate_errors(), self.engine.connect() as conn:
            row = conn.execute(sa.select(events_table).where(events_table.c.position == position)).first()
        if row is None:
            raise NotFound(f"There is no event at position {position}.")
        return _row_to_event(row)

    def get_many(self, positions: Sequence[int]) -> dict[int, RecordedEvent]:
        """The events at these positions, by position (those that exist), in one query."""
        if not positions:
            return {}
        with translate_errors(), self.engine.connect() as conn:
            rows = conn.execute(_AT_POSITIONS, {"positions": list(positions)})
            return {row.position: _row_to_event(row) for row in rows}

    def head(self) -> int:
        """The position of the last committed event (0 for an empty log)."""
        with translate_errors(), self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.coalesce(sa.func.max(events_table.c.position), 0))).scalar_one())

    def stream_version(self, stream: str) -> int:
        """The version of the last event in ``stream`` (0 if it has none)."""
        with translate_errors(), self.engine.connect() as conn:
            value = conn.execute(
                sa.select(sa.func.coalesce(sa.func.max(events_table.c.version), 0)).where(
                    events_table.c.stream == stream
                )
            ).scalar_one()
        return int(value)

    def read_stream(self, stream: str) -> list[RecordedEvent]:
        """Every event of one stream, in order: what a write on that stream is decided on."""
        with translate_errors(), self.engine.connect() as conn:
            return [_row_to_event(row) for row in conn.execute(_STREAM, {"stream": stream})]

    def by_idempotency_key(self, key: str) -> RecordedEvent | None:
        """The event appended with ``key``, if any."""
        with translate_errors(), self.engine.connect() as conn:
            row = conn.execute(_BY_KEY, {"key": key}).first()
        return _row_to_event(row) if row else None

    def by_idempotency_keys(self, keys: Sequence[str]) -> dict[str, RecordedEvent]:
        """The events appended with these keys, by key (those that exist), in one query."""
        if not keys:
            return {}
        with translate_errors(), self.engine.connect() as conn:
            query = _BY_KEYS if is_sqlite(conn) else _BY_KEYS_PG
            return {row.idempotency_key: _row_to_event(row) for row in conn.execute(query, {"keys": list(keys)})}

    def verify(self) -> VerifyReport:
        """Recompute every hash and link of the chain, from the first event to the head."""
        return verify_chain(self.read())


def read_events(
    conn: Connection,
    after: int,
    limit: int,
    *,
    until_position: int | None = None,
    until_time: datetime | None = None,
    stream: str | None = None,
) -> list[RecordedEvent]:
    """Up to ``limit`` events after ``after``, read on ``conn`` (inside its transaction)."""
    query = sa.select(events_table).where(events_table.c.position > after)
    if until_position is not None:
        query = query.where(events_table.c.position <= until_position)
    if until_time is not None:
        query = query.where(events_table.c.recorded_at <= as_utc(until_time))
    if stream is not None:
        query = query.where(events_table.c.stream == stream)
    query = query.order_by(events_table.c.position).limit(limit)
    return [_row_to_event(row) for row in conn.execute(query).all()]


def _starts_with(column: sa.ColumnElement[str], prefix: str, collation: str) -> sa.ColumnElement[bool]:
    """``column`` starts with ``prefix``, exactly: a range in ``collation``, a binary order an index can serve."""
    text = column.collate(collation)
    above = _successor(prefix)
    return text >= prefix if above is None else sa.and_(text >= prefix, text < above)


def _successor(prefix: str) -> str | None:
    """The least string, in code point order, above every string that starts with ``prefix`` (None: no bound)."""
    while prefix:
        code = ord(prefix[-1]) + 1
        if 0xD800 <= code <= 0xDFFF:
            code = 0xE000  # surrogates are not characters and cannot be stored as UTF-8
        if code <= 0x10FFFF:
            return prefix[:-1] + chr(code)
        prefix = prefix[:-1]
    return None
