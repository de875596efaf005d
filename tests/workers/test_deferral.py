"""Archive checks and catch-up let an API process's uploads go first: always when embedded, with a broker if told to."""

from __future__ import annotations

import contextlib
import http.client
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import pytest
from httpclient import COURSE, get, ok, release, submit, until
from hypothesis import given, settings
from hypothesis import strategies as st
from service import TEST_BROKER_URL, Service

from nbexchange.workers.app import (
    BACKLOG_MESSAGES,
    BUSY_FILL,
    CHECK_ARCHIVES,
    CHECKS_PER_BUSY_MESSAGE,
    CHECKS_PER_MESSAGE,
    Dispatcher,
)

USERS = {"ada": {COURSE: "Instructor"}, "s1": {COURSE: "Student"}, "s2": {COURSE: "Student"}}


class _App:
    """Records the messages a dispatcher sends."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, tuple[Any, ...]]] = []
        self.times: list[float] = []

    def send_task(self, name: str, args: tuple[Any, ...] = (), **_: Any) -> None:
        self.sent.append((name, tuple(args)))
        self.times.append(time.monotonic())


def _submitted(position: int) -> Any:
    return SimpleNamespace(position=position, data=SimpleNamespace(archive=lambda: "a" * 64))


def test_check_messages_wait_while_uploads_arrive_and_catch_up_does_not():
    app, busy, woken = _App(), [True], []
    dispatcher = Dispatcher(app, hold_checks=lambda: busy[0], hold_max=30, catch_up=lambda: woken.append(1))
    dispatcher([_submitted(1), _submitted(2)])
    until(lambda: woken)
    time.sleep(0.3)
    assert app.sent == []  # the catch-up was local; the checks wait
    busy[0] = False
    until(lambda: app.sent == [(CHECK_ARCHIVES, ([1, 2],))])
    dispatcher.close()


def test_a_check_waits_at_most_hold_max_and_goes_on_close():
    app = _App()
    dispatcher = Dispatcher(app, hold_checks=lambda: True, hold_max=0.2)
    dispatcher([_submitted(1)])
    until(lambda: (CHECK_ARCHIVES, ([1],)) in app.sent)  # busy all along: sent once held long enough
    dispatcher([_submitted(2)])
    dispatcher.close()
    assert (CHECK_ARCHIVES, ([2],)) in app.sent
    assert [name for name, _ in app.sent] == [CHECK_ARCHIVES] * 2  # catch-up is no message: workers follow the log


def test_while_uploads_arrive_due_checks_go_in_full_messages():
    app, busy = _App(), [True]
    dispatcher = Dispatcher(app, hold_checks=lambda: busy[0], hold_max=0.2)
    committed = time.monotonic()
    dispatcher([_submitted(i) for i in range(CHECKS_PER_BUSY_MESSAGE + 5)])
    until(lambda: len(app.sent) == 2, timeout=10)
    # Each message costs the worker a commit and a catch-up beside the uploads: a full one goes when due,
    # the rest waits for more to fill it, but never longer than BUSY_FILL.
    assert app.sent == [
        (CHECK_ARCHIVES, (list(range(CHECKS_PER_BUSY_MESSAGE)),)),
        (CHECK_ARCHIVES, (list(range(CHECKS_PER_BUSY_MESSAGE, CHECKS_PER_BUSY_MESSAGE + 5)),)),
    ]
    assert 0.2 <= app.times[0] - committed < 0.2 + BUSY_FILL
    assert app.times[1] - committed >= 0.2 + BUSY_FILL
    # Once the uploads stop, what is held goes at once, in the smaller messages that spread over workers.
    dispatcher([_submitted(i) for i in range(100, 120)])
    busy[0] = False
    until(lambda: len(app.sent) == 2 + 3)
    assert [len(args[0]) for _, args in app.sent[2:]] == [CHECKS_PER_MESSAGE, CHECKS_PER_MESSAGE, 4]
    dispatcher.close()


def _due_by_reading_every_held_check(
    held: list[tuple[int, float]], busy: bool, now: float, hold_max: float
) -> tuple[list[list[int]], list[tuple[int, float]]]:
    """What the dispatcher must send: each held check looked at, in the plainest words."""
    if not busy:
        # As few messages as BACKLOG_MESSAGES, as long as each holds CHECKS_PER_MESSAGE to CHECKS_PER_BUSY_MESSAGE.
        size = CHECKS_PER_MESSAGE
        while size < CHECKS_PER_BUSY_MESSAGE and size * BACKLOG_MESSAGES < len(held):
            size += 1
        positions = [position for position, _ in held]
        return [positions[i : i + size] for i in range(0, len(positions), size)], []
    due = [position for position, since in held if since <= now - hold_max]
    if due and held[0][1] > now - hold_max - BUSY_FILL:
        due = due[: len(due) - len(due) % CHECKS_PER_BUSY_MESSAGE]
    messages = [due[i : i + CHECKS_PER_BUSY_MESSAGE] for i in range(0, len(due), CHECKS_PER_BUSY_MESSAGE)]
    return messages, held[len(due) :]


@settings(max_examples=300)
@given(
    passes=st.lists(st.tuples(st.integers(0, 24), st.integers(1, 40)), max_size=40),
    busy=st.booleans(),
    hold_max=st.sampled_from([0.0, 0.5, 1.0, 2.0]),
    pivot=st.integers(0, 39),
    offset=st.one_of(st.just(0), st.integers(-40, 40)),
)
def test_the_due_checks_are_those_held_long_enough_in_full_messages(passes, busy, hold_max, pivot, offset):
    # The dispatcher's passes, each (sixteenths of a second since the one before, the checks it took): times
    # exact in floating point, so that checks are often held exactly hold_max, or hold_max and BUSY_FILL.
    since, held, times = 0.0, [], []
    for gap, taken in passes:
        since += gap / 16
        times.append(since)
        held += [(len(held) + i, since) for i in range(taken)]
    now = (times[pivot % len(times)] if times else 0.0) + hold_max + offset / 16
    dispatcher = SimpleNamespace(hold_max=hold_max)
    expected = _due_by_reading_every_held_check(list(held), busy, now, hold_max)
    assert Dispatcher._due(dispatcher, held, busy, now) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("held", "sizes"),
    [(20, [8, 8, 4]), (256, [8] * 32), (641, [21] * 30 + [11]), (3000, [64] * 46 + [56])],
)
def test_a_burst_backlog_goes_in_messages_as_large_as_its_spread_over_workers_allows(held, sizes):
    # Once the uploads stop, what a burst held goes at once: in about BACKLOG_MESSAGES messages (fewer if small,
    # more if large), each of CHECKS_PER_MESSAGE to CHECKS_PER_BUSY_MESSAGE archives, every check once, in order.
    assert (CHECKS_PER_MESSAGE, CHECKS_PER_BUSY_MESSAGE, BACKLOG_MESSAGES) == (8, 64, 32)  # the sizes below
    dispatcher = SimpleNamespace(hold_max=20.0)
    messages, still_held = Dispatcher._due(dispatcher, [(p, 0.0) for p in range(held)], False, 100.0)  # type: ignore[arg-type]
    assert still_held == []
    assert [p for message in messages for p in message] == list(range(held))
    assert list(map(len, messages)) == sizes


def test_catch_up_is_spaced_while_uploads_arrive():
    busy, woken = [True], []
    dispatcher = Dispatcher(
        _App(), hold_checks=lambda: busy[0], catch_up=lambda: woken.append(time.monotonic()), catch_up_interval=0.5
    )
    for i in range(20):  # a burst of commits
        time.sleep(0.01)
        last_commit = time.monotonic()
        dispatcher([_submitted(i)])
    until(lambda: woken and woken[-1] >= last_commit)  # the burst's last commit is caught up too
    gaps = [later - earlier for earlier, later in zip(woken, woken[1:], strict=False)]
    assert len(woken) >= 2 and all(gap >= 0.45 for gap in gaps), gaps  # one pass per interval, not per commit
    busy[0] = False
    sent = time.monotonic()
    dispatcher([_submitted(21)])
    until(lambda: woken[-1] >= sent)
    assert woken[-1] - sent < 0.4  # not busy: at once
    dispatcher.close()


def test_without_uploads_to_hold_for_checks_and_catch_up_go_at_once():
    app, woken = _App(), []
    dispatcher = Dispatcher(app, catch_up=lambda: woken.append(1))  # a worker process's own commits
    for i in range(3):
        dispatcher([_submitted(i)])
        until(lambda i=i: len(woken) == i + 1 and (CHECK_ARCHIVES, ([i],)) in app.sent)
    dispatcher.close()


def _start_slow_upload(svc: Service, who: str) -> http.client.HTTPConnection:
    """A submission whose body has begun to arrive and is not finished."""
    url = urlsplit(svc.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    conn.putrequest("POST", f"{url.path}submission?course_id={COURSE}&assignment_id=ps1&timestamp=2026-01-31")
    for name, value in svc.headers(who).items():
        conn.putheader(name, value)
    conn.putheader("Content-Type", "multipart/form-data; boundary=slow")
    conn.putheader("Content-Length", str(10 * 1024 * 1024))
    conn.endheaders()
    conn.send(b'--slow\r\nContent-Disposition: form-data; name="assignment"; filename="s.tar.gz"\r\n\r\n\x1f\x8b')
    return conn


def _state(svc: Service, position: int) -> str:
    items = ok(get(svc, "collections", "ada", course_id=COURSE, assignment_id="ps1", min_position=position))["value"]
    (item,) = [i for i in items if i["student_id"] == "s1"]
    return str(item["archive"]["state"])


@contextlib.contextmanager
def _trickling(conn: http.client.HTTPConnection, every: float = 0.1) -> Iterator[None]:
    """Keep the slow upload's body arriving, a byte every ``every`` seconds, until the block ends."""
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(every):
            conn.send(b"\0")

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@pytest.fixture
def deferring(exchange_service: Any) -> Service:
    """A service whose checks may wait 60 s behind uploads, with ``ps1`` released to ``s1``."""
    # The sweep (its grace is 1 s in tests) would check the archive itself: hold it off.
    svc: Service = exchange_service(USERS, extra=["--NbExchange.check_defer_max=60", "--NbExchange.sweep_grace=120"])
    ok(release(svc, "ada", "ps1"), 201)
    until(lambda: get(svc, "assignment", "s1", course_id=COURSE, assignment_id="ps1").status_code == 200)
    return svc


def _checked_within(svc: Service, position: int, since: float, seconds: float) -> None:
    """The archive at ``position`` is unpacked, ``seconds`` at most after ``since`` (well under the 60 s hold)."""
    until(lambda: _state(svc, position) == "unpacked", 30, "the stalled upload held the check")
    took = time.monotonic() - since
    assert took < seconds, f"the check took {took:.1f} s behind a stalled upload"


def test_a_check_waits_while_this_process_receives_an_upload(deferring):
    slow = _start_slow_upload(deferring, "s2")
    try:
        with _trickling(slow):
            accepted = ok(submit(deferring, "s1", "ps1"), 201)
            # Listed at once (catch-up does not wait), its check pending while the upload's bytes arrive.
            assert _state(deferring, accepted["position"]) == "pending"
            time.sleep(2)
            assert _state(deferring, accepted["position"]) == "pending"
        # The upload stalls, its connection still open: the check goes (UPLOAD_GAP, 1 s, after the last byte).
        _checked_within(deferring, accepted["position"], since=time.monotonic(), seconds=15)
    finally:
        slow.close()


@pytest.mark.hostile(
    "Stalled uploads",
    "an upload's headers and part of its body, then nothing, its connection left open (within upload_timeout)",
    "other students' archive checks are not held for it: done in seconds, not after check_defer_max",
)
def test_a_stalled_upload_does_not_hold_other_checks_back(deferring):
    """An upload whose bytes stopped (headers and part of a body sent, the connection left open) is not receiving."""
    stalled = _start_slow_upload(deferring, "s2")
    try:
        sent = time.monotonic()
        accepted = ok(submit(deferring, "s1", "ps1"), 201)  # another student's submission, after the stall began
        _checked_within(deferring, accepted["position"], since=sent, seconds=15)
        stalled.send(b"\0")  # the connection was open all along: it still takes bytes
    finally:
        stalled.close()


def test_with_a_broker_checks_go_at_once_by_default(exchange_service):
    if not TEST_BROKER_URL:
        pytest.skip("runs in the PostgreSQL+Redis pass")
    svc = exchange_service(USERS, extra=["--NbExchange.sweep_grace=120"])
    ok(release(svc, "ada", "ps1"), 201)
    until(lambda: get(svc, "assignment", "s1", course_id=COURSE, assignment_id="ps1").status_code == 200)
    slow = _start_slow_upload(svc, "s2")
    try:
        accepted = ok(submit(svc, "s1", "ps1"), 201)
        # The worker process has CPUs of its own, as far as the exchange knows: it checks at once.
        until(lambda: _state(svc, accepted["position"]) == "unpacked")
    finally:
        slow.close()


@pytest.mark.parametrize(
    ("grace", "warned"),
    [
        (None, True),  # the test services' sweep grace, 1 s, is below the default hold of 20 s
        (20 + BUSY_FILL / 2, True),  # above the hold, but not the hold and the wait to fill a message
        (20 + 2 * BUSY_FILL, False),
    ],
)
def test_a_hold_longer_than_the_sweeps_grace_is_warned_about(exchange_service, grace, warned):
    svc = exchange_service(USERS, extra=[] if grace is None else [f"--NbExchange.sweep_grace={grace}"])
    embedded = not TEST_BROKER_URL
    shown = 1.0 if grace is None else float(grace)
    assert (f"check_defer_max (20.0 s) is not below sweep_grace ({shown} s)" in svc.log_text()) is (embedded and warned)
