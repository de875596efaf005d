"""The action log: event types, the append-only store and its verification."""

from nbexchange.events.domain import (
    Actor,
    ArchiveRejected,
    ArchiveUnpacked,
    Collected,
    DomainEvent,
    FeedbackFetched,
    FeedbackReleased,
    Fetched,
    Released,
    Submitted,
    Unreleased,
    assignment_stream,
    student_stream,
)
from nbexchange.events.store import (
    AppendRequest,
    EventStore,
    RecordedEvent,
    VerifyReport,
)

__all__ = [
    "Actor",
    "AppendRequest",
    "ArchiveRejected",
    "ArchiveUnpacked",
    "Collected",
    "DomainEvent",
    "EventStore",
    "FeedbackFetched",
    "FeedbackReleased",
    "Fetched",
    "RecordedEvent",
    "Released",
    "Submitted",
    "Unreleased",
    "VerifyReport",
    "assignment_stream",
    "student_stream",
]
