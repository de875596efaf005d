"""tornado's HTTP/1 server, answering its own early refusals (malformed requests) in the service's JSON shape.

tornado refuses a request it cannot frame (a bad request line or HTTP version,
a malformed header, bad, duplicate or conflicting ``Content-Length``, a
``Transfer-Encoding`` it does not speak, a body over the limit) with a bare
``400`` and no body, and resets the connection on a header over
``max_header_size``. Here each is answered like every other refusal,
``{"success": false, "note": ...}`` with its status (400, 413 or 431) and
``Connection: close``, then the connection is closed. Only the framing is
touched: the three small subclasses below hook the points where tornado
detects these errors and leave the rest of its HTTP/1 code as it is.
"""

from __future__ import annotations

import asyncio
import logging
import re
from http import HTTPStatus
from typing import Any

from tornado import httputil, iostream
from tornado.http1connection import (
    HTTP1Connection,
    HTTP1ServerConnection,
    is_transfer_encoding_chunked,
    parse_int,
)
from tornado.httpserver import HTTPServer, _HTTPRequestContext

from nbexchange.api.base import error_json

log = logging.getLogger(__name__)

#: tornado's notes for a body over the limit (413); any other framing error is a 400.
_TOO_LARGE = ("too long", "too large")


def refusal(status: int, note: str) -> bytes:
    """A complete HTTP/1.1 answer with the JSON error body, closing the connection."""
    body = error_json(note).encode()
    reason = HTTPStatus(status).phrase
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json; charset=UTF-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


def _answer_and_close(stream: iostream.IOStream, status: int, note: str) -> None:
    log.info("Malformed HTTP request from %s -> %d: %s", _peer(stream), status, note)
    written = stream.write(refusal(status, note))

    def close(sent: Any) -> None:
        # Closed once the answer is out, or could not be sent (the client left): never left open.
        sent.exception()
        stream.close()

    written.add_done_callback(close)


def _peer(stream: iostream.IOStream) -> str:
    try:
        return str(stream.socket.getpeername()[0])
    except (OSError, AttributeError):
        return "?"


class _HeaderLimitStream(iostream.IOStream):
    """An IOStream that answers 431 before tornado closes it over a header longer than ``max_header_size``."""

    _refused = False

    def _check_max_bytes(self, delimiter: Any, size: int) -> None:
        try:
            super()._check_max_bytes(delimiter, size)
        except iostream.UnsatisfiableReadError:
            # The request header is the one read up to a pattern with a limit (a chunk's size
            # line is read up to bytes). The answer is written at once (once: tornado may
            # check twice before it closes); the stream is closed by tornado right after.
            if isinstance(delimiter, re.Pattern) and not self._refused:
                self._refused = True
                log.info("Request header over the limit from %s -> 431", _peer(self))
                self.write(refusal(431, f"The request header is longer than {self._read_max_bytes} bytes."))
            raise


def _check_framing(headers: httputil.HTTPHeaders) -> None:
    """``HTTPInputError`` for a body length tornado would refuse: bad or unequal ``Content-Length``s, or one
    with ``Transfer-Encoding``, or a transfer coding other than chunked (tornado 6's own rules)."""
    if "Content-Length" in headers:
        lengths = set(re.split(r",[ \t]*", headers["Content-Length"]))
        if len(lengths) > 1:
            raise httputil.HTTPInputError(f"Multiple unequal Content-Lengths: {headers['Content-Length']!r}")
        try:
            parse_int(lengths.pop())
        except ValueError:
            raise httputil.HTTPInputError(
                f"Only integer Content-Length is allowed: {headers['Content-Length']!r}"
            ) from None
    is_transfer_encoding_chunked(headers)


class _JSONErrorConnection(HTTP1Connection):
    """One request's HTTP/1 framing; a framing error is answered in JSON instead of tornado's bare 400."""

    def _parse_headers(self, data: bytes) -> tuple[str, httputil.HTTPHeaders]:
        try:
            start_line, headers = super()._parse_headers(data)
            # Parsed again by tornado after the handler's ``prepare``; checked here, before
            # authentication, where the answer can still be chosen.
            httputil.parse_request_start_line(start_line)
            _check_framing(headers)
        except httputil.HTTPInputError as e:
            raise self._refuse(400, f"The request is not valid HTTP/1.1: {e}") from e
        return start_line, headers

    def _read_body(self, code: int, headers: httputil.HTTPHeaders, delegate: Any) -> Any:
        try:
            reading = super()._read_body(code, headers, delegate)
        except httputil.HTTPInputError as e:
            raise self._framing_error(e) from e
        return None if reading is None else self._guard(reading)

    async def _guard(self, reading: Any) -> None:
        # A chunked body passing the limit, or a malformed chunk, is found while it is read.
        try:
            await reading
        except httputil.HTTPInputError as e:
            raise self._framing_error(e) from e

    def _framing_error(self, error: httputil.HTTPInputError) -> iostream.StreamClosedError:
        if str(error).endswith(_TOO_LARGE):
            return self._refuse(413, f"The request body is larger than this route accepts ({error}).")
        return self._refuse(400, f"The request is not valid HTTP/1.1: {error}")

    def _refuse(self, status: int, note: str) -> iostream.StreamClosedError:
        """Answer (unless an answer was already begun) and close; the error ends tornado's reading quietly."""
        if self.stream is not None and not self.stream.closed():
            if self._response_start_line is None:
                _answer_and_close(self.stream, status, note)
            else:
                self.stream.close()
        return iostream.StreamClosedError()


class _JSONErrorServerConnection(HTTP1ServerConnection):
    """tornado's per-connection request loop, with :class:`_JSONErrorConnection` for each request."""

    async def _server_request_loop(self, delegate: httputil.HTTPServerConnectionDelegate) -> None:
        # tornado's loop (6.x), but for the connection class.
        try:
            while True:
                conn = _JSONErrorConnection(self.stream, False, self.params, self.context)
                request_delegate = delegate.start_request(self, conn)
                try:
                    ret = await conn.read_response(request_delegate)
                except (iostream.StreamClosedError, iostream.UnsatisfiableReadError, asyncio.CancelledError):
                    return
                except Exception:
                    log.error("Uncaught exception", exc_info=True)
                    conn.close()
                    return
                if not ret:
                    return
                await asyncio.sleep(0)
        finally:
            delegate.on_close(self)


class JSONErrorHTTPServer(HTTPServer):
    """tornado's HTTPServer whose refusals of malformed requests are JSON, like the application's."""

    def handle_stream(self, stream: iostream.IOStream, address: tuple[Any, ...]) -> None:
        if type(stream) is iostream.IOStream:
            # Not yet read from nor registered with the loop: the same socket, in the stream that answers 431.
            stream = _HeaderLimitStream(
                stream.socket, max_buffer_size=stream.max_buffer_size, read_chunk_size=stream.read_chunk_size
            )
        context = _HTTPRequestContext(stream, address, self.protocol, self.trusted_downstream)
        conn = _JSONErrorServerConnection(stream, self.conn_params, context)
        self._connections.add(conn)
        conn.start_serving(self)
