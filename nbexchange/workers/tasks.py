"""What the workers do, as plain functions: check an archive, catch projections up, sweep the log."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any, Protocol

from sqlalchemy.engine import Engine

from nbexchange.clock import utcnow
from nbexchange.db import translate_errors, write_transaction
from nbexchange.errors import NotFound, UnsafeArchive, UnsupportedMedia
from nbexchange.events.domain import SYSTEM_ACTOR, ArchiveRejected, ArchiveUnpacked, DomainEvent, StudentEvent
from nbexchange.events.store import Appended, AppendRequest, EventStore, RecordedEvent
from nbexchange.projections import catch_up_all
from nbexchange.projections.base import checkpoint, lock_checkpoint, move_checkpoint
from nbexchange.storage import ArchiveStore
from nbexchange.workers.archives import ArchiveLimits, unpack_archive

log = logging.getLogger(__name__)

#: The checkpoint of the sweep that finds archives whose check message was lost.
SWEEP_CHECKPOINT = "archive-sweep"


class Appender(Protocol):
    """Anything that appends one event (the store itself, or a group committer)."""

    def append(self, request: AppendRequest) -> Appended: ...


class WorkerContext(Protocol):
    """What a task needs: the database, the log, the archives and the limits (read-only here)."""

    @property
    def engine(self) -> Engine: ...
    @property
    def store(self) -> EventStore: ...
    @property
    def appender(self) -> Appender: ...
    @property
    def archives(self) -> ArchiveStore: ...
    @property
    def limits(self) -> ArchiveLimits: ...
    @property
    def sweep_grace(self) -> float: ...

    def queue_depth(self) -> int | None:
        """Messages waiting for a worker, or ``None`` if the broker cannot say."""
        ...


def outcome_key(position: int) -> str:
    """The idempotency key of the check of the archive named at ``position``."""
    return f"archive-check/{position}"


def check_archive(ctx: WorkerContext, position: int) -> RecordedEvent | None:
    """Check and unpack the archive named by the event at ``position``; record the outcome once.

    Idempotent: a second run finds the outcome by its idempotency key and
    changes nothing. Returns the outcome event, or ``None`` if the event names
    no archive.
    """
    event = ctx.store.get(position)
    data = event.data
    sha = data.archive()
    if sha is None:
        return None
    done = ctx.store.by_idempotency_key(outcome_key(position))
    if done is not None:
        return done
    # Both outcomes name the same source, in the same stream as it.
    source: dict[str, Any] = {
        "org_id": data.org_id,
        "course_id": data.course_id,
        "assignment_id": data.assignment_id,
        "source_position": position,
        "archive_sha256": sha,
        "student_id": data.student_id if isinstance(data, StudentEvent) else None,
    }
    outcome: DomainEvent
    try:
        report = unpack_archive(ctx.archives.path(sha), ctx.archives.extracted_path(sha), ctx.limits)
        outcome = ArchiveUnpacked(
            **source, members=report.members, total_size=report.total_size, notebooks=report.notebooks
        )
    except (UnsafeArchive, UnsupportedMedia, NotFound) as e:
        log.warning("Archive %s of event %d rejected: %s", sha, position, e.note)
        outcome = ArchiveRejected(**source, reason=e.note)
    appended = ctx.appender.append(AppendRequest(outcome, SYSTEM_ACTOR, idempotency_key=outcome_key(position)))
    return appended.event


def catch_up(ctx: WorkerContext) -> dict[str, int]:
    """Bring every projection up to the head of the log."""
    return catch_up_all(ctx.engine)


def sweep(ctx: WorkerContext) -> int:
    """Check every archive whose check never happened (a lost message), then catch up.

    Runs on a worker's start and on a timer. Events younger than
    ``sweep_grace`` seconds are left to their own messages, and so are all
    archives while check messages wait in the queue (after a deadline's
    burst, the backlog can outlast the grace: the workers will come to those
    archives, and a sweep checking them too would unpack each twice). A lost
    message is still found: once the queue is empty, its archive is the
    sweep's. If the sweep does duplicate a check in flight, the idempotency
    key keeps the log unchanged. Returns the sweep's new checkpoint.
    """
    with translate_errors(), ctx.engine.connect() as conn:
        after = checkpoint(conn, SWEEP_CHECKPOINT)
    cutoff = utcnow() - timedelta(seconds=ctx.sweep_grace)
    backlog = bool(ctx.queue_depth())
    last = after
    try:
        for event in ctx.store.read(after=after):
            if event.recorded_at > cutoff:
                break
            if event.data.archive() is not None:
                if backlog:
                    break  # the queued checks come first; the next sweep looks again
                check_archive(ctx, event.position)
            last = event.position
    except Exception:
        # The checkpoint stays before the event that failed, so the next
        # sweep tries it again; the projections still catch up below.
        log.exception("Sweep stopped after position %d; it will retry from there", last)
    if last > after:
        _advance(ctx.engine, SWEEP_CHECKPOINT, last)
    catch_up(ctx)
    return last


def _advance(engine: Engine, name: str, position: int) -> None:
    # Two sweepers may race; the checkpoint only ever moves forward. Losing
    # the move to a power cut only means sweeping those events again.
    with write_transaction(engine, durable=False) as conn:
        if position > lock_checkpoint(conn, name):
            move_checkpoint(conn, name, position)
