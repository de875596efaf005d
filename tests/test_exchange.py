"""Tests for the use cases' kept decisions: a fetch or submission decided on a kept release is never wrong at commit.

Two ``Exchange`` objects on two runtimes sharing one database stand for two
API processes: what one appends, the other's kept decision has not seen.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from builders import make_archive

from nbexchange.app import NbExchange
from nbexchange.errors import KeyReused, NotFound, UnsafeArchive
from nbexchange.exchange import Exchange
from nbexchange.identity.base import User
from nbexchange.runtime import Runtime
from nbexchange.storage import StoredArchive
from nbexchange.workers import tasks

TEACHER = User(name="ada", org_id=1, courses={"phys101": "Instructor"})


def student(name: str) -> User:
    return User(name=name, org_id=1, courses={"phys101": "Student"})


@pytest.fixture
def processes(db_url: str, tmp_path: Path) -> Iterator[Callable[[], Exchange]]:
    """Factory of use cases on runtimes of their own, all on this test's database and store."""
    runtimes: list[Runtime] = []

    def start() -> Exchange:
        settings = NbExchange(db_url=db_url, base_storage_location=str(tmp_path / "store"), check_defer_max=1000.0)
        runtimes.append(Runtime(settings))
        return Exchange(runtimes[-1], 10.0)

    yield start
    for runtime in runtimes:
        runtime.close()


def stored(exchange: Exchange, files: dict[str, bytes] | None = None) -> StoredArchive:
    return exchange.rt.archives.store_bytes(make_archive(files or {"nb1.ipynb": b"{}"}))


def now() -> datetime:
    return datetime.now(timezone.utc)


def queries_in_this_thread(engine: sa.Engine) -> list[tuple[str, Any]]:
    """The statements this thread runs on ``engine`` from now on, each with the parameters the driver got
    (the committer's thread is not this one)."""
    mine = threading.get_ident()
    seen: list[tuple[str, Any]] = []

    def record(conn: object, cursor: object, statement: str, parameters: Any, *args: object) -> None:
        if threading.get_ident() == mine:
            seen.append((statement, parameters))

    sa.event.listen(engine, "before_cursor_execute", record)
    return seen


def released_and_kept(api: Exchange) -> StoredArchive:
    """Release ps1 and submit to it once, so that ``api`` keeps the decision; the work, to submit again."""
    api.release(TEACHER, "phys101", "ps1", ["nb1"], stored(api))
    work = stored(api, {"nb1.ipynb": b"mine"})
    api.submit(student("s0"), "phys101", "ps1", now(), work)
    return work


def types_after(exchange: Exchange, position: int) -> list[str]:
    return [event.type for event in exchange.rt.store.read(after=position)]


def test_a_kept_release_spares_every_later_fetch_and_submission_a_read_of_the_log(
    processes: Callable[[], Exchange],
) -> None:
    api = processes()
    work = released_and_kept(api)

    statements = queries_in_this_thread(api.rt.engine)
    for i in range(1, 4):
        api.fetch(student(f"s{i}"), "phys101", "ps1", key=f"fetch-{i}")
        assert api.may_submit(student(f"s{i}"), "phys101", "ps1", now(), f"submit-{i}") is not None
        api.submit(student(f"s{i}"), "phys101", "ps1", now(), work, key=f"submit-{i}")
    assert statements == []  # every read before the append was spared; the appends ran in the committer


@pytest.mark.parametrize("change", ["unreleased", "unreleased and purged"])
def test_an_unrelease_by_another_process_refuses_the_next_write_decided_on_a_kept_release(
    processes: Callable[[], Exchange], change: str
) -> None:
    api, other = processes(), processes()
    work = released_and_kept(api)
    withdrawn = other.unrelease(TEACHER, "phys101", "ps1", purge=change.endswith("purged")).event.position

    with pytest.raises(NotFound):
        api.submit(student("s1"), "phys101", "ps1", now(), work)
    with pytest.raises(NotFound):
        api.fetch(student("s1"), "phys101", "ps1")
    with pytest.raises(NotFound):
        api.may_submit(student("s1"), "phys101", "ps1", now())
    assert types_after(api, withdrawn) == []


def test_a_new_release_by_another_process_is_what_the_next_submission_names(
    processes: Callable[[], Exchange],
) -> None:
    api, other = processes(), processes()
    work = released_and_kept(api)
    other.unrelease(TEACHER, "phys101", "ps1")
    again = other.release(TEACHER, "phys101", "ps1", ["nb1", "nb2"], stored(other, {"nb2.ipynb": b"{}"})).event

    submitted = api.submit(student("s1"), "phys101", "ps1", now(), work).event
    assert submitted.payload["notebooks"] == ["nb1", "nb2"]
    fetched = api.fetch(student("s2"), "phys101", "ps1").event
    assert fetched.payload["release_position"] == again.position
    assert fetched.payload["archive_sha256"] == again.payload["archive_sha256"]


def test_a_release_rejected_after_it_was_kept_refuses_the_next_writes(processes: Callable[[], Exchange]) -> None:
    api, worker = processes(), processes()
    released = api.release(TEACHER, "phys101", "ps1", ["nb1"], api.rt.archives.store_bytes(b"\x1f\x8b not a tar")).event
    work = stored(api, {"nb1.ipynb": b"mine"})
    api.submit(student("s0"), "phys101", "ps1", now(), work)  # before the check: accepted, decision kept
    outcome = tasks.check_archive(worker.rt, released.position)
    assert outcome is not None and outcome.type == "archive_rejected"

    with pytest.raises(UnsafeArchive):
        api.submit(student("s1"), "phys101", "ps1", now(), work)
    with pytest.raises(UnsafeArchive):
        api.fetch(student("s1"), "phys101", "ps1")
    assert types_after(api, outcome.position) == []


def test_a_release_checked_safe_after_it_was_kept_goes_on_being_accepted(processes: Callable[[], Exchange]) -> None:
    api, worker = processes(), processes()
    released = api.release(TEACHER, "phys101", "ps1", ["nb1"], stored(api)).event
    work = stored(api, {"nb1.ipynb": b"mine"})
    api.submit(student("s0"), "phys101", "ps1", now(), work)
    outcome = tasks.check_archive(worker.rt, released.position)
    assert outcome is not None and outcome.type == "archive_unpacked"

    # The kept decision predates the outcome: the append refuses it once, the write is decided again and stands.
    assert api.submit(student("s1"), "phys101", "ps1", now(), work).event.type == "submitted"
    statements = queries_in_this_thread(api.rt.engine)
    assert api.submit(student("s2"), "phys101", "ps1", now(), work).event.type == "submitted"
    assert statements == []  # and is kept again, outcome included


def test_a_retry_after_an_unrelease_gets_its_first_answer_and_a_reused_key_is_refused(
    processes: Callable[[], Exchange],
) -> None:
    api, other = processes(), processes()
    work = released_and_kept(api)
    when = now()
    first = api.submit(student("s1"), "phys101", "ps1", when, work, key="k1")
    other.unrelease(TEACHER, "phys101", "ps1")

    retried = api.submit(student("s1"), "phys101", "ps1", when, work, key="k1")
    assert retried.duplicate and retried.event.position == first.event.position
    api.may_submit(student("s1"), "phys101", "ps1", when, "k1")  # a retry's body may be read: no refusal
    api.decisions.forget()
    assert api.may_submit(student("s1"), "phys101", "ps1", when, "k1") is None  # nor when decided on the log
    with pytest.raises(KeyReused):
        api.submit(student("s1"), "phys101", "ps1", when, stored(api, {"nb1.ipynb": b"other"}), key="k1")


SITUATIONS = {
    "a member, in time": (student("s1"), "phys101", 0),
    "the instructor, in time": (TEACHER, "phys101", 0),
    "a stranger to the course": (User(name="eve", org_id=1, courses={"chem1": "Student"}), "phys101", 0),
    "a member of another organisation": (User(name="s1", org_id=2, courses={"phys101": "Student"}), "phys101", 0),
    "a member, clock far ahead": (student("s1"), "phys101", 3600),
    "a member, clock far behind": (student("s1"), "phys101", -3600),
    "a member, another assignment": (student("s1"), "phys101", 0),
}


@pytest.mark.parametrize("kept", [True, False], ids=["kept", "not kept"])
@pytest.mark.parametrize("situation", SITUATIONS)
def test_the_event_loops_answer_to_may_submit_is_a_yes_that_may_submit_gives_or_none(
    processes: Callable[[], Exchange], situation: str, kept: bool
) -> None:
    api = processes()
    released_and_kept(api)
    if not kept:
        api.decisions.forget()
    user, course, skew = SITUATIONS[situation]
    assignment = "ps2" if situation.endswith("another assignment") else "ps1"
    when = datetime.fromtimestamp(now().timestamp() + skew, timezone.utc)

    statements = queries_in_this_thread(api.rt.engine)
    quick = api.may_submit_kept(user, course, assignment, when)
    assert statements == []  # it reads nothing: it may run on the event loop
    if kept and situation.endswith("in time"):
        assert quick is not None and quick == api.may_submit(user, course, assignment, when)
    else:
        assert quick is None  # may_submit decides, in a thread: refusals and reads are never on the loop


def why_not_read_in_order(conn: sa.Connection, statement: str, parameters: Any) -> str | None:
    """Why ``statement``'s plan does not read its rows in order from an index on its filters (None if it does).

    SQLite's plan must search an index, no table or index scanned through
    and no temporary B-tree for the ORDER BY. PostgreSQL is told sorting and
    scanning the table cost too much: if it sorts or scans anyway, or reads
    an index with no condition on it (the primary key, filtering every row),
    no index serves the list.
    """
    if conn.dialect.name == "sqlite":
        steps = [row[3] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)]
        bad = [s for s in steps if "TEMP B-TREE" in s or s.startswith("SCAN")]
        return None if not bad and any(s.startswith("SEARCH") for s in steps) else "\n".join(steps)
    conn.exec_driver_sql("SET enable_sort = off")
    conn.exec_driver_sql("SET enable_seqscan = off")
    try:
        plan = "\n".join(row[0] for row in conn.exec_driver_sql(f"EXPLAIN {statement}", parameters))
    finally:
        conn.exec_driver_sql("RESET enable_sort")
        conn.exec_driver_sql("RESET enable_seqscan")
    return None if "Sort" not in plan and "Seq Scan" not in plan and "Index Cond" in plan else plan


def test_every_list_a_course_s_users_read_comes_out_of_an_index_in_order_unsorted(
    processes: Callable[[], Exchange],
) -> None:
    """The lists the API serves (assignments, collections, history, feedback; instructor and student) never sort.

    A list sorted at each read costs as much again as reading it: 10,000
    submissions were sorted through a temporary file on SQLite on every
    ``collections`` request. Every ordered read the list use cases send is
    explained on this test's backend. (The auditors' ``events`` pages read
    the log by its streams' prefixes: not among these.)
    """
    api = processes()
    api.release(TEACHER, "phys101", "ps1", ["nb1"], stored(api))
    for name in ("s0", "s1", "s0"):
        api.fetch(student(name), "phys101", "ps1")
        api.submit(student(name), "phys101", "ps1", now(), stored(api, {"nb1.ipynb": name.encode()}))
    when = now()
    api.submit(student("s1"), "phys101", "ps1", when, stored(api, {"nb1.ipynb": b"last"}))
    feedback = stored(api, {"nb1.html": b"<p>ok</p>"})
    api.release_feedback(TEACHER, "phys101", "ps1", "nb1", "s1", when, "sum", feedback)
    api.catch_up_to(api.head())
    sent = queries_in_this_thread(api.rt.engine)
    reads: dict[str, Callable[[], object]] = {
        "assignments, instructor": lambda: api.assignments(TEACHER, "phys101"),
        "assignments, student": lambda: api.assignments(student("s1"), "phys101"),
        "collections": lambda: api.collections(TEACHER, "phys101", "ps1"),
        "collections of one student": lambda: api.collections(TEACHER, "phys101", "ps1", "s1"),
        "history, instructor": lambda: api.history(TEACHER, "phys101"),
        "history of one action": lambda: api.history(TEACHER, "phys101", action="submitted"),
        "history, student": lambda: api.history(student("s1")),
        "feedback, student": lambda: fetched_feedback(api, student("s1")),
    }
    unordered: dict[str, list[str]] = {}
    tables: set[str] = set()
    with api.rt.engine.connect() as conn:
        for name, read in reads.items():
            del sent[:]
            assert read()
            lists = [(s, p) for s, p in sent if "ORDER BY" in s]
            assert lists, f"{name}: no ordered read seen"
            tables.update(t for s, _ in lists for t in re.findall(r"\bFROM (proj_\w+)", s))
            unordered[name] = [f"{s}\n{why}" for s, p in lists if (why := why_not_read_in_order(conn, s, p))]
    assert {name: plans for name, plans in unordered.items() if plans} == {}
    # Every read model that serves a list was among them.
    assert tables == {"proj_releases", "proj_actions", "proj_submissions", "proj_feedback", "proj_history"}


def fetched_feedback(api: Exchange, user: User) -> list[str]:
    """The names of the user's feedback files for ps1, fetched (``GET feedback``), their files closed."""
    files, _ = api.fetch_feedback(user, "phys101", "ps1")
    for f in files:
        f.file.close()
    return [f.filename for f in files]
