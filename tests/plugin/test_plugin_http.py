"""The plugin's one HTTP helper against a scripted stand-in: retries, idempotency, read-your-writes, streaming.

The real service cannot be told to answer 503 or to vanish mid-test, so these few
checks use a small scripted HTTP server; everything else runs against the real one.
"""

from __future__ import annotations

import io
import logging
import os
import socket
import tarfile

import pytest
from nbgrader.coursedir import CourseDirectory
from nbgrader.exchange.abc import ExchangeError

from nbexchange.plugin import Exchange
from nbexchange.plugin.transfer import Upload

BASE = "/services/nbexchange/"


@pytest.fixture
def log():
    logger = logging.getLogger("nbexchange-plugin-test")
    logger.setLevel(logging.DEBUG)
    return logger


def make_exchange(url, tmp_path, log, **settings):
    settings = {"max_retries": 3, "retry_backoff": 0.01, "progress_threshold": 1024 * 1024, **settings}
    return Exchange(
        coursedir=CourseDirectory(),
        service_url=url,
        api_token="secret-token",
        cache=str(tmp_path / "cache"),
        log=log,
        **settings,
    )


def test_503_is_retried_after_retry_after_with_the_same_idempotency_key(stub, tmp_path, log, caplog):
    stub.answers = [
        (503, {"Retry-After": "1"}, {"success": False, "note": "Database unreachable."}),
        (200, {}, {"success": True, "note": "Submitted", "position": 12}),
    ]
    exchange = make_exchange(stub.url, tmp_path, log)
    answer = exchange.api_request("POST", "submission", "Submitting", {"course_id": "c1"})

    assert answer["position"] == 12
    first, second = stub.seen
    assert first["headers"]["Authorization"] == "token secret-token"
    assert first["headers"]["Idempotency-Key"] == second["headers"]["Idempotency-Key"]
    assert second["at"] - first["at"] >= 0.95
    assert "the exchange is busy (Database unreachable. (HTTP 503))" in caplog.text


#: HAProxy's own page for an API host that did not answer (nginx's is alike): HTML, not the exchange's JSON.
BALANCER_PAGE = b"<html><body><h1>504 Gateway Time-out</h1>The server didn't respond in time.</body></html>"


@pytest.mark.parametrize("status", [502, 504])
def test_a_balancers_bad_gateway_or_timeout_is_retried_with_the_same_idempotency_key(
    stub, tmp_path, log, caplog, status
):
    """An API host cut off behind a load balancer mid-request: the retry reaches another host with the same key."""
    stub.answers = [
        (status, {"Content-Type": "text/html"}, BALANCER_PAGE),
        (201, {}, {"success": True, "note": "Submitted", "position": 7}),
    ]
    exchange = make_exchange(stub.url, tmp_path, log)
    answer = exchange.api_request("POST", "submission", "Submitting", {"course_id": "c1"})

    assert answer["position"] == 7
    first, second = stub.seen
    assert first["headers"]["Idempotency-Key"] == second["headers"]["Idempotency-Key"]
    assert first["body"] == second["body"]
    assert f"HTTP {status}" in caplog.text and "<html>" not in caplog.text


def test_a_balancers_bad_gateway_that_lasts_fails_after_the_retries_in_one_line(stub, tmp_path, log):
    stub.answers = [(502, {"Content-Type": "text/plain"}, b"Bad Gateway")] * 3
    exchange = make_exchange(stub.url, tmp_path, log, max_retries=2)
    with pytest.raises(ExchangeError) as failure:
        exchange.api_request("GET", "assignments", "Listing the assignments of phys101", {"course_id": "phys101"})
    message = str(failure.value)
    assert message.startswith(
        f"Listing the assignments of phys101 failed: {stub.url}assignments answered HTTP 502 Bad Gateway (text/plain)"
    )
    assert "<" not in message and "\n" not in message
    assert len(stub.seen) == 3


def test_each_logical_write_has_its_own_idempotency_key(stub, tmp_path, log):
    stub.answers = [(200, {}, {"success": True, "position": 1}), (200, {}, {"success": True, "position": 2})]
    exchange = make_exchange(stub.url, tmp_path, log)
    exchange.api_request("POST", "submission", "Submitting")
    exchange.api_request("POST", "submission", "Submitting")
    keys = {seen["headers"]["Idempotency-Key"] for seen in stub.seen}
    assert len(keys) == 2


@pytest.mark.parametrize("status", [400, 403, 404, 409, 413, 422])
def test_4xx_is_never_retried_and_fails_with_the_note(stub, tmp_path, log, status):
    stub.answers = [(status, {}, {"success": False, "note": "Not for you."})]
    exchange = make_exchange(stub.url, tmp_path, log)
    with pytest.raises(ExchangeError, match=rf"Releasing c1 ps1 failed: Not for you\. \(HTTP {status}\)"):
        exchange.api_request("POST", "assignment", "Releasing c1 ps1")
    assert len(stub.seen) == 1


def test_a_200_that_is_not_success_fails(stub, tmp_path, log):
    stub.answers = [(200, {}, {"success": False, "note": "Odd."})]
    exchange = make_exchange(stub.url, tmp_path, log)
    with pytest.raises(ExchangeError, match="Listing failed: Odd."):
        exchange.api_request("GET", "assignments", "Listing")


def test_503_until_the_retries_run_out_fails(stub, tmp_path, log):
    stub.answers = [(503, {"Retry-After": "0"}, {"success": False, "note": "Behind."})] * 3
    exchange = make_exchange(stub.url, tmp_path, log, max_retries=2)
    with pytest.raises(ExchangeError, match=r"Listing failed: Behind\. \(HTTP 503\)"):
        exchange.api_request("GET", "assignments", "Listing")
    assert len(stub.seen) == 3


def test_no_service_fails_after_retrying(tmp_path, log, caplog):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    exchange = make_exchange(f"http://127.0.0.1:{port}{BASE}", tmp_path, log, max_retries=2)
    with pytest.raises(ExchangeError, match="Listing failed: the exchange at .* cannot be reached"):
        exchange.api_request("GET", "assignments", "Listing")
    assert caplog.text.count("the exchange cannot be reached") == 2

    assert "Max retries exceeded" not in caplog.text and "HTTPConnection" not in caplog.text
    assert "(Connection refused)" in caplog.text


HUB_PAGE = b"<!DOCTYPE HTML>\n<html><head><title>JupyterHub</title></head><body><h1>404 : Not Found</h1></body></html>"

NOT_THE_EXCHANGE = [
    # The hub's own port, as a plugin pointed at JUPYTERHUB_API_URL's host used to reach: 302, then 404 HTML.
    pytest.param(302, {"Location": "/hub/services/nbexchange/assignments"}, b"", "302 Found", id="redirect"),
    pytest.param(404, {"Content-Type": "text/html"}, HUB_PAGE, "404 Not Found (text/html)", id="html-404"),
    pytest.param(200, {"Content-Type": "text/html"}, HUB_PAGE, "200 OK (text/html)", id="html-200"),
    pytest.param(500, {}, b"", "500 Internal Server Error (no content type)", id="empty-500"),
    # JSON, but not the exchange's (the hub's API answers {status, message}).
    pytest.param(404, {}, {"status": 404, "message": "Not found"}, "404 Not Found (application/json)", id="hub-json"),
    pytest.param(200, {}, [1, 2], "200 OK (application/json)", id="json-list"),
]


@pytest.mark.parametrize(("status", "headers", "body", "said"), NOT_THE_EXCHANGE)
def test_an_answer_that_is_not_the_exchanges_is_one_line_naming_the_url_and_status(
    stub, tmp_path, log, status, headers, body, said
):
    stub.answers = [(status, headers, body)]
    exchange = make_exchange(stub.url, tmp_path, log)
    with pytest.raises(ExchangeError) as failure:
        exchange.api_request("GET", "assignments", "Listing the assignments of phys101", {"course_id": "phys101"})
    message = str(failure.value)
    assert message.startswith(f"Listing the assignments of phys101 failed: {stub.url}assignments answered HTTP {said}")
    assert "is the exchange's address right? Set NBEX_SERVICE_URL or c.Exchange.service_url." in message
    assert "<" not in message and "\n" not in message and "course_id=" not in message
    assert len(stub.seen) == 1  # neither retried nor redirected
    if "Location" in headers:
        assert "redirecting to /hub/services/nbexchange/assignments" in message


def test_reads_after_a_write_ask_for_its_position_even_in_a_new_process(stub, tmp_path, log):
    stub.answers = [
        (200, {}, {"success": True, "value": [], "position": 3}),
        (200, {}, {"success": True, "position": 41}),
        (200, {}, {"success": True, "position": 40}),
        (200, {}, {"success": True, "value": [], "position": 41}),
    ]
    first = make_exchange(stub.url, tmp_path, log)
    first.api_request("GET", "assignments", "Listing")
    first.api_request("POST", "submission", "Submitting")
    first.api_request("POST", "submission", "Submitting")  # an older position never replaces a newer one
    later = make_exchange(stub.url, tmp_path, log)  # what the next CLI call builds
    later.api_request("GET", "assignments", "Listing")

    assert "min_position" not in stub.seen[0]["query"]
    assert stub.seen[3]["query"]["min_position"] == "41"
    # Another user of the same machine (another token) has a position of its own.
    other = Exchange(
        coursedir=CourseDirectory(), service_url=stub.url, api_token="other", cache=str(tmp_path / "cache")
    )
    assert other.last_position() == 0


def test_uploads_stream_with_a_length_and_downloads_stream_to_disk(stub, tmp_path, log, caplog):
    big = tmp_path / "big.tar.gz"
    big.write_bytes(os.urandom(3 * 1024 * 1024))
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        data = os.urandom(2 * 1024 * 1024)
        info = tarfile.TarInfo("data/blob.bin")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    stub.answers = [
        (200, {}, {"success": True, "position": 5}),
        (200, {"Content-Type": "application/gzip"}, archive.getvalue()),
    ]
    exchange = make_exchange(stub.url, tmp_path, log)
    upload = Upload("assignment", str(big), "ps1.tar.gz", fields=[("notebooks", "p1"), ("notebooks", "p2")])
    exchange.api_request("POST", "assignment", "Releasing", {"course_id": "c1"}, upload=upload)
    with exchange.downloaded("assignment", {"course_id": "c1", "assignment_id": "ps1"}, "Fetching") as folder:
        assert (tmp_path / folder / "data" / "blob.bin").read_bytes() == data

    sent = stub.seen[0]
    assert "chunked" not in sent["headers"].get("Transfer-Encoding", "")
    assert int(sent["headers"]["Content-Length"]) == len(sent["body"])
    assert sent["headers"]["Content-Type"].startswith("multipart/form-data; boundary=")
    assert big.read_bytes() in sent["body"]
    assert sent["body"].count(b'name="notebooks"') == 2
    assert b'name="assignment"; filename="ps1.tar.gz"' in sent["body"]
    assert "Uploading ps1.tar.gz [##########] 100% (3.0 of 3.0 MB)" in caplog.text
    assert "Downloading ps1.tar.gz [##########] 100%" in caplog.text


def test_an_upload_retried_after_503_sends_the_whole_file_again(stub, tmp_path, log):
    payload = tmp_path / "feedback.html"
    payload.write_text("<html>feedback</html>")
    stub.answers = [
        (503, {"Retry-After": "0"}, {"success": False, "note": "Busy."}),
        (200, {}, {"success": True, "position": 9}),
    ]
    exchange = make_exchange(stub.url, tmp_path, log)
    exchange.api_request("POST", "feedback", "Releasing feedback", upload=Upload("feedback", str(payload), "p1.html"))
    first, second = stub.seen
    assert b"<html>feedback</html>" in first["body"]
    assert b"<html>feedback</html>" in second["body"]
    assert len(first["body"]) == len(second["body"])
