"""The exchange's exceptions: one small tree under ``ExchangeError``.

::

    ExchangeError                 500  something the exchange did not expect
     ├── Unauthorized             401  no or invalid credentials
     ├── Forbidden                403  not a member of the course, or not an Instructor
     ├── NotFound                 404  course, assignment, submission or feedback unknown
     ├── Invalid                  400  a parameter is missing or malformed
     ├── Conflict                 409  the write conflicts with the stream's state
     ├── TooLarge                 413  an upload over ``max_upload_size``
     ├── UnsupportedMedia         415  an upload that is not a gzip'd tar
     ├── UnsafeArchive            422  an archive that breaks the unpacking rules
     ├── KeyReused                422  an Idempotency-Key sent again with a different request
     ├── TooManyRequests          429  the caller has as many uploads in flight as allowed
     ├── Unavailable              503  database or broker unreachable, projections behind, or uploads at capacity
     ├── InsufficientStorage      507  the archive store's disk (or quota) is full
     ├── ChainBroken              500  verify found an event changed, removed or reordered
     └── BlobCorrupt              500  a stored archive's bytes no longer hash to its name

``TooManyRequests`` and ``Unavailable`` carry ``retry_after`` (seconds),
answered as a ``Retry-After`` header.

Each class carries its HTTP status so that the one place that answers HTTP
(``api.base.BaseHandler.write_error``) needs no table of its own. The core
raises them too; it never imports web code.
"""

from __future__ import annotations


class ExchangeError(Exception):
    """The root of every error the exchange raises on purpose."""

    status_code: int = 500
    default_note: str = "The exchange failed unexpectedly."
    #: Seconds after which a retry may succeed, for the ``Retry-After`` header; None: not worth retrying.
    retry_after: int | None = None

    def __init__(self, note: str | None = None, retry_after: int | None = None) -> None:
        self.note = note or self.default_note
        if retry_after is not None:
            self.retry_after = retry_after
        super().__init__(self.note)


class Unauthorized(ExchangeError):
    status_code = 401
    default_note = "Authentication required: send 'Authorization: token <your API token>'."


class Forbidden(ExchangeError):
    status_code = 403
    default_note = "You are not allowed to do this."


class NotFound(ExchangeError):
    status_code = 404
    default_note = "Not found."


class Invalid(ExchangeError):
    status_code = 400
    default_note = "The request is malformed."


class Conflict(ExchangeError):
    status_code = 409
    default_note = "The write conflicts with a concurrent change; read again and retry."


class ConflictError(Conflict):
    """A stale writer: the stream moved past the version it expected."""

    def __init__(self, stream: str, expected: int, actual: int) -> None:
        self.stream = stream
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"Stream {stream!r} is at version {actual}, not {expected}: "
            "someone else changed it first. Read again and retry."
        )


class TooLarge(ExchangeError):
    status_code = 413
    default_note = "The upload is larger than this exchange accepts."


class UnsupportedMedia(ExchangeError):
    status_code = 415
    default_note = "The upload is not a gzip'd tar archive."


class UnsafeArchive(ExchangeError):
    status_code = 422
    default_note = "The archive is unsafe to unpack."


class KeyReused(ExchangeError):
    status_code = 422
    default_note = (
        "This Idempotency-Key was already used for a different request (other parameters or other bytes); "
        "send a new key for a new request."
    )


class TooManyRequests(ExchangeError):
    status_code = 429
    default_note = "You have as many uploads in progress as this exchange allows; retry when one has finished."
    retry_after = 5


class Unavailable(ExchangeError):
    status_code = 503
    default_note = "The exchange is temporarily unavailable; try again shortly."
    retry_after = 5


class InsufficientStorage(ExchangeError):
    status_code = 507
    default_note = "The exchange's storage is full; nothing was stored. Tell the exchange's operators."


class ChainBroken(ExchangeError):
    """``verify()`` found an event that was changed, removed or reordered."""

    def __init__(self, position: int, reason: str) -> None:
        self.position = position
        self.reason = reason
        super().__init__(f"The log's hash chain is broken at position {position}: {reason}")


class BlobCorrupt(ExchangeError):
    """A stored archive's bytes no longer hash to the sha256 that names it: the store changed them."""

    def __init__(self, sha256: str) -> None:
        self.sha256 = sha256
        super().__init__(f"The stored bytes of archive {sha256} no longer hash to its name: the store changed them.")
