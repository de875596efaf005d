"""The event store: what an append asks for, what the log records, and the hash chain."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from nbexchange.clock import format_iso
from nbexchange.errors import ExchangeError
from nbexchange.events.domain import UPCASTERS, Actor, DomainEvent, Upcasters, decode

#: The ``prev_hash`` of the first event.
GENESIS = "0" * 64


def canonical_json(value: Any) -> str:
    """One byte-exact JSON encoding: sorted keys, no spaces, UTF-8 kept as is."""
    return json.dumps(
        value,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    )


@dataclass(frozen=True)
class AppendRequest:
    """One event to append.

    ``expected_version`` is the stream's version the writer last saw (0 for a
    new stream); ``None`` appends after whatever is there. ``requires`` names
    other streams, each with the version the writer decided on: an event
    that depends on a stream it does not write to (a submission on its
    assignment's releases) is refused if that stream moved meanwhile. A
    stale writer gets ``ConflictError``.

    ``request_hash`` fingerprints the request that made the event: a retry
    with the same ``idempotency_key`` must carry the same fingerprint, or it
    is refused (``KeyReused``) instead of answered with the first result.
    """

    event: DomainEvent
    actor: Actor
    expected_version: int | None = None
    idempotency_key: str | None = None
    requires: tuple[tuple[str, int], ...] = ()
    request_hash: str | None = None

    @property
    def stream(self) -> str:
        return self.event.stream()


@dataclass(frozen=True)
class RecordedEvent:
    """An event as the log holds it."""

    position: int
    stream: str
    version: int
    type: str
    schema: int
    actor: Actor
    recorded_at: datetime
    idempotency_key: str | None
    payload: Mapping[str, Any]
    prev_hash: str
    hash: str
    #: The fingerprint of the request that made it (kept beside the event, outside the chain).
    request_hash: str | None = None

    def domain(self, upcasters: Upcasters = UPCASTERS) -> DomainEvent:
        """The domain event, its payload upcast to the current schema."""
        return decode(self.type, self.schema, self.payload, upcasters)

    @property
    def data(self) -> DomainEvent:
        """The domain event, decoded once (with the registered upcasters)."""
        # Kept beside the fields, as functools.cached_property would keep it,
        # without the lock it takes on Python 3.11 (1.5 µs an event, in every
        # rebuild). Two threads may both decode one event: the same value.
        data: DomainEvent | None = self.__dict__.get("_data")
        if data is None:
            data = self.__dict__["_data"] = self.domain()
        return data

    @classmethod
    def stored(
        cls,
        position: int,
        stream: str,
        version: int,
        type: str,
        schema: int,
        actor: Actor,
        recorded_at: datetime,
        idempotency_key: str | None,
        payload: Mapping[str, Any],
        prev_hash: str,
        hash: str,
        request_hash: str | None = None,
    ) -> RecordedEvent:
        """An event as read back from the log.

        Made without the frozen dataclass's ``__init__``, which sets each of
        eleven fields through ``object.__setattr__``: a third of the cost of
        turning a stored row into an event, in every replay and rebuild.
        """
        event = object.__new__(cls)
        event.__dict__.update(
            position=position,
            stream=stream,
            version=version,
            type=type,
            schema=schema,
            actor=actor,
            recorded_at=recorded_at,
            idempotency_key=idempotency_key,
            payload=payload,
            prev_hash=prev_hash,
            hash=hash,
            request_hash=request_hash,
        )
        return event

    def hashed_fields(self) -> dict[str, Any]:
        """Everything the chain covers, as plain JSON values."""
        return {
            "position": self.position,
            "stream": self.stream,
            "version": self.version,
            "type": self.type,
            "schema": self.schema,
            "actor": self.actor.to_json(),
            "recorded_at": format_iso(self.recorded_at),
            "idempotency_key": self.idempotency_key,
            "payload": dict(self.payload),
        }

    def computed_hash(self) -> str:
        """The hash this event should carry, given its ``prev_hash``."""
        return chain_hash(self.prev_hash, self.hashed_fields())

    def to_json(self) -> dict[str, Any]:
        """The event as auditors see it: every field, hashes included."""
        out = self.hashed_fields()
        out["prev_hash"] = self.prev_hash
        out["hash"] = self.hash
        return out


def chain_hash(prev_hash: str, fields: Mapping[str, Any]) -> str:
    """SHA-256 over the previous hash and the canonical encoding of the event."""
    digest = hashlib.sha256()
    digest.update(prev_hash.encode("ascii"))
    digest.update(b"\n")
    digest.update(canonical_json(fields).encode("utf-8"))
    return digest.hexdigest()


def same_request(earlier: RecordedEvent, event_type: str, stream: str, request_hash: str | None) -> bool:
    """Whether a request repeats the one that appended ``earlier`` under the same idempotency key.

    Events logged before fingerprints were kept have none: for those, the
    same type of action on the same stream counts as the same request.
    """
    if earlier.request_hash is not None and request_hash is not None:
        return earlier.request_hash == request_hash
    return earlier.type == event_type and earlier.stream == stream


def request_fingerprint(action: str, **facts: Any) -> str:
    """The fingerprint of one request: its action and every fact that defines it (parameters, uploaded bytes)."""
    return hashlib.sha256(canonical_json({"action": action, **facts}).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Appended:
    """The outcome of one append: the stored event, and whether it was already there."""

    event: RecordedEvent
    duplicate: bool = False


@dataclass(frozen=True)
class ChainFault:
    """One place where the log does not match its own chain."""

    position: int
    reason: str


@dataclass(frozen=True)
class VerifyReport:
    """What ``verify()`` found: how many events it checked and every fault."""

    checked: int
    head_hash: str
    faults: tuple[ChainFault, ...]

    @property
    def ok(self) -> bool:
        return not self.faults


def verify_chain(
    events: Iterator[RecordedEvent], matches: Callable[[RecordedEvent], bool] | None = None
) -> VerifyReport:
    """Recompute every hash and link; name each changed, removed or reordered event.

    Positions start at 1 and have no gaps (appends are serialised), so a
    missing position is a removed event; a ``prev_hash`` that is not the
    previous event's hash is a removal or a reordering; a hash that does not
    match the event's own fields is a change. ``matches`` may replace the
    hash's check by a faster one that agrees with it.
    """
    faults: list[ChainFault] = []
    expected_position = 1
    prev_hash = GENESIS
    checked = 0
    for event in events:
        checked += 1
        if event.position != expected_position:
            if event.position > expected_position:
                faults.append(
                    ChainFault(
                        expected_position,
                        f"events {expected_position}..{event.position - 1} are missing",
                    )
                )
            else:
                faults.append(ChainFault(event.position, "position out of order"))
        if event.prev_hash != prev_hash:
            faults.append(ChainFault(event.position, "prev_hash does not match the previous event's hash"))
        if not (matches(event) if matches else event.computed_hash() == event.hash):
            faults.append(ChainFault(event.position, "hash does not match the event's contents (changed)"))
        expected_position = event.position + 1
        prev_hash = event.hash
    return VerifyReport(checked=checked, head_hash=prev_hash, faults=tuple(faults))


class EventStore(Protocol):
    """The append-only log of action events."""

    def append(self, request: AppendRequest) -> Appended:
        """Append one event; raise ``ConflictError`` for a stale ``expected_version``."""
        ...

    def append_batch(self, requests: Sequence[AppendRequest]) -> list[Appended | ExchangeError]:
        """Append many events in one transaction; each fails or succeeds on its own."""
        ...

    def read(
        self,
        after: int = 0,
        limit: int | None = None,
        *,
        until_position: int | None = None,
        until_time: datetime | None = None,
        stream: str | None = None,
    ) -> Iterator[RecordedEvent]:
        """Events with position greater than ``after``, in log order."""
        ...

    def get(self, position: int) -> RecordedEvent:
        """The event at ``position``; ``NotFound`` if there is none."""
        ...

    def get_many(self, positions: Sequence[int]) -> dict[int, RecordedEvent]:
        """The events at these positions, by position (those that exist)."""
        ...

    def head(self) -> int:
        """The position of the last committed event (0 for an empty log)."""
        ...

    def stream_version(self, stream: str) -> int:
        """The version of the last event in ``stream`` (0 if it has none)."""
        ...

    def read_stream(self, stream: str) -> list[RecordedEvent]:
        """Every event of one stream, in order."""
        ...

    def by_idempotency_key(self, key: str) -> RecordedEvent | None:
        """The event appended with ``key``, if any."""
        ...

    def by_idempotency_keys(self, keys: Sequence[str]) -> dict[str, RecordedEvent]:
        """The events appended with these keys, by key (those that exist)."""
        ...

    def verify(self) -> VerifyReport:
        """Recompute the whole chain."""
        ...
