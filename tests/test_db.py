"""The database: migrations build exactly the schema the code declares, and upgrade an older database."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from builders import release, submit

import nbexchange.projections  # noqa: F401  (registers the projections' tables)
from nbexchange import db
from nbexchange.db import current_revision, make_engine, metadata, upgrade, write_transaction
from nbexchange.errors import Unavailable
from nbexchange.events.sql import SQLEventStore
from nbexchange.projections import PROJECTIONS, catch_up_all, snapshot
from nbexchange.projections.collections import get_submission, list_submissions


def test_migrations_create_exactly_the_declared_schema(db_url):
    engine = make_engine(db_url)
    assert current_revision(engine) is None
    upgrade(engine)
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
    assert current_revision(engine) == "0008"
    upgrade(engine)  # a second upgrade is a no-op
    assert current_revision(engine) == "0008"
    engine.dispose()


@pytest.mark.timeout(60)  # unserialized, threads' migrations can deadlock on alembic's import of env.py
def test_upgrades_started_together_on_an_empty_database_all_succeed(db_url):
    """Replicas migrate on start: one creates the schema, the others wait for its lock and find it current."""
    engines = [make_engine(db_url) for _ in range(4)]
    start = threading.Barrier(len(engines))

    def migrate(engine: sa.Engine) -> str | None:
        start.wait()
        upgrade(engine)
        return current_revision(engine)

    with ThreadPoolExecutor(len(engines)) as pool:
        revisions = list(pool.map(migrate, engines))
    assert revisions == [db.head_revision()] * len(engines)
    with engines[0].connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
        assert conn.exec_driver_sql("SELECT count(*) FROM alembic_version").scalar() == 1
    for engine in engines:
        engine.dispose()


@pytest.mark.timeout(120)
def test_a_new_sqlite_database_opened_by_many_at_once_opens_for_all(tmp_path):
    """Replicas starting together on a new SQLite file: SQLite does not wait out another connection's lock
    for a change of journal mode (WAL), so each connection waits for it itself. Many rounds, since one
    round loses the race only now and then (1 in 20-40 on a loaded machine before the fix)."""
    for round_ in range(25):
        url = f"sqlite:///{tmp_path}/new-{round_}.db"
        engines = [make_engine(url) for _ in range(6)]
        start = threading.Barrier(len(engines))

        def open_and_write(engine: sa.Engine, n: int, start: threading.Barrier = start) -> str:
            start.wait()
            with write_transaction(engine) as conn:  # the way the exchange writes: no read lock to upgrade
                conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS opened (n INTEGER)")
                conn.exec_driver_sql(f"INSERT INTO opened VALUES ({n})")
            with engine.connect() as conn:
                return str(conn.exec_driver_sql("PRAGMA journal_mode").scalar())

        try:
            with ThreadPoolExecutor(len(engines)) as pool:
                modes = list(pool.map(open_and_write, engines, range(len(engines))))
            assert modes == ["wal"] * len(engines)
            with engines[0].connect() as conn:
                assert conn.exec_driver_sql("SELECT count(*) FROM opened").scalar() == len(engines)
        finally:
            for engine in engines:
                engine.dispose()


def test_an_upgrade_waits_for_the_migration_lock(db_url):
    """While one process holds the lock, another's upgrade (even one with nothing to do) waits for it."""
    first, second = make_engine(db_url), make_engine(db_url)
    upgrade(first)
    pool = ThreadPoolExecutor(1)
    try:
        with db.migration_lock(first):
            upgrading = pool.submit(upgrade, second)
            time.sleep(1.0)
            assert not upgrading.done(), "the second upgrade did not wait for the lock"
        upgrading.result(timeout=60)
    finally:
        pool.shutdown()
    assert current_revision(second) == db.head_revision()
    first.dispose()
    second.dispose()


def test_waiting_for_a_database_that_never_answers_ends_in_unavailable():
    """A process started before its database waits for it, but not forever."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there
    engine = make_engine(f"postgresql+psycopg://postgres@127.0.0.1:{port}/nothing")
    started = time.monotonic()
    with pytest.raises(Unavailable):
        db.wait_until_reachable(engine, timeout=1.0)
    assert 0.5 < time.monotonic() - started < 5
    engine.dispose()


def test_an_older_database_keeps_its_log_and_gains_projections(db_url):
    """A database made by revision 0001 (the log alone) is upgraded; its events project as new ones do."""
    engine = make_engine(db_url)
    upgrade(engine)
    store = SQLEventStore(engine)
    store.append_batch([release(), submit("s1")])
    # Down to the log alone: this code appends columns that 0001 lacks, so
    # the old log is made by writing it at the head and migrating down.
    db.downgrade(engine, "0001")
    with engine.connect() as conn:
        assert "proj_submissions" not in sa.inspect(conn).get_table_names()
        assert "request_hash" not in {c["name"] for c in sa.inspect(conn).get_columns("events")}
    upgrade(engine)
    store.append(submit("s2"))
    assert store.verify().ok and store.head() == 3
    catch_up_all(engine)
    with engine.connect() as conn:
        assert [s["student_id"] for s in list_submissions(conn, 1, "phys101", "ps1")] == ["s1", "s2"]
    engine.dispose()


def test_rekeying_the_projections_keeps_their_rows(db_url):
    """0004 and 0005 change the read models in place: down to 0003 and up again, the rows equal a rebuild's."""
    engine = make_engine(db_url)
    upgrade(engine)
    store = SQLEventStore(engine)
    store.append_batch([release(), submit("s1"), submit("s2", minutes=1), submit("s1", minutes=2)])
    catch_up_all(engine)
    before = {p.name: snapshot(engine, p) for p in PROJECTIONS}
    paths = [s["path"] for s in _submissions(engine)]
    db.downgrade(engine, "0004")
    assert {(json.loads(s["archive_entry"])["state"], s["notebooks_entry"]) for s in _submissions(engine)} == {
        ("pending", "[]")
    }
    db.downgrade(engine, "0003")
    with engine.connect() as conn:
        columns = {c["name"] for c in sa.inspect(conn).get_columns("proj_submissions")}
    assert "path_key" not in columns and len(_submissions(engine)) == 3  # the rows stayed, without their keys
    upgrade(engine)
    catch_up_all(engine)  # the blobs read model (0006) starts again from position 0; the others are at the head
    assert {p.name: snapshot(engine, p) for p in PROJECTIONS} == before  # path_key computed as the code does
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
        found = [get_submission(conn, 1, "phys101", "ps1", path) for path in paths]
    assert [s["student_id"] for s in found if s] == ["s1", "s2", "s1"]
    engine.dispose()


def _submissions(engine: sa.Engine) -> list[dict]:
    with engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(sa.text("SELECT * FROM proj_submissions ORDER BY position"))]


def test_moments_are_written_and_read_back_in_utc(db_url):
    """Any offset in, the same moment out, aware and in UTC, by SQLAlchemy's inserts and the driver's alike."""
    engine = make_engine(db_url)
    columns = [sa.Column("id", sa.Integer, primary_key=True), sa.Column("at", db.Moment)]
    table = sa.Table("moments", sa.MetaData(), *columns)
    table.create(engine)
    utc = datetime(2026, 1, 31, 23, 59, 59, 5, tzinfo=timezone.utc)
    same_moment = utc.astimezone(timezone(timedelta(hours=-5)))  # equal, with an equal hash
    values = [utc, same_moment, utc.replace(tzinfo=None), None]
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"id": i, "at": v} for i, v in enumerate(values)])
        db.driver_insert(conn.dialect, table).execute(conn, [{"id": 10 + i, "at": v} for i, v in enumerate(values)])
    with engine.connect() as conn:
        read = dict(conn.execute(sa.select(table.c.id, table.c.at)).all())
    assert [read[i] for i in range(4)] == [read[10 + i] for i in range(4)] == [utc, utc, utc, None]
    assert all(read[i].tzinfo is timezone.utc for i in (0, 1, 2, 10, 11, 12))
    if db.is_sqlite(engine):  # the text SQLAlchemy's own DATETIME writes (and wrote before Moment)
        stock = sa.DateTime(timezone=True).dialect_impl(engine.dialect).bind_processor(engine.dialect)
        with engine.connect() as conn:
            texts = [conn.exec_driver_sql(f"SELECT at FROM moments WHERE id = {i}").scalar() for i in (0, 1, 2, 10, 11)]
        assert texts == [stock(utc)] * 5
    engine.dispose()


def test_only_derived_rows_commit_without_waiting_for_the_disk(db_url):
    """Projection transactions relax fsync; the next durable one (an append) is fully synchronous again."""
    engine = make_engine(db_url, pool_size=1, max_overflow=0) if "postgresql" in db_url else make_engine(db_url)
    upgrade(engine)
    setting = "PRAGMA synchronous" if engine.dialect.name == "sqlite" else "SHOW synchronous_commit"
    expected = {"sqlite": ({2}, {1}), "postgresql": ({"on"}, {"off"})}[engine.dialect.name]

    def inside(**kwargs):
        with write_transaction(engine, **kwargs) as conn:
            return conn.exec_driver_sql(setting).scalar()

    assert inside() in expected[0]
    assert inside(durable=False) in expected[1]
    assert inside() in expected[0]  # the same pooled connection, back to FULL / on
    engine.dispose()


def test_sqlite_zeroes_deleted_content_only_where_it_costs_no_write(tmp_path):
    """``secure_delete=FAST`` whatever the build's default (Debian's zeroes every freed page)."""
    engine = make_engine(f"sqlite:///{tmp_path / 'x.sqlite'}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA secure_delete").scalar() == 2  # FAST
    engine.dispose()


def test_a_pooled_connection_the_server_dropped_is_replaced_unnoticed(db_url, monkeypatch):
    """PostgreSQL: a connection that sat idle is tested before use; one the server closed costs no request."""
    if not db_url.startswith("postgresql"):
        pytest.skip("SQLite has no server to drop a connection")
    monkeypatch.setattr(db, "PING_IDLE_AFTER", 0.05)
    engine = make_engine(db_url, pool_size=1, max_overflow=0)
    with engine.connect() as conn:
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
    admin = sa.create_engine(db_url)
    with admin.connect() as conn:
        assert conn.exec_driver_sql(f"SELECT pg_terminate_backend({pid})").scalar() is True
    admin.dispose()
    time.sleep(0.1)
    with engine.connect() as conn:  # the pool's one connection is dead; this is a new one
        assert conn.exec_driver_sql("SELECT pg_backend_pid()").scalar() != pid
    engine.dispose()


def test_an_append_on_a_connection_the_server_just_dropped_is_retried_once(db_url, monkeypatch):
    """PostgreSQL: the drop is found at the append's first statement, before anything is written."""
    if not db_url.startswith("postgresql"):
        pytest.skip("SQLite has no server to drop a connection")
    monkeypatch.setattr(db, "PING_IDLE_AFTER", 1000)  # too recent to be tested at checkout
    engine = make_engine(db_url, pool_size=1, max_overflow=0)
    upgrade(engine)
    store = SQLEventStore(engine)
    store.append(release())
    with engine.connect() as conn:
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
    admin = sa.create_engine(db_url)
    with admin.connect() as conn:
        conn.exec_driver_sql(f"SELECT pg_terminate_backend({pid})")
    admin.dispose()
    assert store.append(submit("s1")).event.position == 2
    assert store.verify().ok and store.head() == 2
    engine.dispose()


def test_the_server_ends_a_session_whose_client_it_cannot_reach(db_url):
    """PostgreSQL: every session carries TCP keepalives and a user timeout summing to ``dead_client_timeout``.

    A host cut off mid-append would otherwise hold the log's lock, and stop every
    other host's writes, for hours (tests/hosts cuts one off mid-burst). The URL's
    own ``options`` (this test's search_path) are kept beside them.
    """
    if not db_url.startswith("postgresql"):
        pytest.skip("SQLite has no server")
    engine = make_engine(db_url, dead_client_timeout=12)
    with engine.connect() as conn:
        shown = {
            name: conn.exec_driver_sql(f"SHOW {name}").scalar()
            for name in ("tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count", "tcp_user_timeout")
        }
        search_path = conn.exec_driver_sql("SHOW search_path").scalar()
    engine.dispose()
    assert shown == {
        "tcp_keepalives_idle": "6",
        "tcp_keepalives_interval": "2",
        "tcp_keepalives_count": "3",
        "tcp_user_timeout": "12000",
    }
    assert search_path == sa.make_url(db_url).query["options"].split("=", 1)[1]
    # 0: the server's own settings, untouched.
    engine = make_engine(db_url, dead_client_timeout=0)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SHOW tcp_user_timeout").scalar() == "0"
    engine.dispose()


def test_the_drivers_own_cursor_raises_sqlalchemys_errors(db_url):
    """The hot paths' driver cursor keeps what translate_errors and the append's retry rely on."""
    engine = make_engine(db_url)
    with engine.connect() as conn:
        with (
            pytest.raises(sa.exc.DBAPIError) as raised,
            db.driver_cursor(conn, "SELECT nothing FROM no_such_table") as cursor,
        ):
            cursor.execute("SELECT nothing FROM no_such_table")
        assert isinstance(raised.value.orig, engine.dialect.loaded_dbapi.Error)
        assert not raised.value.connection_invalidated
    engine.dispose()
