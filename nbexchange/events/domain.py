"""Domain events: the immutable facts of the exchange, one frozen dataclass per action."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, TypeVar

from nbexchange.clock import format_iso, parse_timestamp

JSON = dict[str, Any]

#: Roles an actor can hold. ``system`` is a worker acting on the log's behalf.
INSTRUCTOR = "Instructor"
STUDENT = "Student"
SYSTEM = "system"


def assignment_stream(org_id: int, course_id: str, assignment_id: str) -> str:
    """The stream that orders an assignment's releases and unreleases.

    Ids never contain ``/`` (the API refuses them), so ``/`` separates safely.
    """
    return f"assignment/{org_id}/{course_id}/{assignment_id}"


def student_stream(org_id: int, course_id: str, assignment_id: str, student_id: str) -> str:
    """The stream of one student's work on one assignment.

    Each student has their own, so that thousands of students submitting at
    once never contend for the same stream version.
    """
    return f"student/{org_id}/{course_id}/{assignment_id}/{student_id}"


def check_stream(org_id: int, course_id: str, assignment_id: str, source_position: int) -> str:
    """The stream of the archive check of the event at ``source_position`` (one event, ever)."""
    return f"check/{org_id}/{course_id}/{assignment_id}/{source_position}"


@dataclass(frozen=True)
class Actor:
    """Who acted, and in which role, at the moment they acted."""

    name: str
    role: str
    full_name: str | None = None
    email: str | None = None
    lms_user_id: str | None = None

    def to_json(self) -> JSON:
        """The actor as a JSON object; absent profile fields are left out."""
        out = {"name": self.name, "role": self.role}
        for key in ("full_name", "email", "lms_user_id"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Actor:
        """Rebuild an actor from :meth:`to_json`'s output."""
        return cls(
            name=data["name"],
            role=data["role"],
            full_name=data.get("full_name"),
            email=data.get("email"),
            lms_user_id=data.get("lms_user_id"),
        )


SYSTEM_ACTOR = Actor(name="nbexchange-worker", role=SYSTEM)


@dataclass(frozen=True)
class DomainEvent:
    """Fields every action shares: where in the exchange it happened."""

    TYPE: ClassVar[str] = ""
    SCHEMA: ClassVar[int] = 1

    org_id: int
    course_id: str
    assignment_id: str

    def stream(self) -> str:
        """The stream this event belongs to."""
        return assignment_stream(self.org_id, self.course_id, self.assignment_id)

    def archive(self) -> str | None:
        """The sha256 of an uploaded archive that a worker must check, if any."""
        return None

    def to_payload(self) -> JSON:
        """The event's facts as JSON: tuples become lists, datetimes ISO strings."""
        out: JSON = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, datetime):
                value = format_iso(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_payload(cls: type[E], payload: Mapping[str, Any]) -> E:
        """Rebuild the event from a payload already upcast to ``SCHEMA``."""
        values: dict[str, Any] = {}
        for name, is_time, default in _field_plan(cls):
            value = payload.get(name, default)  # a default: a field added in a later schema
            if value is dataclasses.MISSING:
                raise TypeError(f"a {cls.TYPE!r} payload lacks {name!r}")
            if is_time and isinstance(value, str):
                value = parse_timestamp(value)
            elif isinstance(value, list):
                value = tuple(value)
            values[name] = value
        # Made without the frozen dataclass's __init__, which sets each field
        # through object.__setattr__: every replay and rebuild decodes every event.
        event = object.__new__(cls)
        event.__dict__.update(values)
        return event


E = TypeVar("E", bound=DomainEvent)


_PLANS: dict[type[DomainEvent], tuple[tuple[str, bool, Any], ...]] = {}


def _field_plan(cls: type[DomainEvent]) -> tuple[tuple[str, bool, Any], ...]:
    # Decoding runs once per event on every replay: look the fields up once per class.
    plan = _PLANS.get(cls)
    if plan is None:
        fields = dataclasses.fields(cls)
        if any(f.default_factory is not dataclasses.MISSING for f in fields):
            raise TypeError(f"{cls.__name__}: an event's fields take plain defaults")
        plan = _PLANS[cls] = tuple((f.name, f.type in ("datetime", "datetime | None"), f.default) for f in fields)
    return plan


@dataclass(frozen=True)
class StudentEvent(DomainEvent):
    """An action on one student's work; it lives in that student's stream."""

    student_id: str

    def stream(self) -> str:
        return student_stream(self.org_id, self.course_id, self.assignment_id, self.student_id)


@dataclass(frozen=True)
class Released(DomainEvent):
    """An instructor released an assignment's archive to the course."""

    TYPE: ClassVar[str] = "released"
    notebooks: tuple[str, ...]
    archive_sha256: str
    archive_size: int
    #: The assignment's due date as the instructor's gradebook had it, if it had one.
    due_date: datetime | None = None

    def archive(self) -> str | None:
        return self.archive_sha256


@dataclass(frozen=True)
class Unreleased(DomainEvent):
    """An instructor withdrew an assignment; a purge names the archives it removed."""

    TYPE: ClassVar[str] = "unreleased"
    purge: bool = False
    purged_archives: tuple[str, ...] = ()


@dataclass(frozen=True)
class DueDateSet(DomainEvent):
    """An instructor set (or, with ``None``, removed) the assignment's due date for everyone."""

    TYPE: ClassVar[str] = "due_date_set"
    due_date: datetime | None


@dataclass(frozen=True)
class ExtensionGranted(StudentEvent):
    """An instructor gave one student a due date of their own, replacing any earlier extension."""

    TYPE: ClassVar[str] = "extension_granted"
    due_date: datetime


@dataclass(frozen=True)
class Fetched(StudentEvent):
    """A member downloaded the released archive."""

    TYPE: ClassVar[str] = "fetched"
    release_position: int
    archive_sha256: str


@dataclass(frozen=True)
class Submitted(StudentEvent):
    """A student submitted an archive; ``timestamp`` is the client's own."""

    TYPE: ClassVar[str] = "submitted"
    timestamp: datetime
    archive_sha256: str
    archive_size: int
    notebooks: tuple[str, ...] = ()

    def archive(self) -> str | None:
        return self.archive_sha256


@dataclass(frozen=True)
class Collected(StudentEvent):
    """An instructor downloaded one submission."""

    TYPE: ClassVar[str] = "collected"
    submission_position: int
    archive_sha256: str


@dataclass(frozen=True)
class FeedbackReleased(StudentEvent):
    """An instructor released feedback on one notebook of one submission."""

    TYPE: ClassVar[str] = "feedback_released"
    notebook_id: str
    timestamp: datetime
    checksum: str
    feedback_sha256: str
    feedback_size: int


@dataclass(frozen=True)
class FeedbackFetched(StudentEvent):
    """A student downloaded their feedback; names the feedback events fetched."""

    TYPE: ClassVar[str] = "feedback_fetched"
    feedback_positions: tuple[int, ...] = ()


@dataclass(frozen=True)
class ArchiveOutcome(DomainEvent):
    """What a worker made of the archive named by the event at ``source_position``.

    Each check has a stream of its own, so that a worker's outcome never
    moves the version an instructor's next release expects.
    """

    source_position: int
    archive_sha256: str
    student_id: str | None = field(default=None, kw_only=True)

    def stream(self) -> str:
        return check_stream(self.org_id, self.course_id, self.assignment_id, self.source_position)


@dataclass(frozen=True)
class ArchiveUnpacked(ArchiveOutcome):
    """The archive is safe to unpack (checked in one read, never unpacked by the exchange); what it holds."""

    TYPE: ClassVar[str] = "archive_unpacked"
    members: int
    total_size: int
    notebooks: tuple[str, ...] = ()


@dataclass(frozen=True)
class ArchiveRejected(ArchiveOutcome):
    """The archive breaks the unpacking rules; its bytes stay stored for an auditor."""

    TYPE: ClassVar[str] = "archive_rejected"
    reason: str


EVENT_TYPES: dict[str, type[DomainEvent]] = {
    cls.TYPE: cls
    for cls in (
        Released,
        Unreleased,
        DueDateSet,
        ExtensionGranted,
        Fetched,
        Submitted,
        Collected,
        FeedbackReleased,
        FeedbackFetched,
        ArchiveUnpacked,
        ArchiveRejected,
    )
}

Upcaster = Callable[[JSON], JSON]


@dataclass
class Upcasters:
    """Payload upgrades: ``(type, schema) -> function`` lifting a payload one schema up.

    Events are never rewritten in the log; an old payload is lifted each time
    it is read, one schema at a time, until it reaches the class's ``SCHEMA``.
    """

    steps: dict[tuple[str, int], Upcaster] = field(default_factory=dict)

    def register(self, type_: str, from_schema: int) -> Callable[[Upcaster], Upcaster]:
        """Decorator: register the step from ``from_schema`` to ``from_schema + 1``."""

        def decorate(fn: Upcaster) -> Upcaster:
            self.steps[(type_, from_schema)] = fn
            return fn

        return decorate

    def upcast(self, type_: str, schema: int, payload: Mapping[str, Any]) -> JSON:
        """Lift ``payload`` from ``schema`` to the current schema of ``type_``."""
        target = EVENT_TYPES[type_].SCHEMA
        data = dict(payload)
        while schema < target:
            try:
                step = self.steps[(type_, schema)]
            except KeyError:
                raise ValueError(f"no upcaster for {type_!r} schema {schema}") from None
            data = step(data)
            schema += 1
        if schema > target:
            raise ValueError(f"{type_!r} schema {schema} is newer than this code ({target})")
        return data


UPCASTERS = Upcasters()


def decode(
    type_: str,
    schema: int,
    payload: Mapping[str, Any],
    upcasters: Upcasters = UPCASTERS,
) -> DomainEvent:
    """Turn a stored payload of any known schema into its domain event."""
    try:
        cls = EVENT_TYPES[type_]
    except KeyError:
        raise ValueError(f"unknown event type {type_!r}") from None
    return cls.from_payload(upcasters.upcast(type_, schema, payload))
