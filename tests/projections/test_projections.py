"""Projections: what each read model shows, and that rebuild, catch-up and replay agree."""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from builders import T0, TEACHER, release, student, submit
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbexchange.db import metadata, write_transaction
from nbexchange.events.domain import (
    ArchiveRejected,
    ArchiveUnpacked,
    Collected,
    FeedbackFetched,
    FeedbackReleased,
    Fetched,
    Released,
    Submitted,
    Unreleased,
)
from nbexchange.events.sql import events_table
from nbexchange.events.store import AppendRequest
from nbexchange.projections import (
    PROJECTIONS,
    base,
    catch_up,
    catch_up_all,
    catch_up_many,
    checkpoints,
    lag,
    rebuild,
    rebuild_all,
    replay,
    snapshot,
)
from nbexchange.projections.assignments import course_releases, get_release, user_actions
from nbexchange.projections.base import REBUILDING, checkpoints_table
from nbexchange.projections.collections import get_submission, list_submissions
from nbexchange.projections.feedback import student_feedback
from nbexchange.projections.history import course_history, history


def _cycle(store) -> dict[str, int]:
    """Release, fetch, two submissions, unpack/reject, collect, feedback; returns positions."""
    p = {}
    p["release"] = store.append(release()).event.position
    p["fetch"] = store.append(
        AppendRequest(Fetched(1, "phys101", "ps1", "s1", release_position=1, archive_sha256="a" * 64), student("s1"))
    ).event.position
    p["sub1"] = store.append(submit("s1", minutes=1, sha="1" * 64)).event.position
    p["sub2"] = store.append(submit("s1", minutes=2, sha="2" * 64)).event.position
    p["other"] = store.append(submit("s2", minutes=3, sha="3" * 64)).event.position
    store.append(
        AppendRequest(
            ArchiveUnpacked(1, "phys101", "ps1", p["sub2"], "2" * 64, 3, 10, ("nb1",), student_id="s1"), TEACHER
        )
    )
    store.append(
        AppendRequest(ArchiveRejected(1, "phys101", "ps1", p["other"], "3" * 64, "link: x", student_id="s2"), TEACHER)
    )
    store.append(AppendRequest(Collected(1, "phys101", "ps1", "s1", p["sub2"], "2" * 64), TEACHER))
    p["fb"] = store.append(
        AppendRequest(
            FeedbackReleased(1, "phys101", "ps1", "s1", "nb1", T0 + timedelta(minutes=2), "c1", "f" * 64, 5), TEACHER
        )
    ).event.position
    store.append(AppendRequest(FeedbackFetched(1, "phys101", "ps1", "s1", (p["fb"],)), student("s1")))
    return p


def test_read_models_after_a_whole_cycle(store, engine):
    p = _cycle(store)
    catch_up_all(engine)
    with engine.connect() as conn:
        rel = get_release(conn, 1, "phys101", "ps1")
        assert rel and rel.active and rel.notebooks == ("nb1", "nb2") and rel.released_by == "ada"
        assert [r.assignment_id for r in course_releases(conn, 1, "phys101")] == ["ps1"]
        assert course_releases(conn, 2, "phys101") == []  # another organisation sees nothing

        mine = user_actions(conn, 1, "phys101", "s1")
        assert [a["status"] for a in mine] == ["fetched", "submitted", "submitted", "feedback_fetched"]
        assert mine[2]["timestamp"] == T0 + timedelta(minutes=2) and mine[2]["archive_state"] == "unpacked"

        subs = list_submissions(conn, 1, "phys101", "ps1")
        assert [(s["student_id"], s["latest"]) for s in subs] == [("s1", False), ("s1", True), ("s2", True)]
        assert subs[1]["collected_count"] == 1 and subs[1]["notebooks"] == ("nb1",)
        assert subs[2]["archive_state"] == "rejected" and subs[2]["archive_reason"] == "link: x"
        assert subs[1]["full_name"] == "S1" and subs[1]["email"] == "s1@example.org"
        latest = list_submissions(conn, 1, "phys101", "ps1", latest_only=True)
        assert [s["position"] for s in latest] == [p["sub2"], p["other"]]
        assert get_submission(conn, 1, "phys101", "ps1", subs[0]["path"])["position"] == p["sub1"]
        assert get_submission(conn, 1, "phys101", "ps2", subs[0]["path"]) is None

        fb = student_feedback(conn, 1, "phys101", "ps1", "s1")
        assert len(fb) == 1 and fb[0]["timestamp"] == T0 + timedelta(minutes=2) and fb[0]["fetched_at"] is not None
        assert student_feedback(conn, 1, "phys101", "ps1", "s2") == []

        everything = course_history(conn, 1, ["phys101"])
        assert len(everything) == store.head()
        own = course_history(conn, 1, ["phys101"], user_id="s2")
        assert {h["action"] for h in own} == {"released", "submitted", "archive_rejected"}
        assert [h["action"] for h in course_history(conn, 1, ["phys101"], action="collected")] == ["collected"]


def test_unrelease_and_rerelease(store, engine):
    store.append(release(expected=0))
    store.append(AppendRequest(Unreleased(1, "phys101", "ps1"), TEACHER, expected_version=1))
    catch_up_all(engine)
    with engine.connect() as conn:
        assert course_releases(conn, 1, "phys101") == []
        assert get_release(conn, 1, "phys101", "ps1").active is False
    store.append(release(sha="c" * 64, expected=2))
    catch_up_all(engine)
    with engine.connect() as conn:
        assert get_release(conn, 1, "phys101", "ps1").archive_sha256 == "c" * 64


def test_checkpoint_moves_with_rows_and_lag_is_reported(store, engine):
    _cycle(store)
    names = [p.name for p in PROJECTIONS]
    assert lag(engine, names) == store.head()
    catch_up(engine, PROJECTIONS[1], batch_size=3, until=4)
    assert checkpoints(engine)["collections"] == 4
    catch_up_all(engine)
    assert lag(engine, names) == 0
    assert set(checkpoints(engine).values()) == {store.head()}


def test_catching_up_takes_the_same_round_trips_for_one_projection_as_for_all(store, engine):
    """Reading, taking and moving the checkpoints is a statement each for all the projections, not one per
    projection; so is finding there is nothing to do. (A worker catches up a few times a second all through a
    burst: per-projection statements were a third of its round trips.)"""
    _cycle(store)
    sent: list[str] = []

    def record(conn, cursor, statement, *args):
        if "projection_checkpoints" in statement or "FROM events" in statement:
            sent.append(statement)

    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        counts = {}
        for chosen in (PROJECTIONS[:1], PROJECTIONS):
            _clear_projections(engine)
            sent.clear()
            catch_up_many(engine, chosen)
            busy = len(sent)
            sent.clear()
            catch_up_many(engine, chosen)  # nothing left to do
            counts[len(chosen)] = (busy, len(sent))
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)
    assert counts[1] == counts[len(PROJECTIONS)], counts
    # head and checkpoints; create, take; the events; move: whatever the number of projections
    assert counts[1] == (2 + 4, 2), counts
    assert set(checkpoints(engine).values()) == {store.head()}


def test_failed_batch_leaves_checkpoint_and_rows_untouched(store, engine):
    """An apply that fails rolls back its rows and its checkpoint together."""
    store.append(release())
    store.append(submit("s1"))

    class Exploding:
        name = "collections"
        tables = PROJECTIONS[1].tables

        def apply(self, rows, event):
            PROJECTIONS[1].apply(rows, event)
            if event.position == 2:
                raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        catch_up(engine, Exploding())
    assert checkpoints(engine).get("collections", 0) == 0
    with engine.connect() as conn:
        assert list_submissions(conn, 1, "phys101", "ps1") == []
    catch_up(engine, PROJECTIONS[1])
    with engine.connect() as conn:
        assert len(list_submissions(conn, 1, "phys101", "ps1")) == 1


def _projection_schema(engine) -> dict[str, tuple]:
    """Each projection table's columns, key (with its name) and indexes, as the database reports them."""
    with engine.connect() as conn:
        inspector = sa.inspect(conn)
        out = {}
        for table in (t for p in PROJECTIONS for t in p.tables):
            # In any order: a rebuilt table's follow the code, a migrated one's the migrations' history.
            columns = sorted((c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(table.name))
            key = inspector.get_pk_constraint(table.name)
            indexes = sorted(
                (i["name"], tuple(i["column_names"]), bool(i["unique"])) for i in inspector.get_indexes(table.name)
            )
            out[table.name] = (columns, (key["name"], tuple(key["constrained_columns"])), indexes)
        return out


def _leftovers(engine) -> tuple[list[str], list[str]]:
    """A rebuild's new tables and checkpoints still in the database."""
    with engine.connect() as conn:
        tables = [t for t in sa.inspect(conn).get_table_names() if t.endswith(REBUILDING)]
        names = [n for n in conn.execute(sa.select(checkpoints_table.c.name)).scalars() if n.endswith(REBUILDING)]
    return tables, names


def test_rebuild_swaps_in_whole_tables_with_the_migrated_schema(store, engine, monkeypatch):
    """Until the swap, reads see the live rows; events logged meanwhile are in the rebuilt ones."""
    _cycle(store)
    catch_up_all(engine)
    schema = _projection_schema(engine)
    live = {p.name: snapshot(engine, p) for p in PROJECTIONS}
    build = base.catch_up_many
    seen = {}

    def build_then_log_more(engine_, builders, batch_size):
        marks = build(engine_, builders, batch_size)
        # Between the build and the swap: the live rows are whole and unchanged.
        seen["during"] = {p.name: snapshot(engine, p) for p in PROJECTIONS}
        with engine.connect() as conn:
            seen["indexes"] = {
                t.name: [i["name"] for i in sa.inspect(conn).get_indexes(t.name)] for b in builders for t in b.tables
            }
        seen["late"] = store.append(submit("s3", minutes=9, sha="9" * 64)).event.position
        return marks

    monkeypatch.setattr(base, "catch_up_many", build_then_log_more)
    marks = rebuild_all(engine)
    assert seen["during"] == live
    # Filled with only the index apply looks rows up by; the rest are made in the swap.
    assert {name: found for name, found in seen["indexes"].items() if found} == {
        "proj_feedback" + REBUILDING: ["ix_proj_feedback_student" + REBUILDING],
        "proj_blob_refs" + REBUILDING: ["ix_proj_blob_refs_assignment" + REBUILDING],
    }
    assert marks == {p.name: seen["late"] for p in PROJECTIONS} == checkpoints(engine)
    with engine.connect() as conn:
        late = [s for s in list_submissions(conn, 1, "phys101", "ps1") if s["student_id"] == "s3"]
        assert [s["position"] for s in late] == [seen["late"]]
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
    assert _projection_schema(engine) == schema
    assert _leftovers(engine) == ([], [])
    # And the same rows a catch-up from nothing gives.
    rebuilt = {p.name: snapshot(engine, p) for p in PROJECTIONS}
    _clear_projections(engine)
    catch_up_all(engine)
    assert {p.name: snapshot(engine, p) for p in PROJECTIONS} == rebuilt


def test_a_rebuild_that_dies_leaves_the_live_rows_and_the_next_one_starts_over(store, engine, monkeypatch):
    _cycle(store)
    catch_up_all(engine)
    live = {p.name: snapshot(engine, p) for p in PROJECTIONS}
    marks = checkpoints(engine)
    build = base.catch_up_many

    def build_part_then_die(engine_, builders, batch_size):
        build(engine_, builders, 2, until=4)
        raise RuntimeError("killed")

    monkeypatch.setattr(base, "catch_up_many", build_part_then_die)
    with pytest.raises(RuntimeError, match="killed"):
        rebuild_all(engine)
    assert {p.name: snapshot(engine, p) for p in PROJECTIONS} == live
    assert {n: checkpoints(engine)[n] for n in marks} == marks
    assert _leftovers(engine)[0]  # the half-built tables stay until the next rebuild
    monkeypatch.setattr(base, "catch_up_many", build)
    rebuild_all(engine)
    assert {p.name: snapshot(engine, p) for p in PROJECTIONS} == live
    assert _leftovers(engine) == ([], [])


def test_two_rebuilds_at_once_never_swap_in_a_part(store, engine):
    """Run one at a time, but if two overlap, the live rows end whole: at least one swaps in, the other may fail."""
    _cycle(store)
    store.append_batch([submit(f"x{i}", minutes=i) for i in range(5)])
    catch_up_all(engine)
    expected = {p.name: snapshot(engine, p) for p in PROJECTIONS}
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(base.rebuild_many, engine, PROJECTIONS, 1) for _ in range(2)]
    # A lost race fails (its tables gone, a concurrent CREATE, PostgreSQL's deadlock detector).
    outcomes = [run.exception() or run.result() for run in runs]
    assert any(isinstance(o, dict) for o in outcomes), outcomes
    assert {p.name: snapshot(engine, p) for p in PROJECTIONS} == expected
    assert {n: checkpoints(engine)[n] for n in expected} == dict.fromkeys(expected, store.head())
    assert _leftovers(engine) == ([], [])


def _clear_projections(engine) -> None:
    with write_transaction(engine) as conn:
        for p in PROJECTIONS:
            for t in p.tables:
                conn.execute(t.delete())
        conn.execute(checkpoints_table.delete())


# -- property-based: random valid event sequences ----------------------------

COURSES = ["c1", "c2"]
ASSIGNMENTS = ["a1", "a2"]
STUDENTS = ["s1", "s2", "s3"]

op = st.one_of(
    st.tuples(st.just("release"), st.sampled_from(COURSES), st.sampled_from(ASSIGNMENTS)),
    st.tuples(st.just("unrelease"), st.sampled_from(COURSES), st.sampled_from(ASSIGNMENTS)),
    st.tuples(st.just("fetch"), st.sampled_from(COURSES), st.sampled_from(ASSIGNMENTS), st.sampled_from(STUDENTS)),
    st.tuples(
        st.just("submit"),
        st.sampled_from(COURSES),
        st.sampled_from(ASSIGNMENTS),
        st.sampled_from(STUDENTS),
        st.integers(0, 30),
    ),
    st.tuples(st.just("outcome"), st.integers(0, 50), st.booleans()),
    st.tuples(st.just("collect"), st.integers(0, 50)),
    st.tuples(st.just("feedback"), st.integers(0, 50), st.sampled_from(["nb1", "nb2"]), st.text("abc", max_size=3)),
    st.tuples(st.just("feedback_fetched"), st.integers(0, 50)),
)


def _append_ops(store, ops) -> None:
    """Append a random sequence, resolving references to earlier submissions and feedback."""
    subs: list[tuple[int, Submitted]] = []
    feedback: list[tuple[int, FeedbackReleased]] = []
    for o in ops:
        kind = o[0]
        if kind == "release":
            req = AppendRequest(Released(1, o[1], o[2], ("nb1", "nb2"), "a" * 64, 1), TEACHER)
        elif kind == "unrelease":
            req = AppendRequest(Unreleased(1, o[1], o[2]), TEACHER)
        elif kind == "fetch":
            req = AppendRequest(Fetched(1, o[1], o[2], o[3], 1, "a" * 64), student(o[3]))
        elif kind == "submit":
            req = submit(o[3], course=o[1], assignment=o[2], minutes=o[4])
        elif not subs:
            continue
        elif kind == "outcome":
            pos, s = subs[o[1] % len(subs)]
            cls = ArchiveUnpacked(
                1, s.course_id, s.assignment_id, pos, s.archive_sha256, 1, 1, ("nb1",), student_id=s.student_id
            )
            if not o[2]:
                cls = ArchiveRejected(
                    1, s.course_id, s.assignment_id, pos, s.archive_sha256, "no", student_id=s.student_id
                )
            req = AppendRequest(cls, TEACHER)
        elif kind == "collect":
            pos, s = subs[o[1] % len(subs)]
            req = AppendRequest(
                Collected(1, s.course_id, s.assignment_id, s.student_id, pos, s.archive_sha256), TEACHER
            )
        elif kind == "feedback":
            pos, s = subs[o[1] % len(subs)]
            ev = FeedbackReleased(1, s.course_id, s.assignment_id, s.student_id, o[2], s.timestamp, o[3], "f" * 64, 1)
            req = AppendRequest(ev, TEACHER)
        elif kind == "feedback_fetched":
            if not feedback:
                continue
            pos, f = feedback[o[1] % len(feedback)]
            req = AppendRequest(
                FeedbackFetched(1, f.course_id, f.assignment_id, f.student_id, (pos,)), student(f.student_id)
            )
        position = store.append(req).event.position
        if isinstance(req.event, Submitted):
            subs.append((position, req.event))
        if isinstance(req.event, FeedbackReleased):
            feedback.append((position, req.event))


def _reset(engine) -> None:
    _clear_projections(engine)
    with write_transaction(engine) as conn:
        conn.execute(events_table.delete())


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(op, min_size=1, max_size=40), batch_sizes=st.lists(st.integers(1, 7), min_size=1, max_size=8))
def test_rebuild_equals_incremental_catch_up(store, engine, ops, batch_sizes):
    _reset(engine)
    _append_ops(store, ops)
    head = store.head()
    # Incremental: random batch sizes, stopping at random points along the log.
    for projection in PROJECTIONS:
        i = 0
        while catch_up(engine, projection, batch_size=batch_sizes[i % len(batch_sizes)], until=None) < head:
            i += 1
    incremental = {p.name: snapshot(engine, p) for p in PROJECTIONS}
    for projection in PROJECTIONS:
        rebuild(engine, projection)
    assert {p.name: snapshot(engine, p) for p in PROJECTIONS} == incremental


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(op, min_size=1, max_size=40), cut=st.integers(0, 40))
def test_replay_as_of_n_equals_rebuild_of_first_n(store, engine, ops, cut):
    _reset(engine)
    _append_ops(store, ops)
    n = min(cut, store.head())
    with replay(engine, PROJECTIONS, until_position=n) as as_of:
        replayed = {p.name: snapshot(as_of, p) for p in PROJECTIONS}
    with replay(engine, PROJECTIONS, until_position=n) as again:
        replayed_again = {p.name: snapshot(again, p) for p in PROJECTIONS}
    # A rebuild of just the first N events, in the live database.
    for projection in PROJECTIONS:
        rebuild(engine, projection)
    with write_transaction(engine) as conn:
        conn.execute(events_table.delete().where(events_table.c.position > n))
    for projection in PROJECTIONS:
        rebuild(engine, projection)
    for projection in PROJECTIONS:
        expected = snapshot(engine, projection)
        assert replayed[projection.name] == expected
        assert replayed_again[projection.name] == expected


def test_replay_as_of_a_time_leaves_live_rows_alone(store, engine):
    store.append(release())
    store.append(submit("s1"))
    catch_up_all(engine)
    cutoff = store.get(2).recorded_at
    store.append(submit("s2"))
    live_before = {p.name: snapshot(engine, p) for p in PROJECTIONS}
    with replay(engine, PROJECTIONS, until_time=cutoff) as then, then.connect() as conn:
        assert [s["student_id"] for s in list_submissions(conn, 1, "phys101", "ps1")] == ["s1"]
        (folder,) = {Path(then.url.database).parent}
    assert not folder.exists()  # the private database is removed on leaving
    assert {p.name: snapshot(engine, p) for p in PROJECTIONS} == live_before


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(op, min_size=1, max_size=40), course=st.sampled_from([None, *COURSES]))
def test_the_replay_command_writes_the_live_read_models_view_as_one_json_document(store, engine, ops, course):
    """Replayed in a private database and written one assignment at a time, the text is ``json.dumps``
    of the whole view built from the live read models at the head (empty lists included)."""
    from nbexchange.audit import _assignment_entry, write_replay

    _reset(engine)
    _append_ops(store, ops)
    catch_up_all(engine)
    with engine.connect() as conn:
        courses = [course] if course else sorted({row.course_id for row in conn.execute(sa.select(history))})
        view = {
            "until_position": None,
            "until_time": None,
            "courses": [
                {
                    "course_id": c,
                    "assignments": [
                        _assignment_entry(r, list_submissions(conn, 1, c, r.assignment_id))
                        for r in course_releases(conn, 1, c)
                    ],
                }
                for c in courses
            ],
        }
    out = io.StringIO()
    write_replay(engine, out, course_id=course)
    assert out.getvalue() == json.dumps(view, indent=2) + "\n"
