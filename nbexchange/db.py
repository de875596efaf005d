"""The database: one metadata for every table, engines tuned per backend, and migrations."""

from __future__ import annotations

import contextlib
import functools
import logging
import operator
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import event as sa_event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import StaticPool

from nbexchange.clock import as_utc, format_utc_wall, parse_utc_wall
from nbexchange.errors import Unavailable

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger(__name__)

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "pk": "pk_%(table_name)s",
    }
)

MIGRATIONS = Path(__file__).with_name("migrations")


class Moment(sa.types.TypeDecorator[datetime]):
    """A moment in time: ``timestamptz`` on PostgreSQL, text on SQLite; read back aware, in UTC.

    On SQLite the text is SQLAlchemy's DATETIME format (wall time in UTC,
    microseconds, no offset) but made and parsed here, replacing SQLAlchemy's
    processors on purpose: they keep a non-UTC time's wall clock and drop its
    offset, read back naive, and a replay reads one per event while a rebuild
    writes several (making a naive time aware alone cost 1.7 µs here).
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def bind_processor(self, dialect: sa.Dialect) -> Callable[[Any], Any] | None:
        if dialect.name == "sqlite":
            return _sqlite_text
        return self.impl_instance.bind_processor(dialect)

    def result_processor(self, dialect: sa.Dialect, coltype: object) -> Callable[[Any], datetime | None]:
        if dialect.name == "sqlite":
            return _parse_sqlite_text
        return _aware_utc


def _sqlite_text(value: datetime | None) -> str | None:
    return None if value is None else format_utc_wall(value)


def _parse_sqlite_text(value: str | None) -> datetime | None:
    return None if value is None else parse_utc_wall(value)


def _aware_utc(value: datetime | None) -> datetime | None:
    return None if value is None else as_utc(value)


#: The type of a key that is a log position: BIGINT, but INTEGER on SQLite,
#: where only an INTEGER primary key is the row's own rowid. Any other type
#: makes SQLite keep a second B-tree beside the table for the key.
POSITION = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def with_pg_options(url: sa.URL, *settings: str) -> sa.URL:
    """``url`` with server settings (``name=value``) added to its own ``options`` (a search_path, say).

    Added to the URL rather than given as ``connect_args``, which would
    replace the URL's ``options`` instead of adding to them.
    """
    given = url.query.get("options", "")
    options = " ".join(given) if isinstance(given, tuple) else given
    return url.update_query_dict({"options": " ".join([options, *(f"-c {s}" for s in settings)]).strip()})


def dead_client_settings(timeout: float) -> list[str]:
    """PostgreSQL's session settings that end a session within ``timeout`` s of its client becoming unreachable.

    A client host that vanishes (cut off, powered off) sends no FIN: the
    server keeps its session, and any lock it holds, until TCP gives up,
    which by the kernel's defaults takes hours. Every append holds one lock
    (the log's), so a host lost mid-append would stop every host's writes.
    Keepalive probes end an idle session (one waiting, inside a transaction,
    for its client's next statement) after half of ``timeout`` plus three
    unanswered probes; ``tcp_user_timeout`` ends one whose last answer was
    never acknowledged. A client that is alive answers both, however slow it
    is. 0: the server's own settings.
    """
    if timeout <= 0:
        return []
    idle, interval = max(1, round(timeout / 2)), max(1, round(timeout / 6))
    return [
        f"tcp_keepalives_idle={idle}",
        f"tcp_keepalives_interval={interval}",
        "tcp_keepalives_count=3",
        f"tcp_user_timeout={round(timeout * 1000)}",
    ]


def _enter_wal(cursor: Any, timeout: float) -> None:
    """``PRAGMA journal_mode=WAL``, waiting out other connections' locks as a statement would.

    SQLite does not call its busy handler for a change of journal mode: on a
    new database that several processes open at once (replicas starting
    together), the one that does not convert it gets "database is locked"
    at once. It is tried again here, for as long as the busy timeout.
    """
    import sqlite3

    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() >= deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.25)


def make_engine(url: str, dead_client_timeout: float = 0.0, *, scratch: bool = False, **kwargs: Any) -> Engine:
    """An engine for ``url``: SQLite in WAL mode with fsync'd commits, or PostgreSQL.

    On SQLite, transactions begin ``DEFERRED`` unless the connection's
    execution option ``sqlite_immediate`` is set, in which case they take the
    write lock at ``BEGIN`` (see :func:`write_transaction`). On PostgreSQL,
    with ``dead_client_timeout``, the server drops a session whose client it
    cannot reach within that many seconds (see :func:`dead_client_settings`).

    ``scratch``: a private SQLite file that nothing needs after a crash (a
    replay's): its journal is in memory and nothing is fsync'd, since
    a replay need not wait on a disk other work shares.
    """
    sa_url = sa.make_url(url)
    if sa_url.get_backend_name() != "sqlite":
        kwargs.setdefault("pool_size", 10)
        kwargs.setdefault("max_overflow", 20)
        engine = sa.create_engine(with_pg_options(sa_url, *dead_client_settings(dead_client_timeout)), **kwargs)
        if not kwargs.get("pool_pre_ping"):
            _ping_idle_connections(engine)
        return engine

    in_memory = sa_url.database in (None, "", ":memory:")
    if in_memory:
        # One connection shared by all threads, or every connection would see
        # its own empty database.
        kwargs.setdefault("poolclass", StaticPool)
    else:
        Path(sa_url.database or "").parent.mkdir(parents=True, exist_ok=True)
        # Enough pooled connections for a burst's request threads: a connection
        # beyond the pool is opened (with its PRAGMAs) and closed for each use.
        kwargs.setdefault("pool_size", 20)
        kwargs.setdefault("max_overflow", 40)
    connect_args = kwargs.setdefault("connect_args", {})
    connect_args.setdefault("check_same_thread", False)
    connect_args.setdefault("timeout", 60)
    engine = sa.create_engine(sa_url, **kwargs)

    @sa_event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, record: Any) -> None:
        # Let SQLAlchemy's begin hook below decide how each transaction starts.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        if scratch:
            cur.execute("PRAGMA journal_mode=MEMORY")
            synchronous = "OFF"
        else:
            if not in_memory:
                _enter_wal(cur, timeout=float(connect_args["timeout"]))
            # FULL: every commit is fsync'd, so a 2xx answer survives power loss
            # (the begin hook below relaxes it for derived rows only).
            synchronous = "FULL"
        cur.execute(f"PRAGMA synchronous={synchronous}")
        record.info["synchronous"] = synchronous
        cur.execute("PRAGMA busy_timeout=60000")
        cur.execute("PRAGMA foreign_keys=ON")
        # Some builds (Debian's) zero every freed page, which writes a rebuild's
        # dropped tables out again in full (7 % of a rebuild here). FAST zeroes
        # deleted content only where that costs no extra write; nothing the
        # exchange deletes is secret anyway: it is all derived from the log.
        cur.execute("PRAGMA secure_delete=FAST")
        cur.close()

    @sa_event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Straight to the driver: this runs once per transaction, and the
        # statements need none of SQLAlchemy's compiling or result handling.
        options = conn.get_execution_options()
        cursor = conn.connection.cursor()
        synchronous = "OFF" if scratch else "FULL" if options.get("durable", True) else "NORMAL"
        # The setting outlives the transaction: remember it with the connection.
        if conn.connection.info.get("synchronous") != synchronous:
            cursor.execute(f"PRAGMA synchronous={synchronous}")
            conn.connection.info["synchronous"] = synchronous
        cursor.execute("BEGIN IMMEDIATE" if options.get("sqlite_immediate") else "BEGIN")

    return engine


#: A pooled connection idle longer than this is tested before it is handed out.
PING_IDLE_AFTER = 1.0


def _ping_idle_connections(engine: Engine) -> None:
    """Test a pooled connection before use if it sat idle, so a restarted server costs no request.

    SQLAlchemy's ``pool_pre_ping`` tests every checkout, a round trip on
    every append; a connection back in use within a second was just shown to
    work. One that fails its test is replaced (SQLAlchemy retries the
    checkout on ``DisconnectionError``).
    """

    @sa_event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_conn: Any, record: Any) -> None:
        if record is not None:
            record.info["idle_since"] = time.monotonic()

    @sa_event.listens_for(engine, "checkout")
    def _checked_out(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        if time.monotonic() - record.info.get("idle_since", 0.0) < PING_IDLE_AFTER:
            return
        try:
            cursor = dbapi_conn.cursor()
            cursor.execute("SELECT 1")
            cursor.close()
        except Exception as e:
            raise sa.exc.DisconnectionError("a pooled connection failed its test") from e


def is_sqlite(engine: Engine | Connection) -> bool:
    """Whether this engine or connection talks to SQLite."""
    return engine.dialect.name == "sqlite"


@contextlib.contextmanager
def write_transaction(engine: Engine, *, durable: bool = True) -> Iterator[Connection]:
    """A transaction that writes: on SQLite it holds the write lock from ``BEGIN``.

    Taking the lock up front means two writers queue instead of deadlocking
    when both try to upgrade a read lock.

    ``durable=False`` is for rows derived from the log (projections,
    checkpoints): the commit does not wait for the disk. A power cut may roll
    such a transaction back whole, which only means catching up again; it
    cannot lose an event, because a later durable commit flushes everything
    written before it (both SQLite's WAL and PostgreSQL's are sequential).
    """
    with translate_errors(), engine.connect() as conn:
        sqlite = is_sqlite(engine)
        if sqlite:
            conn.execution_options(sqlite_immediate=True, durable=durable)
        with conn.begin():
            if not durable and not sqlite:
                conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
            yield conn


@contextlib.contextmanager
def translate_errors() -> Iterator[None]:
    """Turn a lost or unreachable database into ``Unavailable`` (HTTP 503)."""
    try:
        yield
    except (sa.exc.OperationalError, sa.exc.InterfaceError) as e:
        if isinstance(e, sa.exc.OperationalError) and "locked" in str(e.orig):
            raise Unavailable("The database is busy; retry shortly.", retry_after=1) from e
        raise Unavailable("The database is unreachable; retry shortly.") from e


def compile_named(dialect: sa.Dialect, statement: sa.ClauseElement) -> tuple[str, dict[str, Any]]:
    """``statement`` as driver SQL for ``dialect`` with named parameters, and the values it fixed.

    Named on every driver (pysqlite takes ``:name``), so parameter dicts go to
    the driver as they are. The fixed values are those the statement itself
    carries (a ``LIMIT``, a constant); pass them along with your own.
    """
    dialect_class: Any = type(dialect)  # every SQLAlchemy dialect takes ``paramstyle``
    named = dialect_class(paramstyle="named") if dialect.positional else dialect
    compiled = statement.compile(dialect=named)
    return str(compiled), {k: v for k, v in compiled.params.items() if v is not None}


@contextlib.contextmanager
def driver_cursor(conn: Connection, statement: str) -> Iterator[Any]:
    """A cursor of the driver itself, inside ``conn``'s transaction; its errors come out as SQLAlchemy's.

    For the hot paths (one append, a rebuild's inserts): SQLAlchemy's
    execution machinery costs more there than the database's own work. A
    driver error is raised as the matching ``sqlalchemy.exc.DBAPIError``, and
    a lost connection is invalidated and marked as such, as SQLAlchemy does
    for the statements it runs itself (:func:`translate_errors` and the
    append's retry rely on both).
    """
    cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
    dbapi_error: Any = conn.dialect.loaded_dbapi.Error  # the driver's own base class
    try:
        yield cursor
    except dbapi_error as e:
        lost = conn.dialect.is_disconnect(e, conn.connection.dbapi_connection, cursor)
        if lost:
            conn.invalidate(e)
        raise sa.exc.DBAPIError.instance(
            statement, None, e, dbapi_error, connection_invalidated=lost, dialect=conn.dialect
        ) from e
    finally:
        with contextlib.suppress(Exception):  # a dead connection's cursor may not close cleanly
            cursor.close()


class DriverInsert:
    """A table's INSERT compiled once, its rows converted by the column types and sent by the driver.

    Appends and rebuilds are the hot paths: SQLAlchemy's per-row parameter
    processing cost more than the database's own work. The column types still
    convert the values that need it (SQLite's datetimes), as they would there.
    """

    def __init__(self, dialect: sa.Dialect, table: sa.Table) -> None:
        self.processors = [
            (column.key, process)
            for column in table.columns
            if (process := column.type.dialect_impl(dialect).bind_processor(dialect)) is not None
        ]
        #: A row's values in the table's column order.
        self.values = operator.itemgetter(*(column.key for column in table.columns))
        self.positional = dialect.positional
        if self.positional:
            # pysqlite: ``?`` parameters, bound from tuples by index. Bound by
            # name, each parameter of each row is a string made from the
            # statement's text and looked up in the row (18 % of a rebuild).
            compiled = table.insert().compile(dialect=dialect)
            assert list(compiled.positiontup or ()) == [column.key for column in table.columns]
            self.sql = str(compiled)
        else:
            self.sql, _ = compile_named(dialect, table.insert())
        # PostgreSQL: COPY for many rows, which streams them in one command
        # instead of one INSERT each (but costs a round trip more than one INSERT).
        self.copy: str | None = None
        if dialect.name == "postgresql":
            quote = dialect.identifier_preparer
            names = ", ".join(quote.quote(column.name) for column in table.columns)
            self.copy = f"COPY {quote.format_table(table)} ({names}) FROM STDIN"

    def execute(self, conn: Connection, rows: list[dict[str, Any]], *, commit: bool = False) -> None:
        """Insert ``rows`` (each names every column; converted in place).

        With ``commit``, the last thing ``conn``'s transaction does: on
        PostgreSQL the ``COMMIT`` is pipelined behind the INSERT, in one round
        trip (COPY cannot be pipelined; nor has SQLite round trips), and the
        transaction's own commit then finds nothing left to do.
        """
        for name, process in self.processors:
            for row in rows:
                row[name] = process(row[name])
        if self.copy is None or len(rows) < COPY_FROM:
            params: list[Any] = list(map(self.values, rows)) if self.positional else rows
            with driver_cursor(conn, self.sql) as cursor:
                pipelined = commit and self.copy is not None
                with cursor.connection.pipeline() if pipelined else contextlib.nullcontext():
                    if len(params) == 1:
                        cursor.execute(self.sql, params[0])
                    else:
                        cursor.executemany(self.sql, params)
                    if pipelined:
                        cursor.execute("COMMIT", prepare=False)
            return
        with driver_cursor(conn, self.copy) as cursor, cursor.copy(self.copy) as copy:  # psycopg's COPY
            for row in rows:
                copy.write_row(self.values(row))


#: PostgreSQL inserts this many rows or more with COPY.
COPY_FROM = 16


@functools.cache
def driver_insert(dialect: sa.Dialect, table: sa.Table) -> DriverInsert:
    """The :class:`DriverInsert` for ``table`` on this engine's dialect, made once."""
    return DriverInsert(dialect, table)


def wait_until_reachable(engine: Engine, timeout: float) -> None:
    """Return once the database accepts a connection; ``Unavailable`` if it has not within ``timeout`` seconds.

    Processes are often started with their database (``docker compose up``,
    a host's reboot): one that migrates on start then waits for it, instead
    of exiting on the first refused connection. The wait is logged once.
    """
    deadline = time.monotonic() + timeout
    delay, waiting = 0.1, False
    while True:
        try:
            with translate_errors(), engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
            break
        except Unavailable as e:
            if time.monotonic() + delay > deadline:
                raise
            if not waiting:
                log.warning("The database does not answer (%s); waiting up to %.0f s for it", e.__cause__, timeout)
            waiting = True
        time.sleep(delay)
        delay = min(2 * delay, 2.0)
    if waiting:
        log.warning("The database answers")


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the database up to ``revision`` with alembic; a new one is created from empty."""
    _alembic(engine, "upgrade", revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Take the database's schema back to ``revision`` (the log's rows are kept; see each migration)."""
    _alembic(engine, "downgrade", revision)


def _alembic(engine: Engine, command_name: str, revision: str) -> None:
    from alembic import command

    config = _alembic_config()
    with migration_lock(engine) as conn:
        config.attributes["connection"] = conn
        getattr(command, command_name)(config, revision)


#: The PostgreSQL advisory lock migrations hold: a fixed 64-bit key (the bytes spell "nbexmigr").
MIGRATION_LOCK = int.from_bytes(b"nbexmigr", "big")


@contextlib.contextmanager
def migration_lock(engine: Engine) -> Iterator[Connection]:
    """A transaction holding the database's migration lock, so one process at a time migrates.

    Every API and worker process upgrades the schema on start, and replicas
    start together (a rollout, ``docker compose up`` without its migrate
    step). Unserialized, two read the same revision and both migrate: on
    SQLite one's deferred transaction cannot turn its read lock into a
    write lock ("database is locked"), on PostgreSQL one's insert into
    ``alembic_version`` violates the other's key. The lock is taken before
    alembic reads the revision and held until the migration commits: the
    next process waits, then finds the schema current and does nothing.
    SQLite takes its write lock at ``BEGIN IMMEDIATE`` (waiting up to its
    busy timeout); PostgreSQL a transaction-scoped advisory lock (waiting as
    long as the migration takes; it is released at commit, rollback, or a
    lost connection).
    """
    with engine.connect() as conn:
        if is_sqlite(engine):
            conn.execution_options(sqlite_immediate=True)
        with conn.begin():
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
            yield conn


def _alembic_config() -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def head_revision() -> str:
    """The revision the newest migration makes: the schema this code declares."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None  # the migrations have one head
    return head


def current_revision(engine: Engine) -> str | None:
    """The alembic revision the database stands at, or ``None`` for an empty one."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
