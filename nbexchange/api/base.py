"""The base handler: who is calling, parameters, JSON answers, and the one place errors become HTTP."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import time
import unicodedata
from collections.abc import Callable
from concurrent.futures import Executor
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import quote

from tornado import web

from nbexchange.clock import parse_timestamp
from nbexchange.errors import (
    ExchangeError,
    Forbidden,
    InsufficientStorage,
    Invalid,
    TooLarge,
    Unauthorized,
    Unavailable,
)
from nbexchange.exchange import Download, Exchange
from nbexchange.identity.base import User, UserPlugin
from nbexchange.metrics import REQUEST_LATENCY
from nbexchange.runtime import Runtime
from nbexchange.storage import CHUNK_SIZE

log = logging.getLogger(__name__)

T = TypeVar("T")

#: The longest id, in bytes of UTF-8: a file name's limit, since ids name folders in nbgrader's course tree.
MAX_ID = 255
#: Seconds a read waits for the workers to reach its ``min_position`` before catching up itself.
CATCH_UP_AFTER = 0.5
#: Unicode categories no id may hold: controls, format characters (U+200B, U+202E…), line and paragraph
#: separators; and space separators other than the plain space (U+00A0, U+3000…), checked apart.
_BAD_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})
#: The largest whole number a parameter may hold: positions and counts are 64-bit signed in the database.
MAX_INT = 2**63 - 1
_DIGITS = re.compile(r"[0-9]+")


def check_id(name: str, value: str) -> str:
    """``value`` in NFC if it is a safe id, else ``Invalid`` naming the parameter and the rule it breaks.

    A safe id is not empty nor ``.``; has no control, format or separator
    character (Unicode categories Cc, Cf, Zl, Zp, and Zs but the plain
    space), no leading or trailing whitespace, no ``/``, ``\\`` or ``..``;
    and is at most 255 bytes of UTF-8. An id sent decomposed (NFD) is the
    same id as composed: it is returned in NFC.
    """
    value = unicodedata.normalize("NFC", value)
    for char in value:
        category = unicodedata.category(char)
        if category in _BAD_CATEGORIES or (category == "Zs" and char != " "):
            what = unicodedata.name(char, "a control character").lower()
            raise Invalid(
                f"The parameter {name!r} contains U+{ord(char):04X} ({what}): ids may not hold control, "
                "format or separator characters."
            )
    if value != value.strip():
        raise Invalid(f"The parameter {name!r} may not begin or end with whitespace.")
    if "/" in value or "\\" in value or ".." in value or value in ("", "."):
        raise Invalid(f"The parameter {name!r} may not be empty or '.', nor contain '/', '\\' or '..'.")
    if len(value.encode("utf-8")) > MAX_ID:
        raise Invalid(f"The parameter {name!r} is longer than {MAX_ID} bytes of UTF-8.")
    return value


def error_json(note: str, lists: bool = False) -> str:
    """The body of every refusal: ``{"success": false, "note": ...}``, and ``"value": []`` on a list route.

    Clients of the earlier service index ``value`` in any answer of a list route.
    """
    body: dict[str, Any] = {"success": False, "note": note}
    if lists:
        body["value"] = []
    return json.dumps(body)


def content_disposition(filename: str) -> str:
    """An attachment header for any id-made file name: an ASCII fallback and the exact UTF-8 name (RFC 6266)."""
    # Header values are Latin-1 on the wire: a Unicode id would otherwise fail the answer.
    fallback = re.sub(r'[^\x20-\x7e]|["\\]', "_", filename)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


# Streaming on every route, not only uploads: tornado then calls ``prepare``
# (the size check and authentication) before it reads any of the body, where
# a buffered handler would hold the whole body in memory first.
@web.stream_request_body
class BaseHandler(web.RequestHandler):
    """Every route's base: authenticates, parses, runs blocking work in threads, answers JSON."""

    #: Health routes set this to False.
    auth_required = True
    route_name = ""
    #: Whether the route answers a list in ``value`` (its refusals then carry ``"value": []``).
    lists = False
    #: The one method of this route that takes a large (streamed) body; uploads set it.
    upload_method: str | None = None

    @property
    def exchange(self) -> Exchange:
        exchange: Exchange = self.settings["exchange"]
        return exchange

    @property
    def runtime(self) -> Runtime:
        runtime: Runtime = self.settings["runtime"]
        return runtime

    @property
    def user_plugin(self) -> UserPlugin:
        plugin: UserPlugin = self.settings["user_plugin"]
        return plugin

    @property
    def executor(self) -> Executor:
        executor: Executor = self.settings["executor"]
        return executor

    @property
    def user(self) -> User:
        """The authenticated caller (set by ``prepare``)."""
        user: User = self.current_user
        return user

    def check_xsrf_cookie(self) -> None:
        """API clients send tokens, not forms: no XSRF check."""

    async def prepare(self) -> None:
        """Bound the body, then authenticate the caller; 413 for a body too large, 401 for no or invalid credentials."""
        self._started = time.perf_counter()
        self.limit_body()
        if not self.auth_required:
            return
        user = await self.user_plugin.authenticate(self.request)
        if user is None:
            raise self.user_plugin.unauthenticated(self.request)
        self.current_user = user

    def limit_body(self) -> None:
        """Refuse (413) a declared body over ``max_body_size``, unless this is the route's upload method.

        Only the declared length is looked at here, before a byte of the body is
        read; a chunked body is counted as it arrives by the connection, whose
        limit is ``max_body_size`` (uploads raise it for their own request).
        """
        connection = self.request.connection
        if self.request.method == self.upload_method:
            connection.set_body_timeout(self.settings["upload_timeout"])  # type: ignore[union-attr]
            return
        limit: int = self.settings["max_body_size"]
        declared = self.request.headers.get("Content-Length", "0")
        # tornado has already refused a Content-Length that is not digits.
        if declared.isdigit() and int(declared) > limit:
            raise TooLarge(f"This request may carry a body of at most {limit} bytes; only uploads may be larger.")

    def data_received(self, chunk: bytes) -> None:
        """A small body that no route reads (within ``max_body_size``): dropped."""

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run blocking work (database, disk) in the executor."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(fn, *args, **kwargs))

    # -- parameters --------------------------------------------------------

    def param(self, name: str, required: bool = True) -> str | None:
        """A query parameter's first value; ``Invalid`` if required and missing or empty."""
        values = self.request.query_arguments.get(name)
        if not values or not values[0]:
            if required:
                raise Invalid(f"The parameter {name!r} is required.")
            return None
        try:
            return values[0].decode("utf-8")
        except UnicodeDecodeError:
            raise Invalid(f"The parameter {name!r} is not valid UTF-8.") from None

    def id_param(self, name: str, required: bool = True) -> str:
        """A course, assignment, notebook or user id, in NFC; ``Invalid`` unless :func:`check_id` accepts it."""
        value = self.param(name, required)
        if value is None:
            return ""
        return check_id(name, value)

    def optional_id(self, name: str) -> str | None:
        """An id parameter that may be absent."""
        return self.id_param(name, required=False) or None

    def int_param(self, name: str, default: int, minimum: int = 0, maximum: int = MAX_INT) -> int:
        """A whole-number parameter (ASCII digits) within bounds, never past a 64-bit integer."""
        text = self.param(name, required=False)
        if text is None:
            return default
        # Only ASCII digits: int() would also take signs, '_', spaces and other scripts' digits.
        if not _DIGITS.fullmatch(text) and not (text.startswith("-") and _DIGITS.fullmatch(text[1:])):
            raise Invalid(f"The parameter {name!r} must be a whole number.")
        # Compared as text first: a huge number is refused without converting a million digits.
        value = int(text) if len(text) <= 20 else (MAX_INT + 1 if text[0] != "-" else -1)
        if not minimum <= value <= maximum:
            raise Invalid(f"The parameter {name!r} must be between {minimum} and {maximum}.")
        return value

    def timestamp_param(self, name: str = "timestamp") -> datetime:
        """A timestamp in nbgrader's format (``2026-01-31 23:59:59.123456 UTC``) or ISO 8601."""
        text = self.param(name)
        assert text is not None
        try:
            return parse_timestamp(text)
        except ValueError:
            raise Invalid(f"The parameter {name!r} is not a timestamp like '2026-01-31 23:59:59.123456 UTC'.") from None

    def idempotency_key(self) -> str | None:
        """The ``Idempotency-Key`` header, if sent."""
        key = self.request.headers.get("Idempotency-Key")
        if key is None:
            return None
        if not key or len(key) > MAX_ID or not key.isprintable():
            raise Invalid("The Idempotency-Key header must be 1 to 255 printable characters.")
        return key

    # -- reading consistently ----------------------------------------------

    async def read_position(self) -> int:
        """Wait until projections reach ``min_position`` (if given); the position reads reflect.

        The workers bring the read models along; if they have not within
        ``CATCH_UP_AFTER`` seconds (none running, or busy), this process
        catches them up itself.
        """
        wanted = self.int_param("min_position", 0)
        started = time.monotonic()
        deadline = started + self.exchange.consistency_timeout
        delay = 0.01
        caught_up = False
        checked_head = False
        while True:
            current = await self.run(self.exchange.reached, wanted)
            if current is not None:
                return current
            if not checked_head:
                # Not reached at once: a position past the log's head is the client's error, not worth a wait.
                checked_head = True
                head = await self.run(self.exchange.head)
                if wanted > head:
                    raise Invalid(f"The parameter 'min_position' ({wanted}) is past the log's last position ({head}).")
            if time.monotonic() > deadline:
                raise Unavailable(
                    f"The exchange has not yet caught up to position {wanted}; retry shortly.", retry_after=2
                )
            if not caught_up and time.monotonic() - started > CATCH_UP_AFTER:
                caught_up = True
                await self.run(self.exchange.catch_up_to, wanted)
                continue
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)

    # -- answering ---------------------------------------------------------

    def answer(self, body: dict[str, Any], status: int = 200, value_json: str | None = None) -> None:
        """Finish with a JSON body that says ``success``; ``value_json`` is a ``value`` already encoded."""
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        text = json.dumps({"success": True, **body})
        if value_json is None:
            self.finish(text)
            return
        # A long list goes out in pieces, not copied into one string first.
        self.write(text[:-1] + ', "value": ')
        self.write(value_json)
        self.finish("}")

    def compute_etag(self) -> None:
        """No ETag: every answer carries the log's position, and hashing a 5 MB list costs more than it saves."""
        return None

    async def send_download(self, record: Callable[[], Download], filename: str) -> None:
        """Record the download (``record``, in a thread) and stream its archive in chunks, never whole in memory.

        The record and the first chunk's read share one thread hand-off, and the reads stop at the size
        sent in ``Content-Length``: a released assignment is one chunk, so one hand-off in all.
        """

        def record_and_read() -> tuple[Download, bytes]:
            download = record()
            try:
                return download, download.file.read(min(CHUNK_SIZE, download.size))
            except BaseException:
                download.file.close()
                raise

        download, chunk = await self.run(record_and_read)
        with download.file as f:
            self.set_header("Content-Type", "application/gzip")
            self.set_header("Content-Length", str(download.size))
            self.set_header("Content-Disposition", content_disposition(filename))
            self.set_header("X-Nbexchange-Position", str(download.event.position))
            left = download.size
            while chunk:
                left -= len(chunk)
                self.write(chunk)
                await self.flush()
                chunk = await self.run(f.read, min(CHUNK_SIZE, left)) if left > 0 else b""
        self.finish()

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """The one place an exception becomes an HTTP answer: JSON with a note, never HTML."""
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ExchangeError):
            status_code, note = exc.status_code, exc.note
            if exc.retry_after is not None:
                self.set_header("Retry-After", str(exc.retry_after))
            elif isinstance(exc, Unauthorized):
                self.set_header("WWW-Authenticate", "token")
            elif isinstance(exc, Forbidden):
                note = self.user_plugin.explain_forbidden(note)
        elif isinstance(exc, web.HTTPError):
            note = exc.log_message or self._reason
            if status_code == 405:
                note = f"{self.request.method} is not allowed on this route."
        elif status_code == 404:
            note = "There is no such route; see the API documentation."
        elif exc is None:
            note = self._reason
        else:
            note = "The exchange failed unexpectedly; the error was logged."
        self.clear_header("Content-Disposition")
        self.clear_header("X-Nbexchange-Position")
        self.set_status(status_code)
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(error_json(note, lists=self.lists))

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        """Expected refusals are one line; anything else gets its traceback."""
        if isinstance(value, ExchangeError) and value.status_code < 500:
            log.info("%s %s -> %d: %s", self.request.method, self.request.path, value.status_code, value.note)
        elif isinstance(value, (Unavailable, InsufficientStorage)):
            # Known conditions of the deployment, not bugs: one line each, no traceback.
            level = logging.ERROR if isinstance(value, InsufficientStorage) else logging.WARNING
            log.log(level, "%s %s -> %d: %s", self.request.method, self.request.path, value.status_code, value.note)
        else:
            super().log_exception(typ, value, tb)

    def on_finish(self) -> None:
        started = getattr(self, "_started", None)
        if started is not None:
            REQUEST_LATENCY.labels(self.route_name or "unknown", self.request.method, str(self.get_status())).observe(
                time.perf_counter() - started
            )


class NotFoundHandler(BaseHandler):
    """Any unknown path: a JSON 404."""

    auth_required = False

    def prepare(self) -> None:  # type: ignore[override]
        self.limit_body()
        raise web.HTTPError(404, "There is no such route; see the API documentation.")
