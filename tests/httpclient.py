"""HTTP helpers for tests that talk to a live exchange: requests, answers, bounded polling."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar

import requests
from builders import make_archive
from service import Service

COURSE = "phys101"
#: nbgrader's timestamp format, as the plugin sends it.
STAMP = "2026-01-31 23:59:59.123456 UTC"

T = TypeVar("T")


def headers(svc: Service, who: str, key: str | None = None) -> dict[str, str]:
    """Headers authenticating as ``who``, with an ``Idempotency-Key`` if given."""
    return svc.headers(who, **{"Idempotency-Key": key}) if key else svc.headers(who)


def get(svc: Service, route: str, who: str | None, **params: Any) -> requests.Response:
    """GET a route as ``who`` (or anonymously)."""
    return requests.get(svc.url + route, params=params, headers=headers(svc, who) if who else {}, timeout=30)


def release(
    svc: Service,
    who: str,
    assignment: str,
    archive: bytes | None = None,
    notebooks: tuple[str, ...] = ("nb1",),
    key: str | None = None,
    course: str = COURSE,
    **extra: Any,
) -> requests.Response:
    """Release ``assignment`` as ``who``, uploading ``archive`` (a small default one)."""
    return requests.post(
        svc.url + "assignment",
        params={"course_id": course, "assignment_id": assignment, **extra},
        files={"assignment": ("a.tar.gz", archive or make_archive())},
        data={"notebooks": list(notebooks)},
        headers=headers(svc, who, key),
        timeout=30,
    )


def submit(
    svc: Service,
    who: str,
    assignment: str,
    archive: bytes | None = None,
    key: str | None = None,
    stamp: str = STAMP,
    course: str = COURSE,
) -> requests.Response:
    """Submit ``assignment`` as ``who`` with the client's ``stamp``."""
    return requests.post(
        svc.url + "submission",
        params={"course_id": course, "assignment_id": assignment, "timestamp": stamp},
        files={"assignment": ("s.tar.gz", archive or make_archive({"nb1.ipynb": who.encode()}))},
        headers=headers(svc, who, key),
        timeout=30,
    )


def headers_only(svc: Service, who: str, route_and_query: str, length: int) -> str:
    """POST only the headers of a multipart upload declaring ``length`` bytes; the start of the reply, as text.

    No byte of body follows, so an answer proves the service decided before reading the body.
    """
    host, port = "127.0.0.1", int(svc.url.split(":")[2].split("/")[0])
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(
            (
                f"POST {svc.url.split(str(port))[1]}{route_and_query} HTTP/1.1\r\nHost: {host}\r\n"
                f"Authorization: token {svc.tokens[who]}\r\n"
                "Content-Type: multipart/form-data; boundary=xyz\r\n"
                f"Content-Length: {length}\r\n\r\n"
            ).encode()
        )
        return s.recv(65536).decode()


def ok(response: requests.Response, status: int = 200) -> dict[str, Any]:
    """Assert a JSON success with this status; return the body."""
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["success"] is True
    return body


def refused(response: requests.Response, status: int, *words: str) -> dict[str, Any]:
    """Assert a JSON refusal with this status whose note says each of ``words``; return the body."""
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert body["success"] is False
    for word in words:
        assert word.lower() in body["note"].lower(), body["note"]
    return body


def until(
    predicate: Callable[[], T | None],
    timeout: float = 20,
    message: str | Callable[[], str] = "condition not met",
    interval: float = 0.1,
) -> T:
    """Poll until ``predicate()`` is truthy and return it; fail after ``timeout`` s with ``message``.

    Workers run asynchronously, so a test waits for their outcome rather than
    sleeping; ``message`` may be a callable, to report the state at the moment of failure.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"not within {timeout} s: {text}")
        time.sleep(interval)


def course_events(
    svc: Service, who: str, course: str = COURSE, assignment_id: str | None = None
) -> list[dict[str, Any]]:
    """Every raw event of a course (or one assignment), paging through the ``events`` route."""
    params: dict[str, Any] = {"course_id": course, "limit": 1000}
    if assignment_id:
        params["assignment_id"] = assignment_id
    out: list[dict[str, Any]] = []
    after = 0
    while True:
        page = ok(get(svc, "events", who, after=after, **params))
        out.extend(page["value"])
        if len(page["value"]) < params["limit"]:
            return out
        after = page["next_after"]


def exchange_raw(svc: Service, data: bytes, timeout: float = 10, then: float = 0) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes on a fresh connection; the answer's status, headers (lower-case names) and body.

    ``then``: seconds to keep the connection open after sending (for bodies declared but never sent).
    Status 0 and empty headers if the server closed without answering.
    """
    port = int(svc.url.split(":")[2].split("/")[0])
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if then:
            time.sleep(then)
        try:
            while chunk := s.recv(65536):
                received += chunk
                head, sep, body = received.partition(b"\r\n\r\n")
                length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
                if sep and length and len(body) >= int(length.group(1)):
                    break
        except ConnectionResetError:
            pass
    if not received:
        return 0, {}, b""
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
    return int(lines[0].split()[1]), {k.strip().lower(): v.strip() for k, v in fields.items()}, body


def raw_refused(answer: tuple[int, dict[str, str], bytes], status: int, *words: str) -> dict[str, Any]:
    """:func:`refused` for an answer from :func:`exchange_raw`."""
    code, fields, body = answer
    assert code == status, answer
    assert fields["content-type"].startswith("application/json"), answer
    note: dict[str, Any] = json.loads(body)
    assert note["success"] is False
    for word in words:
        assert word.lower() in note["note"].lower(), note["note"]
    return note


def path_of(svc: Service, route: str) -> str:
    """The request target of ``route`` (``/services/nbexchange/<route>``)."""
    return "/" + svc.url.split("/", 3)[3] + route
