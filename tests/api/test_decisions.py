"""Every write is decided on the log: no false refusal, nothing accepted then lost, times the exchange vouches for.

These start services of their own: a production topology with no worker
process at all (the API decides writes without one), and the clock-skew rule
at a setting of its own.
"""

from __future__ import annotations

import hashlib
import signal
import socket
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import pytest
import requests
from builders import make_archive
from httpclient import COURSE, course_events, get, headers, ok, refused, release, submit, until
from service import REDIS_URL, Service, collect, service_archives, verify

from nbexchange.clock import format_timestamp

USERS = {"ada": {COURSE: "Instructor"}, **{f"s{i}": {COURSE: "Student"} for i in range(1, 41)}}
STUDENTS = [name for name in USERS if name != "ada"]


@pytest.fixture
def no_worker(exchange_service: Callable[..., Service]) -> Service:
    """The production topology (a real Redis broker, a queue of its own) with no worker process running."""
    return exchange_service(USERS, broker_url=REDIS_URL, workers=0)


def unrelease(svc: Service, assignment: str, purge: bool = False, key: str | None = None) -> requests.Response:
    return requests.delete(
        svc.url + "assignment",
        params={"course_id": COURSE, "assignment_id": assignment, "purge": str(purge).lower()},
        headers=headers(svc, "ada", key),
        timeout=30,
    )


def test_writes_right_after_a_release_need_no_worker(no_worker: Service) -> None:
    """Every student fetches and submits the moment the release answers 201: never a false 404."""
    svc = no_worker
    with ThreadPoolExecutor(16) as pool:
        for round_ in range(3):
            assignment = f"ps-now-{round_}"
            ok(release(svc, "ada", assignment), 201)
            fetches = list(
                pool.map(lambda s, a=assignment: get(svc, "assignment", s, course_id=COURSE, assignment_id=a), STUDENTS)
            )
            assert [r.status_code for r in fetches] == [200] * len(STUDENTS), {r.text for r in fetches}
            answers = list(pool.map(lambda s, a=assignment: submit(svc, s, a), STUDENTS))
            assert [r.status_code for r in answers] == [201] * len(STUDENTS), {r.text for r in answers}
    # A read naming its own write gets it too: with no worker, the API catches the read models up itself.
    last = max(r.json()["position"] for r in answers)
    listed = ok(get(svc, "collections", "ada", course_id=COURSE, assignment_id="ps-now-2", min_position=last))
    assert len(listed["value"]) == len(STUDENTS)


def test_feedback_on_a_submission_just_made_needs_no_worker(no_worker: Service) -> None:
    svc = no_worker
    ok(release(svc, "ada", "ps-fb"), 201)
    stamp = "2026-01-31 23:59:59.123456 UTC"
    ok(submit(svc, "s1", "ps-fb", stamp=stamp), 201)
    params = {"course_id": COURSE, "assignment_id": "ps-fb", "notebook": "nb1", "student": "s1", "checksum": "c"}
    sent = [
        requests.post(
            svc.url + "feedback",
            params={**params, "timestamp": when},
            files={"feedback": ("nb1.html", b"<p>well done</p>")},
            headers=svc.headers("ada"),
            timeout=30,
        )
        for when in (stamp, "2026-01-31 23:59:59.123457 UTC")
    ]
    ok(sent[0], 201)
    refused(sent[1], 404, "no submission")


def test_an_unrelease_with_purge_racing_submissions_of_the_same_bytes(no_worker: Service) -> None:
    """A submission either precedes the unrelease and stands, its bytes kept, or is refused: never in between.

    Rounds repeat until the race window was hit twice: rounds in which some
    submissions were accepted and others refused, the unrelease committing
    between them. The unrelease's delay adapts to the machine's speed: longer
    after a round it beat every submission, shorter after one it came too late.
    """
    svc = no_worker
    raced = 0
    delay = 0.004
    accepted: list[tuple[str, str, int]] = []  # (assignment, student, position) of every 201
    for round_ in range(30):
        assignment = f"ps-race-{round_}"
        same = make_archive({"nb1.ipynb": f"starter {round_}".encode()})
        ok(release(svc, "ada", assignment, archive=same), 201)

        def withdraw(assignment: str = assignment, delay: float = delay) -> requests.Response:
            time.sleep(delay)
            return unrelease(svc, assignment, purge=True)

        def send(student: str, assignment: str = assignment, same: bytes = same) -> tuple[str, requests.Response]:
            return student, submit(svc, student, assignment, archive=same)

        with ThreadPoolExecutor(21) as pool:
            gone = pool.submit(withdraw)
            answers = list(pool.map(send, STUDENTS[:20]))
        ok(gone.result())
        for student, answer in answers:
            if answer.status_code == 404:
                refused(answer, 404, "not released")
            else:
                accepted.append((assignment, student, ok(answer, 201)["position"]))
        events = course_events(svc, "ada", assignment_id=assignment)
        (withdrawn,) = [e for e in events if e["type"] == "unreleased"]
        assert withdrawn["payload"]["purged_archives"] == [hashlib.sha256(same).hexdigest()]
        # The log itself: no submission committed after the unrelease.
        assert all(e["position"] < withdrawn["position"] for e in events if e["type"] == "submitted")
        statuses = {a.status_code for _, a in answers}
        if statuses == {201, 404}:
            raced += 1
            if raced == 2:
                break
        delay = delay * 2 if statuses == {404} else delay / 2
    assert raced, "no round hit the race window: the test did not exercise it"
    # The collector (no grace here) keeps every blob an accepted submission owns.
    report = collect(svc)
    head = max(position for _, _, position in accepted)
    for assignment, student, _ in accepted:
        listed = get(
            svc, "collections", "ada", course_id=COURSE, assignment_id=assignment, user_id=student, min_position=head
        )
        (item,) = ok(listed)["value"]
        download = get(svc, "collection", "ada", course_id=COURSE, assignment_id=assignment, path=item["path"])
        assert download.status_code == 200, download.text
        assert hashlib.sha256(download.content).hexdigest() not in report["blobs"]
    assert verify(svc)["ok"]


def test_a_key_reused_for_another_request_is_refused(exchange_service: Callable[..., Service]) -> None:
    """Same key, other bytes or other parameters: 422, and nothing in the log changes."""
    svc = exchange_service(USERS)
    a, b = make_archive({"nb1.ipynb": b"first"}), make_archive({"nb1.ipynb": b"second"})
    key = str(uuid.uuid4())
    ok(release(svc, "ada", "ps-key", notebooks=("nb1",), key=key), 201)
    again = ok(release(svc, "ada", "ps-key", notebooks=("nb1",), key=key), 200)
    refused(release(svc, "ada", "ps-key", notebooks=("nb1", "nb2"), key=key), 422, "Idempotency-Key")
    refused(release(svc, "ada", "ps-other", notebooks=("nb1",), key=key), 422, "Idempotency-Key")
    refused(unrelease(svc, "ps-key", key=key), 422, "Idempotency-Key")

    key = str(uuid.uuid4())
    first = ok(submit(svc, "s1", "ps-key", archive=a, key=key), 201)
    assert ok(submit(svc, "s1", "ps-key", archive=a, key=key), 200)["position"] == first["position"]
    head = len(course_events(svc, "ada"))
    refused(submit(svc, "s1", "ps-key", archive=b, key=key), 422, "Idempotency-Key", "other bytes")
    refused(submit(svc, "s1", "ps-key", archive=a, key=key, stamp="2026-01-31 23:59:59.000001 UTC"), 422)
    other_route = requests.get(
        svc.url + "assignment",
        params={"course_id": COURSE, "assignment_id": "ps-key"},
        headers=headers(svc, "s1", key),
        timeout=30,
    )
    refused(other_route, 422, "Idempotency-Key")
    assert len(course_events(svc, "ada")) == head  # nothing appended by a refused reuse
    # A key is a user's own: another student's identical key is a new request.
    ok(submit(svc, "s2", "ps-key", archive=b, key=key), 201)

    key = str(uuid.uuid4())
    ok(unrelease(svc, "ps-key", key=key))
    ok(unrelease(svc, "ps-key", key=key))  # the retry of a withdrawal gets its first answer, not a 404
    refused(unrelease(svc, "ps-key", purge=True, key=key), 422, "Idempotency-Key")
    assert again["position"] < first["position"]


def test_bytes_of_a_refused_request_are_not_kept(exchange_service: Callable[..., Service]) -> None:
    """The stored copy of a refused upload (a reused key's other bytes) is named by no event and collected."""
    svc = exchange_service(USERS)
    ok(release(svc, "ada", "ps-kept"), 201)
    a, b = make_archive({"nb1.ipynb": b"kept"}), make_archive({"nb1.ipynb": b"refused"})
    key = str(uuid.uuid4())
    ok(submit(svc, "s1", "ps-kept", archive=a, key=key), 201)
    refused(submit(svc, "s1", "ps-kept", archive=b, key=key), 422)
    sha_a, sha_b = hashlib.sha256(a).hexdigest(), hashlib.sha256(b).hexdigest()
    report = verify(svc)
    assert report["unnamed"] == [sha_b] and report["ok"]
    assert collect(svc, grace=3600)["blobs"] == []  # young: kept for the grace
    assert collect(svc)["blobs"] == [sha_b]
    assert verify(svc)["unnamed"] == []
    assert service_archives(svc).exists(sha_a)


def test_a_crash_mid_upload_leaves_nothing_the_collector_keeps(exchange_service: Callable[..., Service]) -> None:
    svc = exchange_service(USERS)
    ok(release(svc, "ada", "ps-crash"), 201)
    host, port = "127.0.0.1", int(svc.url.split(":")[2].split("/")[0])
    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="assignment"; filename="a.tar.gz"\r\n'
        "Content-Type: application/gzip\r\n\r\n"
    ).encode()
    tmp = svc.storage / "store" / "tmp"
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(
            (
                f"POST {svc.url.split(str(port))[1]}submission?course_id={COURSE}&assignment_id=ps-crash"
                f"&timestamp=2026-01-31%2000:00:00%20UTC HTTP/1.1\r\nHost: {host}\r\n"
                f"Authorization: token {svc.tokens['s1']}\r\n"
                f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                f"Content-Length: {8 * 1024 * 1024}\r\n\r\n"
            ).encode()
            + head
            + b"\x1f\x8b"
            + b"\0" * (3 * 1024 * 1024)
        )
        partial = until(lambda: [p for p in tmp.iterdir() if p.stat().st_size > 1024 * 1024], timeout=20)
        svc.procs[0].send_signal(signal.SIGKILL)  # the API dies mid-upload
        svc.procs[0].wait(timeout=20)
    assert all(p.exists() for p in partial)
    assert collect(svc, grace=3600)["leftovers"] == []  # young: could still be arriving
    report = collect(svc)
    assert {str(p) for p in partial} <= set(report["leftovers"])
    assert list(tmp.iterdir()) == []
    assert verify(svc)["ok"]


@pytest.fixture
def skew_60(exchange_service: Callable[..., Service]) -> Service:
    return exchange_service(USERS, extra=["--NbExchange.max_clock_skew=60"])


@pytest.mark.parametrize(
    "offset, accepted",
    [(0, True), (-55, True), (55, True), (-70, False), (70, False), (-86400 * 365, False), (86400 * 365, False)],
)
def test_a_client_timestamp_is_accepted_only_within_the_skew(skew_60: Service, offset: int, accepted: bool) -> None:
    svc = skew_60
    ok(release(svc, "ada", "ps-clock"), 201)
    now = datetime.now(timezone.utc)
    stamp = format_timestamp(now + timedelta(seconds=offset))
    answer = submit(svc, "s1", "ps-clock", stamp=stamp)
    if not accepted:
        refused(answer, 400, "clock", "60 s")
        return
    position = ok(answer, 201)["position"]
    (item,) = [
        i
        for i in ok(get(svc, "assignments", "s1", course_id=COURSE, min_position=position))["value"]
        if i["status"] == "submitted"
    ]
    assert item["timestamp"] == stamp  # lists carry the client's time, within the skew of the server's
    (logged,) = [e for e in course_events(svc, "ada", assignment_id="ps-clock") if e["type"] == "submitted"]
    recorded = datetime.fromisoformat(logged["recorded_at"])
    assert abs((recorded - (now + timedelta(seconds=offset))).total_seconds()) <= 60 + 5


@pytest.mark.parametrize(
    "stamp",
    ["0001-01-01 00:00:00.000000 UTC", "9999-12-31 23:59:59.999999 UTC", "2000-01-01T00:00:00+14:00"],
)
def test_timestamps_far_from_now_are_refused(skew_60: Service, stamp: str) -> None:
    ok(release(skew_60, "ada", "ps-far"), 201)
    refused(submit(skew_60, "s1", "ps-far", stamp=stamp), 400, "clock")


def test_the_workers_collect_what_a_purge_disowned(exchange_service: Callable[..., Service]) -> None:
    """The sweep runs the collector: a purged archive goes after the grace; one a submission shares stays."""
    often = ["--NbExchange.collect_interval=0.5", "--NbExchange.blob_grace=1", "--NbExchange.sweep_interval=0.5"]
    svc = exchange_service(USERS, extra=often)
    alone, shared = make_archive({"nb1.ipynb": b"alone"}), make_archive({"nb1.ipynb": b"shared"})
    ok(release(svc, "ada", "ps-alone", archive=alone), 201)
    ok(release(svc, "ada", "ps-shared", archive=shared), 201)
    ok(submit(svc, "s1", "ps-shared", archive=shared), 201)
    ok(unrelease(svc, "ps-alone", purge=True))
    ok(unrelease(svc, "ps-shared", purge=True))
    archives = service_archives(svc)

    def stored(data: bytes) -> bool:
        return archives.exists(hashlib.sha256(data).hexdigest())

    until(lambda: not stored(alone), timeout=30, message=svc.log_text)
    assert stored(shared)
    assert verify(svc)["ok"]
