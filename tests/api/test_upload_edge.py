"""Uploads under hostile use: exactly the documented form, clients that vanish, caps on concurrency, a full disk."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from builders import make_archive
from httpclient import COURSE, STAMP, ok, path_of, refused, release, submit, until
from service import TEST_BLOB_STORE, TEST_BROKER_URL, Service, drop_db, fresh_db_url, start_service

USERS = {
    "ada": {COURSE: "Instructor"},
    "s1": {COURSE: "Student"},
    "s2": {COURSE: "Student"},
    "s3": {COURSE: "Student"},
}


def started(root: Path, *extra: str) -> tuple[Service, object]:
    url, token = fresh_db_url(root)
    return start_service(root, USERS, db_url=url, broker_url=TEST_BROKER_URL, extra=list(extra)), token


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    service, token = started(
        tmp_path_factory.mktemp("uploads"), "--NbExchange.max_uploads_per_user=1", "--NbExchange.max_uploads_total=2"
    )
    # The assignment the submissions below are for, and one submission for the feedback uploads.
    ok(release(service, "ada", "ps1"), 201)
    ok(submit(service, "s1", "ps1"), 201)
    yield service
    service.stop()
    drop_db(token)


def tmp_files(svc: Service) -> list[str]:
    """What is left in the store's folder of uploads in progress."""
    return sorted(os.listdir(svc.storage / "store" / "tmp"))


# -- exactly the documented fields -------------------------------------------------


def post(svc: Service, route: str, who: str, files: list, params: dict | None = None) -> requests.Response:
    base = {"course_id": COURSE, "assignment_id": "ps1", "timestamp": STAMP, "notebook": "nb1", "student": "s1"}
    return requests.post(
        svc.url + route,
        params={**base, "checksum": "abc", **(params or {})},
        files=files,
        headers=svc.headers(who),
        timeout=30,
    )


ARCHIVE = ("a.tar.gz", make_archive())


@pytest.mark.hostile(
    "Uploads",
    "a second file part in the file field (it used to be appended to the first); an unknown text field; an "
    "unknown file field; a notebooks field where the route takes none; a part with no name",
    "400 naming the field; nothing is stored",
)
@pytest.mark.parametrize(
    "route, who, files, words",
    [
        (
            "assignment",
            "ada",
            [("assignment", ARCHIVE), ("assignment", ARCHIVE), ("notebooks", (None, "nb1"))],
            "second file part",
        ),
        (
            "submission",
            "s1",
            [("assignment", ARCHIVE), ("assignment", ("b.tar.gz", b"\x1f\x8bmore"))],
            "second file part",
        ),
        ("feedback", "ada", [("feedback", ("f.html", b"<p>1")), ("feedback", ("g.html", b"<p>2"))], "second file part"),
        (
            "assignment",
            "ada",
            [("notebooks", (None, "nb1")), ("comment", (None, "hi")), ("assignment", ARCHIVE)],
            "'comment'",
        ),
        ("submission", "s1", [("assignment", ARCHIVE), ("extra", ("x.bin", b"x"))], "'extra'"),
        ("submission", "s1", [("notebooks", (None, "nb1")), ("assignment", ARCHIVE)], "'notebooks'"),
        ("feedback", "ada", [("assignment", ARCHIVE)], "'assignment'"),
        ("submission", "s1", [("", (None, "x")), ("assignment", ARCHIVE)], "''"),
    ],
)
def test_only_the_documented_form_is_taken(svc, route, who, files, words):
    refused(post(svc, route, who, files), 400, words)
    assert tmp_files(svc) == []


# -- a client that leaves ----------------------------------------------------------


def submission_body(payload: bytes, boundary: str = "b0undary") -> tuple[str, bytes]:
    """A submission's multipart body around ``payload``, and its Content-Type."""
    body = (
        (f'--{boundary}\r\nContent-Disposition: form-data; name="assignment"; filename="s.tar.gz"\r\n\r\n').encode()
        + payload
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return f"multipart/form-data; boundary={boundary}", body


def send_and_reset(svc: Service, who: str, content_type: str, length: int, sent: bytes, wait: float) -> None:
    """POST a submission's head and ``sent`` of its body, wait, then reset the connection (SO_LINGER 0)."""
    port = int(svc.url.split(":")[2].split("/")[0])
    target = path_of(svc, "submission") + f"?course_id={COURSE}&assignment_id=ps1&timestamp=2026-01-01"
    head = (
        f"POST {target} HTTP/1.1\r\nHost: x\r\nAuthorization: token {svc.tokens[who]}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {length}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.sendall(head + sent)
        time.sleep(wait)


def left_nothing_and_said_nothing_worse_than_a_refusal(svc: Service) -> None:
    until(lambda: tmp_files(svc) == [], message=lambda: str(tmp_files(svc)))
    assert ok(requests.get(svc.url + "health", timeout=10))
    log = svc.log_text()
    assert "Traceback" not in log and " 500 " not in log, log[-3000:]


@pytest.mark.hostile(
    "Uploads",
    "60 uploads whose client closes the connection right after the last body byte (while the upload is being "
    "made durable and appended), at varied delays",
    "no 500 and no traceback in the log; nothing is left in the store's tmp/",
)
def test_a_client_closing_while_its_upload_is_finished_is_no_error(svc):
    for i in range(60):
        content_type, body = submission_body(make_archive({"nb1.ipynb": os.urandom(200_000 + i)}))
        send_and_reset(svc, "s" + str(1 + i % 3), content_type, len(body), body, (i % 6) * 0.002)
    left_nothing_and_said_nothing_worse_than_a_refusal(svc)


@pytest.mark.hostile(
    "Uploads",
    "60 uploads whose client resets the connection in the middle of a 2 MB body, at varied points",
    "no 500 and no traceback in the log; nothing is left in the store's tmp/",
)
def test_a_client_leaving_mid_body_leaves_nothing_behind(svc):
    content_type, body = submission_body(make_archive({"nb1.ipynb": os.urandom(2_000_000)}))
    for i in range(60):
        sent = body[: len(body) * (1 + i % 9) // 10]
        send_and_reset(svc, "s" + str(1 + i % 3), content_type, len(body), sent, (i % 4) * 0.003)
    left_nothing_and_said_nothing_worse_than_a_refusal(svc)


# -- caps on uploads in flight -----------------------------------------------------


def open_upload(svc: Service, who: str) -> socket.socket:
    """An upload admitted (its ``prepare`` passed: the server said 100 Continue) whose body is started but held."""
    port = int(svc.url.split(":")[2].split("/")[0])
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    target = path_of(svc, "submission") + f"?course_id={COURSE}&assignment_id=ps1&timestamp=2026-01-01"
    s.sendall(
        (
            f"POST {target} HTTP/1.1\r\nHost: x\r\nAuthorization: token {svc.tokens[who]}\r\nExpect: 100-continue\r\n"
            "Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: 100000\r\n\r\n"
        ).encode()
    )
    reply = s.recv(1024)
    assert reply.startswith(b"HTTP/1.1 100"), reply
    s.sendall(b"--xyz\r\n")
    return s


def submit_small(svc: Service, who: str) -> requests.Response:
    return post(svc, "submission", who, [("assignment", ("s.tar.gz", make_archive({"nb1.ipynb": who.encode()})))])


@pytest.mark.hostile(
    "Upload limits",
    "a second upload by a user with max_uploads_per_user (1) in progress; an upload by anyone while "
    "max_uploads_total (2) are in progress",
    "429 (per user) or 503 (in total), each with Retry-After and a note, before the body is read; the slot is "
    "free again once an upload ends or its client leaves",
)
def test_uploads_in_flight_are_capped(svc):
    first = open_upload(svc, "s1")
    answer = submit_small(svc, "s1")
    refused(answer, 429, "uploads in progress", "one user")
    assert int(answer.headers["Retry-After"]) > 0
    second = open_upload(svc, "s2")
    answer = submit_small(svc, "s3")
    refused(answer, 503, "as many as it takes at once")
    assert int(answer.headers["Retry-After"]) > 0
    first.close()
    second.close()
    # Both slots come back when their clients leave.
    until(lambda: submit_small(svc, "s3").status_code in (200, 201))
    until(lambda: submit_small(svc, "s1").status_code in (200, 201))


# -- a full disk -------------------------------------------------------------------


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Service]:
    """A service whose store is a 4 MiB tmpfs (the database elsewhere)."""
    store = tmp_path / "store"
    store.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(store)], check=True, capture_output=True)
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {e}")
    try:
        service, token = started(tmp_path)
        try:
            yield service
        finally:
            service.stop()
            drop_db(token)
    finally:
        subprocess.run(["umount", "-l", str(store)], check=False)


@pytest.mark.hostile(
    "Disk full",
    "uploads larger than the store's free space (a 4 MiB tmpfs): one 6 MB release, then 6 parallel 1.5 MB submissions",
    "507 with a JSON note for each one that does not fit (every upload gets an HTTP answer, none dropped, no 500); "
    "nothing half-written stays in tmp/; a small upload works once there is room",
)
def test_a_full_disk_answers_507_and_keeps_nothing(small_disk):
    svc = small_disk
    big = b"\x1f\x8b" + os.urandom(6 * 1024 * 1024)
    refused(release(svc, "ada", "ps-big", archive=big), 507, "storage is full")
    assert tmp_files(svc) == []
    ok(release(svc, "ada", "ps1"), 201)

    answers: dict[str, int] = {}

    def one(i: int) -> None:
        who = f"s{1 + i % 3}"
        payload = b"\x1f\x8b" + os.urandom(1536 * 1024)
        r = post(svc, "submission", who, [("assignment", ("s.tar.gz", payload))], {"timestamp": STAMP})
        answers[str(i)] = r.status_code
        if r.status_code != 201:
            refused(r, 507, "storage is full")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(set(answers.values())) <= [201, 507] and 507 in answers.values(), answers
    until(lambda: tmp_files(svc) == [], message=lambda: str(tmp_files(svc)))
    log = svc.log_text()
    assert "Traceback" not in log and " 500 " not in log, log[-3000:]


def inodes_used(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_files - stats.f_ffree


@pytest.mark.hostile(
    "Disk full",
    "a store out of inodes (tmpfs nr_inodes): none left for the upload's temp file; one left for the temp file "
    "but none for the archive's folder when the upload is made durable",
    "507 with a JSON note, before the body is read or after it, never a 500; nothing is left in tmp/",
)
@pytest.mark.parametrize("spare", [0, 1])
def test_a_store_out_of_inodes_answers_507(small_disk, spare):
    if spare and TEST_BLOB_STORE == "s3":
        pytest.skip("the S3 store makes no folder on this disk when an upload is made durable: nothing to refuse")
    svc = small_disk
    store = svc.storage / "store"
    subprocess.run(
        ["mount", "-o", f"remount,nr_inodes={inodes_used(store) + spare}", str(store)], check=True, capture_output=True
    )
    refused(release(svc, "ada", "ps-inodes"), 507, "storage is full")
    assert tmp_files(svc) == []
    log = svc.log_text()
    assert "Traceback" not in log and " 500 " not in log, log[-3000:]
