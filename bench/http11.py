"""A minimal keep-alive HTTP/1.1 client on asyncio streams, for the benchmarks' load generators.

Small on purpose: on a 2-core machine the load generator shares the CPU with
the server it measures, so it should spend as little as it can per request.
It speaks only to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

#: Loopback only: the benchmarks never send traffic elsewhere.
HOST = "127.0.0.1"


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Connection:
    """One persistent connection; requests on it run one at a time."""

    def __init__(self, port: int, timeout: float = 120.0) -> None:
        self.port = port
        self.timeout = timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection(HOST, self.port, limit=1024 * 1024), self.timeout
        )

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(TimeoutError, OSError):
                await asyncio.wait_for(self.writer.wait_closed(), 5)
        self.reader = self.writer = None

    async def request(
        self,
        method: str,
        target: str,
        headers: dict[str, str] | None = None,
        body: Sequence[bytes] | None = None,
        stream: AsyncIterator[bytes] | None = None,
    ) -> Response:
        """Send a request (``body``: the buffers of a body built beforehand; or ``stream``) and read the answer."""
        return await asyncio.wait_for(self._request(method, target, headers or {}, body, stream), self.timeout)

    async def _request(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        body: Sequence[bytes] | None,
        stream: AsyncIterator[bytes] | None,
    ) -> Response:
        if self.writer is None:
            await self.open()
        assert self.reader is not None and self.writer is not None
        lines = [f"{method} {target} HTTP/1.1", f"Host: {HOST}:{self.port}"]
        if body is not None:
            lines.append(f"Content-Length: {sum(len(part) for part in body)}")
        lines += [f"{k}: {v}" for k, v in headers.items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        try:
            if body is not None:
                for part in body:
                    self.writer.write(part)
                await self.writer.drain()
            elif stream is not None:
                async for chunk in stream:
                    self.writer.write(chunk)
                    await self.writer.drain()
            else:
                await self.writer.drain()
        except (ConnectionResetError, BrokenPipeError):
            # The server may answer (413) and close before the body is sent: read that answer.
            pass
        try:
            return await self.read_response()
        except BaseException:
            await self.close()
            raise

    async def read_response(self) -> Response:
        """Read one answer (Content-Length or chunked)."""
        assert self.reader is not None
        head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in header_lines:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            data = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")
                    break
                parts.append(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
            data = b"".join(parts)
        else:
            data = b""
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return Response(status, headers, data)


def multipart(
    file_field: str, filename: str, content: bytes | Sequence[bytes], fields: dict[str, list[str]] | None = None
) -> tuple[str, list[bytes]]:
    """A multipart/form-data body with text fields and one file (bytes, or its buffers): (content type, its buffers).

    The file's bytes are not copied: the body is sent buffer by buffer.
    """
    boundary = "bench" + secrets.token_hex(12)
    before = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, values in (fields or {}).items()
        for value in values
    )
    before += (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; filename="{filename}"\r\n'
        "Content-Type: application/gzip\r\n\r\n"
    ).encode()
    file = [content] if isinstance(content, bytes) else list(content)
    return f"multipart/form-data; boundary={boundary}", [before, *file, f"\r\n--{boundary}--\r\n".encode()]
