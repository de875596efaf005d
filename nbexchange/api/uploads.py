"""Streaming uploads: multipart bodies parsed as they arrive, the file hashed straight to disk."""

from __future__ import annotations

import re
from typing import Protocol

from nbexchange.api.base import BaseHandler
from nbexchange.errors import Invalid, TooLarge, UnsupportedMedia
from nbexchange.storage import StoredArchive, Upload
from nbexchange.workers.archives import GZIP_MAGIC

#: Room for the multipart envelope and small form fields around the file.
_ENVELOPE = 1024 * 1024
#: The most one repeated text field (all its values) may hold.
_FIELD_LIMIT = 64 * 1024
#: The most one part's headers may hold.
_HEADERS_LIMIT = 16 * 1024

_BOUNDARY = re.compile(r';\s*boundary=(?:"([^"]{1,200})"|([^\s;"]{1,200}))', re.IGNORECASE)
_PARAM = re.compile(r';\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s;"]*))')
_ESCAPE = re.compile(r"\\(.)")


def multipart_boundary(content_type: str) -> bytes:
    """The boundary of a ``multipart/form-data`` content type; ``UnsupportedMedia`` if it is not one."""
    if content_type.split(";", 1)[0].strip().lower() != "multipart/form-data":
        raise UnsupportedMedia("The body is not multipart/form-data.")
    found = _BOUNDARY.search(content_type)
    if not found:
        raise UnsupportedMedia("The multipart/form-data Content-Type has no boundary.")
    return (found.group(1) or found.group(2)).encode("latin-1")


def _field_name(headers: bytes) -> str | None:
    """The ``name`` of a part, from its ``Content-Disposition: form-data; name=…`` header."""
    for line in headers.split(b"\r\n"):
        key, _, value = line.partition(b":")
        if key.strip().lower() != b"content-disposition":
            continue
        text = value.decode("utf-8", "replace").strip()
        if text.split(";", 1)[0].strip().lower() != "form-data":
            raise Invalid("The multipart body is malformed: a part is not form-data.")
        for found in _PARAM.finditer(text):
            if found.group(1).lower() == "name":
                quoted = found.group(2)
                return _ESCAPE.sub(r"\1", quoted) if quoted is not None else found.group(3)
        return None
    raise Invalid("The multipart body is malformed: a part has no Content-Disposition header.")


class Part(Protocol):
    """Where the parser sends one field's parts."""

    def start(self) -> None:
        """A part of this field begins."""

    def data(self, chunk: memoryview) -> None:
        """The next bytes of the current part."""


class MultipartParser:
    """A streaming ``multipart/form-data`` parser (RFC 7578) feeding each field's bytes to its ``Part``.

    It keeps no more than one delimiter's length between chunks (a delimiter
    may straddle two), and a part's headers until they end. Parts of fields
    without a ``Part`` are skipped, the preamble and epilogue ignored.
    ``Invalid`` for a malformed body. Plain ``bytes.find`` and slicing: the
    part headers are a few lines, not worth the ``email`` package's parser.
    """

    _PREAMBLE, _AFTER_DELIMITER, _HEADERS, _BODY, _END = range(5)

    def __init__(self, boundary: bytes, parts: dict[str, Part]) -> None:
        self.parts = parts
        self._delimiter = b"\r\n--" + boundary
        # The first delimiter has no line break before it: start as if there were one.
        self._held = b"\r\n"
        self._state = self._PREAMBLE
        self._part: Part | None = None

    @property
    def complete(self) -> bool:
        """Whether the closing delimiter has been read."""
        return self._state == self._END

    def feed(self, chunk: bytes) -> None:
        """Parse the next chunk of the body."""
        if self._state == self._END:
            return
        buffer = self._held + chunk if self._held else chunk
        self._held = b""
        self._parse(buffer)

    def _parse(self, buffer: bytes) -> None:
        view = memoryview(buffer)
        pos, end = 0, len(buffer)
        while True:
            state = self._state
            if state in (self._PREAMBLE, self._BODY):
                at = buffer.find(self._delimiter, pos)
                if at < 0:
                    # Hold back what could be the start of a delimiter.
                    hold = max(pos, end - len(self._delimiter) + 1)
                    if state == self._BODY and hold > pos and self._part is not None:
                        self._part.data(view[pos:hold])
                    self._held = buffer[hold:]
                    return
                if state == self._BODY and at > pos and self._part is not None:
                    self._part.data(view[pos:at])
                pos = at + len(self._delimiter)
                self._state = self._AFTER_DELIMITER
            elif state == self._AFTER_DELIMITER:
                if end - pos < 2:
                    self._held = buffer[pos:]
                    return
                if buffer.startswith(b"--", pos):
                    self._state = self._END
                    return
                # Transport padding (spaces, tabs) may follow a delimiter before its line break.
                padded = pos
                while padded < end and buffer[padded] in b" \t" and padded - pos < 64:
                    padded += 1
                if end - padded < 2:
                    self._held = buffer[pos:]
                    return
                if not buffer.startswith(b"\r\n", padded):
                    raise Invalid("The multipart body is malformed: a boundary is not followed by a line break.")
                pos = padded + 2
                self._state = self._HEADERS
            elif state == self._HEADERS:
                at = buffer.find(b"\r\n\r\n", pos)
                if at < 0:
                    if end - pos > _HEADERS_LIMIT:
                        raise Invalid(f"The multipart body is malformed: part headers over {_HEADERS_LIMIT} bytes.")
                    self._held = buffer[pos:]
                    return
                name = _field_name(buffer[pos:at])
                self._part = self.parts.get(name) if name is not None else None
                if self._part is not None:
                    self._part.start()
                pos = at + 4
                self._state = self._BODY
            else:
                return


class _FilePart:
    """The file's part: written to the upload as it comes."""

    def __init__(self, upload: Upload) -> None:
        self.upload = upload
        self.seen = False

    def start(self) -> None:
        self.seen = True

    def data(self, chunk: memoryview) -> None:
        self.upload.write(chunk)


class _ListPart:
    """A repeated text field's values, bounded in total size."""

    def __init__(self) -> None:
        self.values: list[bytearray] = []
        self._size = 0

    def start(self) -> None:
        self.values.append(bytearray())

    def data(self, chunk: memoryview) -> None:
        self._size += len(chunk)
        if self._size > _FIELD_LIMIT:
            raise Invalid(f"A form field is longer than {_FIELD_LIMIT} bytes.")
        self.values[-1] += chunk


class UploadHandler(BaseHandler):
    """A handler whose POST body is a multipart form with one file, streamed to the archive store.

    Nothing of the body is held in memory beyond one chunk. A declared
    ``Content-Length`` over ``max_upload_size`` is refused with 413 in
    ``prepare``, before the body is read; a body that grows past it (chunked
    encoding) is refused as soon as it does.
    """

    #: The multipart field that carries the file.
    file_field = "assignment"
    #: Whether the file must be a gzip'd tar (feedback is HTML).
    gzip_required = True
    #: Repeated text fields to collect, by name.
    list_fields: tuple[str, ...] = ()

    _upload: Upload | None = None
    _failure: Exception | None = None

    async def prepare(self) -> None:
        await super().prepare()
        if self.request.method != "POST":
            return
        limit: int = self.settings["max_upload_size"]
        declared = self.request.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > limit + _ENVELOPE:
            raise TooLarge(f"The upload is {int(declared)} bytes; this exchange accepts at most {limit} bytes.")
        content_type = self.request.headers.get("Content-Type", "")
        if not content_type.startswith("multipart/form-data"):
            raise UnsupportedMedia(f"Send the file as multipart/form-data in the field {self.file_field!r}.")
        boundary = multipart_boundary(content_type)
        # Let tornado read a body as large as we accept; we enforce the real limit ourselves.
        self.request.connection.set_max_body_size(limit + _ENVELOPE)  # type: ignore[union-attr]
        self._received = 0
        self._limit = limit
        self._upload = self.settings["archives"].new_upload(max_size=limit)
        self._file = _FilePart(self._upload)
        self._lists = {name: _ListPart() for name in self.list_fields}
        self._parser = MultipartParser(boundary, {self.file_field: self._file, **self._lists})

    def data_received(self, chunk: bytes) -> None:
        if self._upload is None or self._failure is not None:
            return
        self._received += len(chunk)
        try:
            if self._received > self._limit + _ENVELOPE:
                raise TooLarge(f"The upload is larger than {self._limit} bytes, the most this exchange accepts.")
            self._parser.feed(chunk)
        except TooLarge as e:
            self._fail(e)
            # Answer now and stop reading: the rest of the body is not worth receiving.
            self.send_error(413, exc_info=(type(e), e, None))
            self.request.connection.close()  # type: ignore[union-attr]
        except Invalid as e:
            self._fail(e)

    def _fail(self, error: Exception) -> None:
        self._failure = error
        if self._upload is not None:
            self._upload.abort()

    def form_list(self, name: str) -> list[str]:
        """The values of a repeated text field, in order."""
        return [v.decode("utf-8", "replace") for v in self._lists[name].values]

    async def stored_upload(self) -> StoredArchive:
        """Durably store the received file (fsync, in a thread) and return it."""
        if self._failure is not None:
            raise self._failure
        upload = self._upload
        assert upload is not None
        if not self._parser.complete:
            upload.abort()
            raise Invalid("The multipart body ends before its closing boundary.")
        if not self._file.seen or upload.size == 0:
            upload.abort()
            raise Invalid(f"The request has no file in the field {self.file_field!r}.")
        if self.gzip_required and upload.head != GZIP_MAGIC:
            upload.abort()
            raise UnsupportedMedia("The upload is not a gzip'd tar archive (.tar.gz).")
        return await self.run(upload.finish)

    def on_connection_close(self) -> None:
        if self._upload is not None:
            self._upload.abort()
        super().on_connection_close()

    def on_finish(self) -> None:
        # A request that failed before ``finish`` leaves no temp file behind.
        if self._upload is not None and self.get_status() >= 400:
            self._upload.abort()
        super().on_finish()
