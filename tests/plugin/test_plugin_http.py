"""The plugin's one HTTP helper against a scripted stand-in: retries, idempotency, read-your-writes, streaming.

The real service cannot be told to answer 503 or to vanish mid-test, so these few
checks use a small scripted HTTP server; everything else runs against the real one.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
from nbgrader.coursedir import CourseDirectory
from nbgrader.exchange.abc import ExchangeError

from nbexchange.plugin import Exchange
from nbexchange.plugin.transfer import Upload

BASE = "/services/nbexchange/"


class Script(BaseHTTPRequestHandler):
    """Answers each request with the next scripted (status, headers, body) and records what it got."""

    def do_GET(self):
        self._answer()

    def do_POST(self):
        self._answer()

    def _answer(self):
        server = self.server
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        url = urlsplit(self.path)
        server.seen.append(
            {
                "method": self.command,
                "route": url.path[len(BASE) :],
                "query": {key: values[0] for key, values in parse_qs(url.query).items()},
                "headers": dict(self.headers),
                "body": body,
                "at": time.monotonic(),
            }
        )
        status, headers, payload = server.answers.pop(0)
        if isinstance(payload, dict):
            payload = json.dumps(payload).encode()
            headers = {"Content-Type": "application/json", **headers}
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Script)
    server.seen, server.answers = [], []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}{BASE}"
    yield server
    server.shutdown()
    server.server_close()


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
