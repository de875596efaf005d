"""Streaming uploads: multipart bodies parsed as they arrive, the file hashed straight to disk."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from tornado import web
from tornado.ioloop import IOLoop

from nbexchange.api.base import BaseHandler, check_id
from nbexchange.errors import ExchangeError, Invalid, TooLarge, TooManyRequests, Unavailable, UnsupportedMedia
from nbexchange.identity.base import User
from nbexchange.storage import StoredArchive, Upload, raise_if_full
from nbexchange.workers.archives import GZIP_MAGIC

T = TypeVar("T")

log = logging.getLogger(__name__)

#: Room for the multipart envelope and small form fields around the file.
_ENVELOPE = 1024 * 1024
#: The most one repeated text field (all its values) may hold.
_FIELD_LIMIT = 64 * 1024
#: The most one part's headers may hold.
_HEADERS_LIMIT = 16 * 1024


def multipart_boundary(content_type: str) -> bytes:
    """The boundary of a ``multipart/form-data`` content type; ``UnsupportedMedia`` if it is not one."""
    kind, options = parse_options_header(content_type)
    if kind != b"multipart/form-data":
        raise UnsupportedMedia("The body is not multipart/form-data.")
    boundary = options.get(b"boundary")
    if not boundary:
        raise UnsupportedMedia("The multipart/form-data Content-Type has no boundary.")
    return boundary


class Part(Protocol):
    """Where one field's parts go."""

    def start(self) -> None:
        """A part of this field begins."""

    def data(self, chunk: memoryview) -> None:
        """The next bytes of the current part."""


class FormStream:
    """Routes a streamed ``multipart/form-data`` body (parsed by python-multipart) to each field's ``Part``.

    ``Invalid`` for a malformed body, and for a part of a field that has no
    ``Part`` (a form holds exactly the documented fields); ``complete`` once
    the closing boundary was read.
    """

    def __init__(self, boundary: bytes, parts: dict[str, Part]) -> None:
        self.parts = parts
        self.complete = False
        self._part: Part | None = None
        self._field = bytearray()
        self._value = bytearray()
        self._disposition = b""
        self._parser = MultipartParser(
            boundary,
            callbacks={
                "on_part_begin": self._on_part_begin,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_part_data": self._on_part_data,
                "on_end": self._on_end,
            },
            max_header_size=_HEADERS_LIMIT,
        )

    def feed(self, chunk: bytes) -> None:
        """Parse the next chunk of the body."""
        try:
            self._parser.write(chunk)
        except FormParserError as e:
            raise Invalid(f"The multipart body is malformed: {e}") from e

    def _on_part_begin(self) -> None:
        self._part = None
        self._disposition = b""

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _on_header_end(self) -> None:
        if bytes(self._field).lower() == b"content-disposition":
            self._disposition = bytes(self._value)
        self._field.clear()
        self._value.clear()

    def _on_headers_finished(self) -> None:
        kind, options = parse_options_header(self._disposition)
        if kind != b"form-data":
            raise Invalid("The multipart body is malformed: a part is not form-data.")
        name = options.get(b"name", b"").decode("utf-8", "replace")
        self._part = self.parts.get(name)
        if self._part is None:
            # Nothing is skipped: what a client sends is either used or refused.
            fields = ", ".join(repr(field) for field in self.parts)
            raise Invalid(f"The form field {name[:80]!r} is not one this route takes (only {fields}).")
        self._part.start()

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part is not None:
            self._part.data(memoryview(data)[start:end])

    def _on_end(self) -> None:
        self.complete = True


class _FilePart:
    """The file's part: written to the upload as it comes; one only."""

    def __init__(self, upload: Upload, field: str) -> None:
        self.upload = upload
        self.field = field
        self.seen = False

    def start(self) -> None:
        if self.seen:
            # A second part would be appended to the first: the stored bytes would not be what either part was.
            raise Invalid(f"The form field {self.field!r} holds a second file part; send exactly one file.")
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


class UploadSlots:
    """Uploads being received by this API process, per user and in total, within their caps.

    Used from the event loop only, so plain counters suffice.
    """

    def __init__(self, per_user: int, total: int) -> None:
        self.per_user = per_user
        self.total = total
        self._by_user: Counter[tuple[int, str]] = Counter()
        self._count = 0

    def take(self, user: User) -> None:
        """Count one more upload of ``user``; ``TooManyRequests`` or ``Unavailable`` past a cap."""
        key = (user.org_id, user.name)
        if self._by_user[key] >= self.per_user:
            raise TooManyRequests(
                f"You already have {self._by_user[key]} uploads in progress, the most this exchange takes at once "
                "from one user; retry when one has finished."
            )
        if self._count >= self.total:
            raise Unavailable(
                f"The exchange is receiving {self._count} uploads, as many as it takes at once; retry shortly."
            )
        self._by_user[key] += 1
        self._count += 1

    def give_back(self, user: User) -> None:
        """One upload of ``user`` has ended."""
        key = (user.org_id, user.name)
        self._by_user[key] -= 1
        if self._by_user[key] <= 0:
            del self._by_user[key]
        self._count -= 1


class UploadHandler(BaseHandler):
    """A handler whose POST body is a multipart form with one file, streamed to the archive store.

    Nothing of the body is held in memory beyond one chunk. A declared
    ``Content-Length`` over ``max_upload_size`` is refused with 413 in
    ``prepare``, before the body is read; a body that grows past it (chunked
    encoding) is refused as soon as it does.
    """

    upload_method = "POST"
    #: The multipart field that carries the file.
    file_field = "assignment"
    #: Whether the file must be a gzip'd tar (feedback is HTML).
    gzip_required = True
    #: Repeated id fields to collect, by name.
    list_fields: tuple[str, ...] = ()
    #: The application setting that bounds this route's upload, in bytes.
    limit_setting = "max_upload_size"

    _upload: Upload | None = None
    _failure: Exception | None = None
    _receiving = False
    #: Set while the upload is made durable (in a thread): a closing connection must not pull it away.
    _finishing = False
    #: The client closed the connection: a handler still running stores nothing.
    _gone = False
    #: Whose upload slot this request holds (given back once).
    _slot_user: User | None = None
    #: When the body last sent anything, and the timer that drops a body that stalls.
    _last_chunk = 0.0
    _stall_timer: Any = None

    async def prepare(self) -> None:
        await super().prepare()
        if self.request.method != "POST":
            return
        limit: int = self.settings[self.limit_setting]
        declared = self.request.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > limit + _ENVELOPE:
            raise TooLarge(f"The upload is {int(declared)} bytes; this exchange accepts at most {limit} bytes.")
        content_type = self.request.headers.get("Content-Type", "")
        if not content_type.startswith("multipart/form-data"):
            raise UnsupportedMedia(f"Send the file as multipart/form-data in the field {self.file_field!r}.")
        boundary = multipart_boundary(content_type)
        # The whole authorization, before the first byte of the body is read.
        await self.authorize_upload()
        # Let tornado read a body as large as we accept; we enforce the real limit ourselves.
        self.request.connection.set_max_body_size(limit + _ENVELOPE)  # type: ignore[union-attr]
        self._received = 0
        self._limit = limit
        self.take_upload_slot()
        self._upload = self.settings["archives"].new_upload(max_size=limit)
        self.runtime.upload_started()
        self._receiving = True
        self._file = _FilePart(self._upload, self.file_field)
        self._lists = {name: _ListPart() for name in self.list_fields}
        self._parser = FormStream(boundary, {self.file_field: self._file, **self._lists})

    async def authorize_upload(self) -> None:
        """Parse the upload's parameters and decide whether the caller may make it (each route its own)."""
        raise NotImplementedError

    def take_upload_slot(self) -> None:
        """Count this upload against ``max_uploads_per_user`` and ``max_uploads_total``, or refuse it (429, 503).

        Decided before the body is read; the slot is given back when the request ends.
        """
        if self._gone:
            # The client left while ``prepare`` awaited: nothing would give back a slot (or remove a temp file).
            raise Invalid("The client closed the connection before its upload began.")
        slots: UploadSlots = self.settings["upload_slots"]
        slots.take(self.user)
        self._slot_user = self.user

    def limit_body(self) -> None:
        """As every route's, and for the upload itself a watch on its body: one that stalls is dropped."""
        super().limit_body()
        if self.request.method == self.upload_method:
            self._last_chunk = time.monotonic()
            self._stall_timer = IOLoop.current().call_later(self.settings["upload_stall_timeout"], self._check_stall)

    def _check_stall(self) -> None:
        # upload_timeout bounds the whole body; this, each silence in it, so that a dead client
        # does not hold its slot, its temp file and a connection for up to an hour.
        self._stall_timer = None
        if self._finished or (self._upload is not None and self._parser.complete):
            return
        limit: float = self.settings["upload_stall_timeout"]
        silent = time.monotonic() - self._last_chunk
        if silent < limit:
            self._stall_timer = IOLoop.current().call_later(limit - silent, self._check_stall)
            return
        note = f"The upload sent nothing for {limit:g} seconds; it was discarded. Send it again."
        log.info("%s %s -> 408: %s", self.request.method, self.request.path, note)
        self._fail(Invalid(note))
        self.send_error(408, exc_info=(web.HTTPError, web.HTTPError(408, note), None))
        self.request.connection.close()  # type: ignore[union-attr]

    def data_received(self, chunk: bytes) -> None:
        self._last_chunk = time.monotonic()
        if self._upload is None or self._failure is not None:
            # After a refusal the rest of the body is read and dropped, so that the client gets the answer.
            return
        self._received += len(chunk)
        self.runtime.upload_received()
        try:
            if self._received > self._limit + _ENVELOPE:
                raise TooLarge(f"The upload is larger than {self._limit} bytes, the most this exchange accepts.")
            self._parser.feed(chunk)
        except TooLarge as e:
            self._fail(e)
            # Answer now and stop reading: the rest of the body is not worth receiving.
            self.send_error(413, exc_info=(type(e), e, None))
            self.request.connection.close()  # type: ignore[union-attr]
        except ExchangeError as e:
            # Malformed (400) or the disk is full (507): answered once the body is in.
            self._fail(e)

    def _fail(self, error: Exception) -> None:
        self._failure = error
        if self._upload is not None:
            self._upload.abort()

    def form_list(self, name: str) -> list[str]:
        """The values of a repeated id field (``notebooks``), in order, each in NFC; ``Invalid`` for one
        that is not UTF-8 or breaks the id rule (:func:`check_id`)."""
        try:
            return [check_id(name, value.decode("utf-8")) for value in self._lists[name].values]
        except UnicodeDecodeError:
            raise Invalid(f"A value of the form field {name!r} is not valid UTF-8.") from None

    async def with_stored_upload(self, use: Callable[[StoredArchive], T]) -> T:
        """Durably store the received file (fsync) and hand it to ``use`` (the append), in one executor call."""
        upload = self._received_upload()
        self._finishing = True

        def store_and_use() -> T:
            try:
                stored = upload.finish()
            except OSError as e:
                upload.abort()
                raise_if_full(e)
                raise
            return use(stored)

        return await self.run(store_and_use)

    def _received_upload(self) -> Upload:
        """The upload, once its body arrived whole and well-formed; what is wrong with it otherwise."""
        if self._gone:
            # Answered to no one; one line in the log, not a traceback.
            raise Invalid("The client closed the connection before its upload was stored; nothing was stored.")
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
        return upload

    def _received_all(self) -> None:
        # Once per request, whichever of finishing or a closed connection comes first.
        if self._stall_timer is not None:
            IOLoop.current().remove_timeout(self._stall_timer)
            self._stall_timer = None
        if self._receiving:
            self._receiving = False
            self.runtime.upload_ended()
        if self._slot_user is not None:
            self.settings["upload_slots"].give_back(self._slot_user)
            self._slot_user = None

    def on_connection_close(self) -> None:
        self._received_all()
        self._gone = True
        # Once finishing, the request runs to its end (and answers no one); on_finish cleans up if it failed.
        if self._upload is not None and not self._finishing:
            self._upload.abort()
        super().on_connection_close()

    def on_finish(self) -> None:
        self._received_all()
        # A request that failed before ``finish`` leaves no temp file behind.
        if self._upload is not None and self.get_status() >= 400:
            self._upload.abort()
        super().on_finish()
