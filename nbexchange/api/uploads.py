"""Streaming uploads: multipart bodies parsed as they arrive, the file hashed straight to disk."""

from __future__ import annotations

from streaming_form_data import StreamingFormDataParser
from streaming_form_data.parser import ParseFailedException
from streaming_form_data.targets import BaseTarget, ListTarget
from streaming_form_data.validators import MaxSizeValidator, ValidationError

from nbexchange.api.base import BaseHandler
from nbexchange.errors import Invalid, TooLarge, UnsupportedMedia
from nbexchange.storage import StoredArchive, Upload
from nbexchange.workers.archives import GZIP_MAGIC

#: Room for the multipart envelope and small form fields around the file.
_ENVELOPE = 1024 * 1024
#: The most one repeated text field (all its values) may hold.
_FIELD_LIMIT = 64 * 1024


class _UploadTarget(BaseTarget):  # type: ignore[misc]
    """Feeds a multipart file part into an ``Upload`` (hashing, size limit, temp file)."""

    def __init__(self, upload: Upload) -> None:
        super().__init__()
        self.upload = upload
        self.seen = False

    def on_data_received(self, chunk: bytes) -> None:
        self.seen = True
        self.upload.write(chunk)


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
        # Let tornado read a body as large as we accept; we enforce the real limit ourselves.
        self.request.connection.set_max_body_size(limit + _ENVELOPE)  # type: ignore[union-attr]
        self._received = 0
        self._limit = limit
        self._upload = self.settings["archives"].new_upload(max_size=limit)
        self._target = _UploadTarget(self._upload)
        self._lists = {name: ListTarget(validator=MaxSizeValidator(_FIELD_LIMIT)) for name in self.list_fields}
        try:
            self._parser = StreamingFormDataParser(headers=self.request.headers)
        except ParseFailedException as e:
            raise UnsupportedMedia(f"The multipart body cannot be parsed: {e}") from e
        self._parser.register(self.file_field, self._target)
        for name, target in self._lists.items():
            self._parser.register(name, target)

    def data_received(self, chunk: bytes) -> None:
        if self._upload is None or self._failure is not None:
            return
        self._received += len(chunk)
        try:
            if self._received > self._limit + _ENVELOPE:
                raise TooLarge(f"The upload is larger than {self._limit} bytes, the most this exchange accepts.")
            self._parser.data_received(chunk)
        except TooLarge as e:
            self._fail(e)
            # Answer now and stop reading: the rest of the body is not worth receiving.
            self.send_error(413, exc_info=(type(e), e, None))
            self.request.connection.close()  # type: ignore[union-attr]
        except ValidationError:
            self._fail(Invalid(f"A form field is longer than {_FIELD_LIMIT} bytes."))
        except ParseFailedException as e:
            self._fail(Invalid(f"The multipart body is malformed: {e}"))

    def _fail(self, error: Exception) -> None:
        self._failure = error
        if self._upload is not None:
            self._upload.abort()

    def form_list(self, name: str) -> list[str]:
        """The values of a repeated text field, in order."""
        return [v.decode("utf-8", "replace") for v in self._lists[name].value]

    async def stored_upload(self) -> StoredArchive:
        """Durably store the received file (fsync, in a thread) and return it."""
        if self._failure is not None:
            raise self._failure
        upload = self._upload
        assert upload is not None
        if not self._target.seen or upload.size == 0:
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
