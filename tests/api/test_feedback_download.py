"""Feedback is sent streamed: parallel fetches of a large feedback keep the API process's memory bounded."""

from __future__ import annotations

import base64
import hashlib
import itertools
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from builders import make_archive
from httpclient import STAMP, get, headers_only, ok, refused, release, submit
from service import TEST_BROKER_URL, Service, drop_db, fresh_db_url, start_service

COURSE = "phys101"
SIZE = 30 * 1024 * 1024 + 1  # not a multiple of 3: the last base64 piece is padded
LIMIT = 32 * 1024 * 1024
PARALLEL = 8
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("feedback")
    url, token = fresh_db_url(root)
    users = {"ada": {COURSE: "Instructor"}, "s1": {COURSE: "Student"}}
    service = start_service(
        root, users, db_url=url, broker_url=TEST_BROKER_URL, extra=[f"--NbExchange.max_feedback_size={LIMIT}"]
    )
    yield service
    service.stop()
    drop_db(token)


def post_feedback(svc: Service, html: bytes, at: int, notebook: str = "nb1") -> requests.Response:
    return requests.post(
        svc.url + "feedback",
        params={
            "course_id": COURSE,
            "assignment_id": "ps1",
            "notebook": notebook,
            "student": "s1",
            "timestamp": STAMP,
            "checksum": f"sum-{notebook}",
            "min_position": at,
        },
        files={"feedback": (f"{notebook}.html", html)},
        headers=svc.headers("ada"),
        timeout=120,
    )


def memory_kib(pid: int, field: str) -> int:
    """A ``/proc/<pid>/status`` memory figure (VmRSS, VmHWM), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for process {pid}")


def content_digests(chunks: Iterator[bytes]) -> list[str]:
    """The sha256 of each file's decoded ``content`` in a streamed feedback answer, holding a chunk at a time."""
    marker = b'"content": "'
    digests: list[list[str]] = []
    digest = None
    pending = carry = b""
    for chunk in chunks:
        data, pending = pending + chunk, b""
        while data:
            if digest is None:
                found = data.find(marker)
                if found < 0:
                    pending = data[-len(marker) :]  # the marker may straddle two chunks
                    break
                digest, carry, data = hashlib.sha256(), b"", data[found + len(marker) :]
                continue
            end = data.find(b'"')
            piece = carry + (data if end < 0 else data[:end])
            whole = len(piece) if end >= 0 else len(piece) - len(piece) % 4
            digest.update(base64.b64decode(piece[:whole], validate=True))
            carry = piece[whole:]
            if end < 0:
                break
            digests.append(digest.hexdigest())
            digest, data = None, data[end + 1 :]
    return digests


@pytest.fixture(scope="module")
def large(svc: Service) -> tuple[bytes, int]:
    """A released, submitted assignment with a large feedback and a small one; the bytes and the last position."""
    at = ok(release(svc, "ada", "ps1", make_archive({"nb1.ipynb": b"{}", "nb2.ipynb": b"{}"})), 201)["position"]
    ok(get(svc, "assignments", "s1", course_id=COURSE, min_position=at))  # the release is readable
    at = ok(submit(svc, "s1", "ps1", make_archive({"nb1.ipynb": b"mine"}), stamp=STAMP), 201)["position"]
    html = os.urandom(SIZE)
    ok(post_feedback(svc, html, at), 201)
    at = ok(post_feedback(svc, b"<html>short</html>", at, notebook="nb2"), 201)["position"]
    return html, at


def test_feedback_decodes_to_the_uploaded_bytes_in_the_documented_shape(svc, large):
    html, at = large
    answer = get(svc, "feedback", "s1", course_id=COURSE, assignment_id="ps1", min_position=at)
    assert answer.headers["Content-Type"].startswith("application/json")
    assert int(answer.headers["Content-Length"]) == len(answer.content)
    body = ok(answer)
    assert set(body) == {"success", "feedback", "position"} and body["position"] > at
    assert [(f["filename"], f["timestamp"], f["checksum"]) for f in body["feedback"]] == [
        ("nb1.html", STAMP, "sum-nb1"),
        ("nb2.html", STAMP, "sum-nb2"),
    ]
    assert base64.b64decode(body["feedback"][0]["content"], validate=True) == html
    assert base64.b64decode(body["feedback"][1]["content"], validate=True) == b"<html>short</html>"
    # The fetch is recorded, as before: feedback_fetched of both files. (The workers' archive
    # checks of the release and the submission may land after ``at`` too, in streams of their own.)
    events = ok(get(svc, "events", "ada", course_id=COURSE, assignment_id="ps1", after=at))["value"]
    assert [e["type"] for e in events if not e["stream"].startswith("check/")] == ["feedback_fetched"]


@pytest.mark.hostile(
    "Downloads",
    f"{PARALLEL} parallel fetches of a 30 MiB feedback, each client holding its answer open until all have started",
    "every answer decodes to the uploaded bytes; the API process's peak memory grows by under 64 MiB "
    "(each answer is written in base64 chunks of 1 MiB, read in a thread)",
)
def test_parallel_fetches_of_a_large_feedback_keep_memory_bounded(svc, large):
    html, at = large
    pid = svc.procs[0].pid
    ok(get(svc, "feedback", "s1", course_id=COURSE, assignment_id="ps1", min_position=at))  # caught up
    started = threading.Barrier(PARALLEL, timeout=60)
    digests: list[list[str]] = []
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            params = {"course_id": COURSE, "assignment_id": "ps1"}
            with requests.get(
                svc.url + "feedback", params=params, headers=svc.headers("s1"), stream=True, timeout=120
            ) as answer:
                assert answer.status_code == 200
                chunks = answer.iter_content(64 * 1024)
                first = next(chunks)
                started.wait()  # every answer is under way before any is read further
                digests.append(content_digests(itertools.chain([first], chunks)))
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    baseline = memory_kib(pid, "VmRSS")
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak (VmHWM) starts again from now
    threads = [threading.Thread(target=fetch) for _ in range(PARALLEL)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    peak = memory_kib(pid, "VmHWM")
    assert not errors, errors
    wanted = [hashlib.sha256(html).hexdigest(), hashlib.sha256(b"<html>short</html>").hexdigest()]
    assert digests == [wanted] * PARALLEL
    assert (peak - baseline) * 1024 < 64 * MiB, f"peak {peak} KiB from {baseline} KiB"


@pytest.mark.hostile(
    "Downloads",
    "a feedback upload declaring more bytes than max_feedback_size (but far less than max_upload_size)",
    "413 before the body is read, naming the feedback limit",
)
def test_feedback_over_its_own_limit_is_refused_before_its_body(svc):
    query = (
        f"feedback?course_id={COURSE}&assignment_id=ps1&notebook=nb1&student=s1"
        "&timestamp=2026-01-01%2000:00:00%20UTC&checksum=x"
    )
    reply = headers_only(svc, "ada", query, LIMIT + 2 * MiB)
    assert reply.startswith("HTTP/1.1 413"), reply
    assert '"success": false' in reply and f"at most {LIMIT} bytes" in reply


def test_feedback_just_over_its_limit_is_refused_as_it_arrives(svc, large):
    _, at = large
    refused(post_feedback(svc, bytes(LIMIT + 1), at, notebook="nb3"), 413, str(LIMIT))


@pytest.mark.hostile(
    "Downloads",
    "a client that closes the connection after the first 64 KiB of a 30 MiB feedback answer",
    "the server stops writing and closes the files; one info line, no error or traceback",
)
def test_a_client_that_goes_away_mid_answer_is_no_error(svc, large):
    _, at = large
    before = svc.log_text().count("Traceback")
    params = {"course_id": COURSE, "assignment_id": "ps1", "min_position": at}
    with requests.get(svc.url + "feedback", params=params, headers=svc.headers("s1"), stream=True, timeout=60) as a:
        assert a.status_code == 200
        next(a.iter_content(64 * 1024))
    # The server notices on its next write; then it may log the request, but no error.
    ok(get(svc, "feedback", "s1", course_id=COURSE, assignment_id="ps1"))
    time.sleep(1)
    log = svc.log_text()
    assert log.count("Traceback") == before, log[-3000:]
