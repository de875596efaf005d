"""The action log: appends, optimistic concurrency, idempotency, tailing, and the hash chain."""

from __future__ import annotations

import contextlib
import multiprocessing
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
import sqlalchemy as sa
from builders import T0, TEACHER, release, submit
from psycopg import pq

from nbexchange.db import COPY_FROM, make_engine
from nbexchange.errors import ConflictError, KeyReused, NotFound
from nbexchange.events import sql
from nbexchange.events.domain import (
    EVENT_TYPES,
    UPCASTERS,
    ArchiveRejected,
    Collected,
    Released,
    Submitted,
    Unreleased,
    Upcasters,
    decode,
)
from nbexchange.events.sql import SQLEventStore, events_table
from nbexchange.events.store import GENESIS, Appended, AppendRequest, canonical_json


def test_append_assigns_positions_versions_and_chains_hashes(store):
    first = store.append(release())
    second = store.append(submit("s1"))
    third = store.append(submit("s1", minutes=5))

    assert [first.event.position, second.event.position, third.event.position] == [
        1,
        2,
        3,
    ]
    assert first.event.version == 1 and second.event.version == 1 and third.event.version == 2
    assert first.event.prev_hash == GENESIS
    assert second.event.prev_hash == first.event.hash
    assert third.event.prev_hash == second.event.hash
    assert store.head() == 3
    assert [e.position for e in store.read()] == [1, 2, 3]
    assert [e.position for e in store.read(after=1, limit=1)] == [2]
    assert store.get(2).hash == second.event.hash
    with pytest.raises(NotFound):
        store.get(99)


def test_events_round_trip_through_the_log(store):
    appended = [store.append(release()).event, store.append(submit("s1", minutes=3)).event]
    events = list(store.read())
    assert events == appended  # read back (RecordedEvent.stored) as the append made them
    assert [e.data for e in events] == [e.data for e in appended]
    assert isinstance(events[0].data, Released) and events[0].data.notebooks == (
        "nb1",
        "nb2",
    )
    sub = events[1].data
    assert isinstance(sub, Submitted)
    assert sub.timestamp == T0.replace(minute=3) and sub.timestamp.tzinfo is not None
    assert events[1].actor.full_name == "S1"
    assert events[1].recorded_at.tzinfo is not None
    assert events[1].recorded_at >= events[0].recorded_at


def test_stale_writer_gets_conflict(store):
    store.append(release(expected=0))
    with pytest.raises(ConflictError) as info:
        store.append(release(expected=0))
    assert info.value.expected == 0 and info.value.actual == 1
    assert "version 1" in info.value.note
    store.append(release(expected=1))
    assert store.stream_version("assignment/1/phys101/ps1") == 2
    assert store.head() == 2


def test_repeated_idempotency_key_appends_nothing(store):
    first = store.append(submit("s1", key="k-1"))
    again = store.append(submit("s1", minutes=9, key="k-1"))
    assert again.duplicate and not first.duplicate
    assert again.event == first.event
    assert store.head() == 1
    assert store.by_idempotency_key("k-1") == first.event
    assert store.by_idempotency_key("nope") is None


def test_batch_outcomes_are_independent(store):
    store.append(release(expected=0))
    outcomes = store.append_batch(
        [
            submit("s1", key="a"),
            release(expected=0),
            submit("s2"),
            submit("s1", key="a"),
        ]
    )
    assert outcomes[0].event.position == 2
    assert isinstance(outcomes[1], ConflictError)
    assert outcomes[2].event.position == 3
    assert outcomes[3].duplicate and outcomes[3].event.position == 2
    assert store.head() == 3
    assert store.verify().ok


def test_students_never_conflict_but_releases_do(store):
    """Students' streams are their own; two releases of one assignment share a stream."""
    requests = [submit(f"s{i}") for i in range(50)]
    assert all(not isinstance(o, Exception) for o in store.append_batch(requests))
    assert store.append(release(expected=0)).event.version == 1
    with pytest.raises(ConflictError):
        store.append(release(expected=0))


def test_concurrent_threads_on_one_stream_and_many(store):
    errors: list[Exception] = []
    conflicts: list[int] = []

    def releaser(n: int) -> None:
        for _ in range(n):
            while True:
                seen = store.stream_version("assignment/1/phys101/ps1")
                try:
                    store.append(release(expected=seen))
                    break
                except ConflictError:
                    conflicts.append(1)

    def submitter(name: str, n: int) -> None:
        try:
            for i in range(n):
                store.append(submit(name, minutes=i))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=releaser, args=(15,)) for _ in range(3)]
    threads += [threading.Thread(target=submitter, args=(f"s{i}", 15)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    events = list(store.read())
    assert [e.position for e in events] == list(range(1, 3 * 15 + 4 * 15 + 1))
    releases = [e for e in events if e.stream == "assignment/1/phys101/ps1"]
    assert sorted(e.version for e in releases) == list(range(1, 46))
    assert store.verify().ok


def _append_in_process(url: str, name: str, n: int) -> None:
    store = SQLEventStore(make_engine(url))
    for i in range(n):
        store.append(submit(name, minutes=i))


def test_tailing_reader_never_skips_with_concurrent_processes(store, db_url):
    """Writers in other processes; a reader tails the log and must see every position in order."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_in_process, args=(db_url, f"p{i}", 40)) for i in range(3)]
    for p in procs:
        p.start()
    seen: list[int] = []
    total = 3 * 40
    while len(seen) < total:
        after = seen[-1] if seen else 0
        batch = [e.position for e in store.read(after=after)]
        # Whatever a tail read returns must continue exactly where the last one stopped.
        assert batch == list(range(after + 1, after + 1 + len(batch)))
        seen.extend(batch)
        if not any(p.is_alive() for p in procs) and not batch:
            break
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert seen == list(range(1, total + 1))
    assert store.verify().ok


def _tamper(engine, sql: str) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text(sql))


def _fill(store, n: int = 6) -> None:
    store.append(release())
    for i in range(n - 1):
        store.append(submit(f"s{i}"))


def test_verify_passes_an_untouched_log(store):
    _fill(store)
    report = store.verify()
    assert report.ok and report.checked == 6 and report.head_hash == store.get(6).hash


def test_verify_names_a_changed_payload(store, engine):
    _fill(store)
    _tamper(
        engine,
        "UPDATE events SET payload = replace(payload, 's2', 'sX') WHERE position = 4",
    )
    report = store.verify()
    assert not report.ok
    assert [(f.position, "changed" in f.reason) for f in report.faults] == [(4, True)]


def test_verify_names_a_deleted_event(store, engine):
    _fill(store)
    _tamper(engine, "DELETE FROM events WHERE position = 3")
    report = store.verify()
    positions = {f.position for f in report.faults}
    assert 3 in positions and any("missing" in f.reason for f in report.faults)


def test_verify_names_a_swapped_pair(store, engine):
    """Swap the contents of positions 3 and 4 (as a reordering would)."""
    _fill(store)
    with engine.begin() as conn:
        rows = {r.position: r for r in conn.execute(sa.select(events_table).where(events_table.c.position.in_([3, 4])))}
        conn.execute(events_table.delete().where(events_table.c.position.in_([3, 4])))
        for old, new in ((3, 4), (4, 3)):
            row = dict(rows[old]._mapping)
            row["position"] = new
            conn.execute(events_table.insert().values(**row))
    report = store.verify()
    assert {f.position for f in report.faults} >= {3, 4}
    assert any("prev_hash" in f.reason for f in report.faults)


def test_verify_catches_a_rewritten_hash(store, engine):
    """A forger who changes an event and recomputes its hash still breaks the next link."""
    _fill(store)
    event = store.get(2)
    forged = replace(event, payload={**event.payload, "student_id": "mallory"})
    forged = replace(forged, hash=forged.computed_hash())
    with engine.begin() as conn:
        conn.execute(
            events_table.update()
            .where(events_table.c.position == 2)
            .values(payload=canonical_json(dict(forged.payload)), hash=forged.hash)
        )
    report = store.verify()
    assert [(f.position, "prev_hash" in f.reason) for f in report.faults] == [(3, True)]


def test_old_payload_is_upcast_when_read():
    """A payload written under an older schema loads through the registered steps."""
    upcasters = Upcasters()

    class CollectedV3(Collected):
        SCHEMA = 3

    EVENT_TYPES["collected"], original = CollectedV3, EVENT_TYPES["collected"]
    try:

        @upcasters.register("collected", 1)
        def v1_to_v2(payload):
            # v1 called the submission "submission"; v2 renamed it.
            return {**payload, "submission_position": payload.pop("submission")}

        @upcasters.register("collected", 2)
        def v2_to_v3(payload):
            return {
                **payload,
                "archive_sha256": payload.get("archive_sha256", "0" * 64),
            }

        old = {
            "org_id": 1,
            "course_id": "c",
            "assignment_id": "a",
            "student_id": "s",
            "submission": 7,
        }
        event = decode("collected", 1, old, upcasters)
        assert event.submission_position == 7 and event.archive_sha256 == "0" * 64
        with pytest.raises(ValueError, match="newer"):
            decode("collected", 4, old, upcasters)
        with pytest.raises(ValueError, match="no upcaster"):
            decode("collected", 0, old, upcasters)
    finally:
        EVENT_TYPES["collected"] = original
    assert decode(
        "collected",
        1,
        {
            "org_id": 1,
            "course_id": "c",
            "assignment_id": "a",
            "student_id": "s",
            "submission_position": 7,
            "archive_sha256": "f" * 64,
        },
        UPCASTERS,
    )


def test_a_decoded_payload_is_the_event_and_fields_added_later_take_their_defaults():
    event = ArchiveRejected(1, "c", "a", 7, "f" * 64, "link: x", student_id="s")
    payload = event.to_payload()
    decoded = decode("archive_rejected", event.SCHEMA, payload)
    assert decoded == event and hash(decoded) == hash(event) and repr(decoded) == repr(event)
    older = {k: v for k, v in payload.items() if k != "student_id"}
    assert decode("archive_rejected", event.SCHEMA, older) == replace(event, student_id=None)
    with pytest.raises(TypeError, match="'reason'"):
        decode("archive_rejected", event.SCHEMA, {k: v for k, v in payload.items() if k != "reason"})


def test_postgresql_finds_a_batch_s_streams_and_keys_by_index_in_a_generic_plan(store, engine):
    """A group commit's lookups stay index lookups once the driver has prepared them, stats or none.

    With the streams as a list of parameters, the generic plan PostgreSQL
    switches to after five runs scanned the whole log, testing each row
    against the list: 0.5 s per commit of 500 streams at 45,000 events. The
    streams' versions are read inside ``nbexchange_lock_heads`` (migration
    0007), whose plans ``auto_explain`` shows as notices.
    """
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite's planner looks an IN list up by index")
    store.append_batch([submit(f"s{i}", key=f"k{i}") for i in range(2000)])  # not analysed yet
    streams = [submit(f"s{i}").stream for i in range(0, 2000, 7)]
    with engine.connect() as conn:
        notices: list[str] = []
        conn.connection.driver_connection.add_notice_handler(lambda notice: notices.append(notice.message_primary))
        for setting in (
            "LOAD 'auto_explain'",
            "SET auto_explain.log_min_duration = 0",
            "SET auto_explain.log_nested_statements = on",
            "SET auto_explain.log_level = notice",
            "SET plan_cache_mode = force_generic_plan",
        ):
            conn.exec_driver_sql(setting)
        for _ in range(6):  # past the driver's and PL/pgSQL's prepare thresholds
            rows = conn.execute(sql._LOCK_HEADS, {"streams": [streams[0], "nobody"]}).all()
            conn.rollback()
        inner = [n for n in notices if "unnest(stream_names)" in n or "FROM events" in n]
        assert inner, notices
        assert all("Index" in plan and "Seq Scan on events" not in plan for plan in inner), inner
        assert [(r.head_position, r.stream_name, r.stream_version) for r in rows] == [
            (store.head(), streams[0], 1),
            (store.head(), "nobody", None),
        ]
        compiled = sql._BY_KEYS_PG.compile(dialect=engine.dialect)
        cursor = conn.connection.driver_connection.cursor()
        cursor.execute(f"EXPLAIN {compiled}", {**compiled.params, "keys": ["k1", "k5"]}, prepare=True)
        plan = "\n".join(row[0] for row in cursor.fetchall())
        assert "Index" in plan and "Seq Scan on events" not in plan, plan


@contextlib.contextmanager
def round_trips(engine: sa.Engine) -> Iterator[list[str]]:
    """What PostgreSQL answered, message by message (libpq's trace of every connection checked out meanwhile):
    each ``ReadyForQuery`` ends one round trip, whichever cursor (SQLAlchemy's or the driver's) sent it."""
    answered: list[str] = []
    with tempfile.TemporaryFile("w+") as trace:

        def on(dbapi_connection: Any, *args: object) -> None:
            dbapi_connection.pgconn.trace(trace.fileno())
            dbapi_connection.pgconn.set_trace_flags(pq.Trace.SUPPRESS_TIMESTAMPS)

        def off(dbapi_connection: Any, *args: object) -> None:
            dbapi_connection.pgconn.untrace()

        sa.event.listen(engine.pool, "checkout", on)
        sa.event.listen(engine.pool, "checkin", off)
        try:
            yield answered
        finally:
            sa.event.remove(engine.pool, "checkout", on)
            sa.event.remove(engine.pool, "checkin", off)
            trace.seek(0)
            answered.extend(line.split("\t")[2] for line in trace if line.startswith("B\t"))


@contextlib.contextmanager
def statements_through_sqlalchemy(engine: sa.Engine) -> Iterator[list[str]]:
    """The statements SQLAlchemy sends meanwhile (not those sent on the driver's own cursors)."""
    sent: list[str] = []

    def record(conn: object, cursor: object, statement: str, *args: object) -> None:
        sent.append(statement)

    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)


@pytest.mark.parametrize("keyed", [False, True], ids=["no keys", "keys"])
def test_a_group_commit_of_many_streams_sends_what_a_commit_of_one_more_stream_would(store, engine, keyed):
    """Under the one lock every append waits for, a commit of several streams costs the database the same
    statements as a commit of one more stream would. On PostgreSQL that is three round trips, keys or none:
    ``BEGIN``; the lock, the head and the versions, with the keys' lookup pipelined behind them; the
    ``INSERT`` with the ``COMMIT``. A batch large enough for ``COPY`` takes one more: COPY cannot be
    pipelined."""
    counts = {}
    for students in (1, 2, COPY_FROM - 1, COPY_FROM):
        batch = [submit(f"n{keyed}{students}-{i}", key=f"k{students}-{i}" if keyed else None) for i in range(students)]
        if engine.dialect.name == "postgresql":
            with round_trips(engine) as answered:
                outcomes = store.append_batch(batch)
            counts[students] = answered.count("ReadyForQuery")
        else:
            with statements_through_sqlalchemy(engine) as sent:
                outcomes = store.append_batch(batch)
            counts[students] = len(sent)
        assert all(isinstance(outcome, Appended) and not outcome.duplicate for outcome in outcomes)
    if engine.dialect.name == "postgresql":
        assert counts == {1: 3, 2: 3, COPY_FROM - 1: 3, COPY_FROM: 4}, counts
    else:
        assert counts[2] == counts[COPY_FROM - 1] == counts[COPY_FROM], counts
    # A retry's key is found in that same round trip: its first answer, and nothing appended.
    again = store.append_batch([submit(f"n{keyed}2-0", key="k2-0" if keyed else None), submit(f"n{keyed}-late")])
    assert [outcome.duplicate for outcome in again if isinstance(outcome, Appended)] == [keyed, False]
    assert store.verify().ok


def test_unique_constraints_hold_even_without_the_lock(store, engine):
    """The schema itself refuses a duplicate (stream, version) and a duplicate key."""
    store.append(submit("s1", key="same"))
    row = {c.name: getattr(store.get(1), c.name, None) for c in events_table.columns}
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(
            events_table.insert().values(
                position=2,
                stream=row["stream"],
                version=1,
                type="submitted",
                schema=1,
                actor="{}",
                recorded_at=T0,
                idempotency_key=None,
                payload="{}",
                prev_hash="0",
                hash="0",
            )
        )
    assert AppendRequest(release().event, TEACHER).stream == "assignment/1/phys101/ps1"


def test_an_append_is_refused_when_a_stream_it_requires_moved(store):
    """A submission names its assignment's stream version; an unrelease in between refuses it, in a batch too."""
    released = store.append(release()).event
    assignment = (released.stream, released.version)
    ok = store.append(replace(submit("s1"), requires=(assignment,)))
    assert ok.event.position == 2
    withdrawn = AppendRequest(Unreleased(1, "phys101", "ps1", purge=True), TEACHER)
    late = replace(submit("s2"), requires=(assignment,))
    outcomes = store.append_batch([withdrawn, late])
    assert not isinstance(outcomes[0], Exception)
    assert isinstance(outcomes[1], ConflictError) and outcomes[1].stream == released.stream
    with pytest.raises(ConflictError):
        store.append(replace(submit("s3"), requires=(assignment,)))
    assert store.head() == 3  # the refused ones appended nothing
    assert store.append(replace(submit("s3"), requires=((released.stream, 2),))).event.position == 4


def test_a_key_sent_again_with_another_request_is_refused(store):
    first = store.append(replace(submit("s1", key="k"), request_hash="1" * 64)).event
    assert store.append(replace(submit("s1", key="k"), request_hash="1" * 64)).duplicate
    with pytest.raises(KeyReused):
        store.append(replace(submit("s1", key="k", sha="c" * 64), request_hash="2" * 64))
    outcomes = store.append_batch([replace(submit("s2", key="j"), request_hash="3" * 64)] * 2)
    assert not isinstance(outcomes[0], Exception) and outcomes[1].duplicate  # the same request twice in a batch
    assert store.get(1).request_hash == "1" * 64 == first.request_hash
    # Events logged before fingerprints were kept: the same action on the same stream is the same request.
    store.append(submit("s3", key="old"))
    assert store.append(replace(submit("s3", key="old"), request_hash="4" * 64)).duplicate
    with pytest.raises(KeyReused):
        store.append(replace(release(key="old"), request_hash="4" * 64))


def test_a_stream_reads_whole_and_in_order(store, engine):
    store.append_batch([release(), submit("s1"), release(assignment="ps2"), submit("s1", minutes=1), release()])
    assert [e.position for e in store.read_stream(release().stream)] == [1, 5]
    assert [e.version for e in store.read_stream(submit("s1").stream)] == [1, 2]
    assert store.read_stream("assignment/1/phys101/PS1") == []  # exact, case and all
    if engine.dialect.name == "postgresql":
        # An index lookup even in the generic plan a prepared statement settles on.
        with engine.connect() as conn:
            conn.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
            query = (
                sa.select(events_table)
                .where(events_table.c.stream == sa.bindparam("s"))
                .order_by(events_table.c.version)
            )
            compiled = query.compile(dialect=engine.dialect)
            cursor = conn.connection.driver_connection.cursor()
            cursor.execute(f"EXPLAIN {compiled}", {"s": "x"}, prepare=True)
            plan = "\n".join(row[0] for row in cursor.fetchall())
            assert "Index" in plan and "Sort" not in plan, plan


@pytest.mark.parametrize(("page", "until"), [(3, None), (2, 5), (10, 7), (4, 0)])
def test_stored_rows_are_the_events_read_gives_page_by_page(store, page, until):
    """``read_rows``: the events ``read`` gives, in pages of at most ``page``, cut at ``until``, texts as stored."""
    store.append(release())
    store.append_batch([submit(f"s{i}", minutes=i) for i in range(7)])
    events = list(store.read(until_position=until))
    pages = list(store.read_rows(until_position=until, page=page))
    assert all(0 < len(rows) <= page for rows in pages)
    rows = [row for rows in pages for row in rows]
    assert [row.event() for row in rows] == [replace(event, request_hash=None) for event in events]
    assert [(row.actor, row.payload) for row in rows] == [
        (canonical_json(event.actor.to_json()), canonical_json(event.payload)) for event in events
    ]
