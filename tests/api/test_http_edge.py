"""The HTTP edge under hostile framing: bodies bounded before authentication, timeouts, and JSON for every refusal."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from httpclient import COURSE, exchange_raw, ok, path_of, raw_refused, release
from service import TEST_BROKER_URL, Service, drop_db, fresh_db_url, start_service

from nbexchange.api import default_handlers

USERS = {"ada": {COURSE: "Instructor"}, "s1": {COURSE: "Student"}}
HEADER_LIMIT = 8192
TIMEOUT = 2.0
UPLOADS = {"assignment", "submission", "feedback"}
ROUTES = [route for route, _ in default_handlers]


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("edge")
    url, token = fresh_db_url(root)
    service = start_service(
        root,
        USERS,
        db_url=url,
        broker_url=TEST_BROKER_URL,
        extra=[
            f"--NbExchange.max_header_size={HEADER_LIMIT}",
            f"--NbExchange.idle_connection_timeout={TIMEOUT}",
            f"--NbExchange.body_timeout={TIMEOUT}",
            f"--NbExchange.upload_stall_timeout={TIMEOUT}",
            "--NbExchange.upload_timeout=30",
        ],
    )
    ok(release(service, "ada", "ps1"), 201)  # what the uploads below submit to
    yield service
    service.stop()
    drop_db(token)


def head(svc: Service, method: str, route: str, *lines: str) -> bytes:
    """A request's line and headers, ending the header block."""
    target = path_of(svc, route) + f"?course_id={COURSE}&assignment_id=ps1"
    return (f"{method} {target} HTTP/1.1\r\nHost: x\r\n" + "".join(f"{line}\r\n" for line in lines) + "\r\n").encode()


def rss_kib(pid: int) -> int:
    """The resident memory of a process, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


# -- bodies before authentication ------------------------------------------------

#: Every (method, route) that takes no large body: each route's methods but an upload's POST.
SMALL_BODY = [
    (method, route)
    for route in ROUTES + ["no-such-route"]
    for method in ("GET", "POST", "PUT", "DELETE", "PATCH")
    if not (route in UPLOADS and method == "POST")
]


@pytest.mark.hostile(
    "Bodies before authentication",
    "a 60 MB Content-Length, with no token, on every route and method but an upload's POST",
    "413 before a byte of the body is read, the note names the limit; the connection is closed",
)
@pytest.mark.parametrize("method, route", SMALL_BODY)
def test_a_large_body_is_refused_before_it_is_read(svc, method, route):
    answer = exchange_raw(svc, head(svc, method, route, "Content-Length: 60000000"))
    raw_refused(answer, 413, "at most 16384 bytes")


@pytest.mark.hostile(
    "Bodies before authentication",
    "a small body (within max_body_size) with no token, and with a wrong token",
    "401, the body is not needed to answer",
)
@pytest.mark.parametrize("route", ["history", "events", "assignments", "assignment"])
def test_a_small_body_without_a_token_gets_401(svc, route):
    answer = exchange_raw(svc, head(svc, "GET", route, "Content-Length: 5") + b"hello")
    raw_refused(answer, 401, "token")
    answer = exchange_raw(svc, head(svc, "GET", route, "Content-Length: 5", "Authorization: token nope") + b"hello")
    raw_refused(answer, 401)


@pytest.mark.hostile(
    "Bodies before authentication",
    "a chunked body growing past max_body_size on a route that takes no upload (authenticated)",
    "413 as soon as the count passes the limit; the connection is closed",
)
def test_a_chunked_body_is_counted_as_it_arrives(svc):
    chunk = b"4000\r\n" + b"a" * 0x4000 + b"\r\n"
    request = head(svc, "GET", "history", "Transfer-Encoding: chunked", f"Authorization: token {svc.tokens['ada']}")
    raw_refused(exchange_raw(svc, request + chunk * 3 + b"0\r\n\r\n"), 413, "larger than this route accepts")


@pytest.mark.hostile(
    "Bodies before authentication",
    "40 parallel POSTs with no token declaring 60 MB bodies (1 MB sent) to every route, uploads included",
    "413 (401 on an upload) to each, before the body; the API process's resident memory grows by less than 40 MB",
)
def test_declared_bodies_do_not_grow_the_server(svc):
    pid = svc.procs[0].pid
    before = rss_kib(pid)
    answers: dict[int, int] = {}

    def one(i: int) -> None:
        route = ROUTES[i % len(ROUTES)]
        data = head(svc, "POST", route, "Content-Length: 60000000", "Content-Type: multipart/form-data")
        answers[i] = exchange_raw(svc, data + b"x" * 1024 * 1024, timeout=30)[0]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == {i: 401 if ROUTES[i % len(ROUTES)] in UPLOADS else 413 for i in range(40)}
    assert rss_kib(pid) - before < 40 * 1024


# -- timeouts ----------------------------------------------------------------------


def closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the server closes ``sock`` (which sends nothing more); fails after ``seconds``."""
    started = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"the connection was still open after {seconds} s") from None
    return time.monotonic() - started


def connect(svc: Service) -> socket.socket:
    port = int(svc.url.split(":")[2].split("/")[0])
    return socket.create_connection(("127.0.0.1", port), timeout=10)


@pytest.mark.hostile(
    "Bodies before authentication",
    "a request header sent halfway, then nothing (slowloris); an idle connection that sends nothing",
    "the connection is closed after idle_connection_timeout",
)
@pytest.mark.parametrize("partial", [b"", b"GET /services/nbexchange/health HTTP/1.1\r\nHost: x\r\n"])
def test_a_stalled_header_is_dropped(svc, partial):
    with connect(svc) as s:
        s.sendall(partial)
        assert closed_within(s, TIMEOUT * 10) > TIMEOUT * 0.5


@pytest.mark.hostile(
    "Bodies before authentication",
    "a body sent partly, then nothing, on a route that takes no upload",
    "the connection is closed after body_timeout",
)
def test_a_stalled_small_body_is_dropped(svc):
    with connect(svc) as s:
        s.sendall(head(svc, "GET", "history", f"Authorization: token {svc.tokens['s1']}", "Content-Length: 1000"))
        s.sendall(b"x" * 10)
        assert closed_within(s, TIMEOUT * 10) > TIMEOUT * 0.5


def upload_head(svc: Service) -> bytes:
    target = path_of(svc, "submission") + f"?course_id={COURSE}&assignment_id=ps1&timestamp=2026-01-01"
    return (
        f"POST {target} HTTP/1.1\r\nHost: x\r\nAuthorization: token {svc.tokens['s1']}\r\n"
        "Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: 100000\r\n\r\n--xyz\r\n"
    ).encode()


def answer_then_close(sock: socket.socket, seconds: float) -> bytes:
    """Everything the server sends until it closes ``sock``; fails if still open after ``seconds``."""
    sock.settimeout(seconds)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        raise AssertionError(f"the connection was still open after {seconds} s") from None
    return received


@pytest.mark.hostile(
    "Bodies before authentication",
    "an upload whose body stops (headers and a first boundary, then nothing); one that trickles a byte every "
    "half second, then stops",
    "408 in the JSON error shape and the connection closed after upload_stall_timeout of silence (the upload "
    "discarded); a body that keeps arriving is not cut, whatever its pace, up to upload_timeout",
)
def test_a_stalled_upload_is_dropped_and_a_slow_one_is_not(svc):
    with connect(svc) as s:
        s.sendall(upload_head(svc))
        started = time.monotonic()
        reply = answer_then_close(s, TIMEOUT * 10)
        assert time.monotonic() - started > TIMEOUT * 0.5
    assert reply.startswith(b"HTTP/1.1 408"), reply
    assert b'"success": false' in reply and b"sent nothing for 2 seconds" in reply
    with connect(svc) as s:
        s.sendall(upload_head(svc))
        for _ in range(int(TIMEOUT * 3 / 0.5)):  # three stall timeouts' worth, never silent for one
            time.sleep(0.5)
            s.sendall(b"x")
        stopped = time.monotonic()
        reply = answer_then_close(s, TIMEOUT * 10)
        assert time.monotonic() - stopped > TIMEOUT * 0.5
    assert reply.startswith(b"HTTP/1.1 408"), reply


# -- malformed HTTP ----------------------------------------------------------------


@pytest.mark.hostile(
    "Malformed HTTP",
    "a bad request line, a bad HTTP version (HTTP/2.0, HTTP/1.x), a header line without a colon, unequal "
    "Content-Lengths, a non-numeric or negative Content-Length, Content-Length with chunked Transfer-Encoding, "
    "an unknown Transfer-Encoding, a malformed chunk",
    "400 in the JSON error shape, naming the fault, with Connection: close",
)
@pytest.mark.parametrize(
    "request_bytes, words",
    [
        (b"GARBAGE\r\n\r\n", "request line"),
        (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", "version"),
        (b"GET / HTTP/1.x\r\nHost: x\r\n\r\n", "request line"),
        (b"GET /h HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n", "HTTP/1.1"),
        (b"POST /h HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello", "unequal"),
        (b"POST /h HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", "integer"),
        (b"POST /h HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", "integer"),
        (b"POST /h HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", "both"),
        (b"POST /h HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", "Transfer-Encoding"),
    ],
)
def test_malformed_requests_get_json(svc, request_bytes, words):
    answer = exchange_raw(svc, request_bytes)
    raw_refused(answer, 400, words)
    assert answer[1]["connection"] == "close"


@pytest.mark.hostile("Malformed HTTP", "a malformed chunk size in a chunked body", "400 in the JSON error shape")
def test_a_malformed_chunk_gets_json(svc):
    request = head(svc, "GET", "history", "Transfer-Encoding: chunked", f"Authorization: token {svc.tokens['ada']}")
    raw_refused(exchange_raw(svc, request + b"zz\r\nhello\r\n0\r\n\r\n"), 400, "chunk")


@pytest.mark.hostile(
    "Malformed HTTP",
    "a request header longer than max_header_size (one long header; many headers)",
    "431 in the JSON error shape, with Connection: close (tornado alone resets the connection)",
)
@pytest.mark.parametrize("extra", [b"X-Long: " + b"a" * 2 * HEADER_LIMIT, b"\r\n".join([b"X-N: 1"] * 2000)])
def test_an_oversized_header_gets_431(svc, extra):
    line = b"GET " + path_of(svc, "health").encode() + b" HTTP/1.1\r\nHost: x\r\n"
    answer = exchange_raw(svc, line + extra + b"\r\n\r\n")
    raw_refused(answer, 431, f"longer than {HEADER_LIMIT} bytes")
    assert answer[1]["connection"] == "close"


def test_a_long_chunk_size_line_is_not_taken_for_a_long_header(svc):
    """tornado reads a chunk's size line with a 64-byte limit too: that is no 431 about the header."""
    request = head(svc, "GET", "history", "Transfer-Encoding: chunked", f"Authorization: token {svc.tokens['ada']}")
    code, _, body = exchange_raw(svc, request + b"0" * 100 + b"1\r\nx\r\n0\r\n\r\n")
    assert code != 431 and b"header" not in body


def test_a_well_formed_request_still_works_on_a_kept_alive_connection(svc):
    request = b"GET " + path_of(svc, "health").encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    with connect(svc) as s:
        for _ in range(3):
            s.sendall(request)
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
