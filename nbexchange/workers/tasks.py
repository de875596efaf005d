"""What the workers do, as plain functions: check an archive, catch projections up, sweep the log."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

from sqlalchemy.engine import Engine

from nbexchange.clock import utcnow
from nbexchange.db import translate_errors, write_transaction
from nbexchange.errors import BlobCorrupt, ExchangeError, NotFound, Unavailable, UnsafeArchive, UnsupportedMedia
from nbexchange.events.domain import SYSTEM_ACTOR, ArchiveRejected, ArchiveUnpacked, DomainEvent, StudentEvent
from nbexchange.events.store import Appended, AppendRequest, EventStore, RecordedEvent
from nbexchange.periodic import log_failure
from nbexchange.projections import catch_up_all
from nbexchange.projections.base import checkpoint, lock_checkpoint, move_checkpoint
from nbexchange.projections.blobs import BlobsProjection, owned
from nbexchange.storage import ArchiveStore, HashingReader
from nbexchange.workers.archives import ArchiveLimits, inspect_archive

log = logging.getLogger(__name__)

#: The checkpoint of the sweep that finds archives whose check message was lost.
SWEEP_CHECKPOINT = "archive-sweep"
#: Archives the sweep checks together: one read of their events, one of the
#: outcomes already recorded, one commit of the new ones. After a burst every
#: archive in it is already checked, so this is what a sweep of it costs.
SWEEP_BATCH = 500
#: The read model the blob collector decides on.
BLOBS = BlobsProjection().name


class Appender(Protocol):
    """Anything that appends events (the store itself, or a group committer)."""

    def append(self, request: AppendRequest) -> Appended: ...

    def append_batch(self, requests: Sequence[AppendRequest]) -> list[Appended | ExchangeError]: ...


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
    @property
    def blob_grace(self) -> float: ...

    def collection_due(self) -> bool:
        """Whether the blob collector's interval has passed since it last ran here (and start its next one)."""
        ...

    def queue_depth(self) -> int | None:
        """Messages waiting for a worker, or ``None`` if the broker cannot say."""
        ...


def outcome_key(position: int) -> str:
    """The idempotency key of the check of the archive named at ``position``."""
    return f"archive-check/{position}"


def check_archive(ctx: WorkerContext, position: int) -> RecordedEvent | None:
    """Check the archive named by the event at ``position``; record the outcome once.

    Returns the outcome event, or ``None`` if the event names no archive.
    """
    return check_archives(ctx, [position]).get(position)


def check_archives(ctx: WorkerContext, positions: Sequence[int]) -> dict[int, RecordedEvent]:
    """Check the archives named by the events at ``positions``, each read once; record each outcome once.

    One query reads the events, one finds the outcomes already recorded, and
    the new outcomes are appended together (one commit). Idempotent: a second
    run finds the outcomes by their idempotency keys and changes nothing.
    Returns each archive's outcome event by its source position (events that
    name no archive have none). An unexpected failure (the store's disk, the
    database) records the outcomes decided before it, then is raised.
    """
    events = ctx.store.get_many(positions)
    missing = sorted(set(positions) - set(events))
    if missing:
        raise NotFound(f"There is no event at positions {missing}.")
    named = {p: e for p, e in events.items() if e.data.archive() is not None}
    done = ctx.store.by_idempotency_keys([outcome_key(p) for p in named])
    outcomes = {p: done[outcome_key(p)] for p in named if outcome_key(p) in done}
    decided: dict[int, DomainEvent] = {}
    try:
        for position in sorted(set(named) - set(outcomes)):
            decided[position] = _check(ctx, named[position])
    except Exception:
        _record(ctx, decided)  # what was decided before the failure stands
        raise
    outcomes.update(_record(ctx, decided))
    return outcomes


def _record(ctx: WorkerContext, decided: dict[int, DomainEvent]) -> dict[int, RecordedEvent]:
    """Append the outcomes (by source position) together; the recorded events, by source position."""
    positions = list(decided)
    requests = [AppendRequest(decided[p], SYSTEM_ACTOR, idempotency_key=outcome_key(p)) for p in positions]
    recorded: dict[int, RecordedEvent] = {}
    for position, appended in zip(positions, ctx.appender.append_batch(requests), strict=True):
        if isinstance(appended, ExchangeError):
            raise appended
        recorded[position] = appended.event
    return recorded


def _check(ctx: WorkerContext, event: RecordedEvent) -> DomainEvent:
    """The outcome of checking the archive ``event`` names: safe (and what it holds), or rejected and why."""
    data = event.data
    sha = data.archive()
    assert sha is not None
    # Both outcomes name the same source, in the same stream as it.
    source: dict[str, Any] = {
        "org_id": data.org_id,
        "course_id": data.course_id,
        "assignment_id": data.assignment_id,
        "source_position": event.position,
        "archive_sha256": sha,
        "student_id": data.student_id if isinstance(data, StudentEvent) else None,
    }
    try:
        with ctx.archives.open(sha) as stored:
            reading = HashingReader(stored)
            try:
                report = inspect_archive(reading, ctx.limits)
            except (UnsafeArchive, UnsupportedMedia):
                # Bytes the store changed would be refused as well: say what happened to them, not what they became.
                _raise_if_changed(reading, sha)
                raise
            _raise_if_changed(reading, sha)
    except (UnsafeArchive, UnsupportedMedia, NotFound, BlobCorrupt) as e:
        log.warning("Archive %s of event %d rejected: %s", sha, event.position, e.note)
        return ArchiveRejected(**source, reason=e.note)
    return ArchiveUnpacked(**source, members=report.members, total_size=report.total_size, notebooks=report.notebooks)


def _raise_if_changed(reading: HashingReader, sha: str) -> None:
    """``BlobCorrupt`` if the stored bytes (the rest read now) do not hash to ``sha``, their name in the store."""
    if reading.hexdigest() != sha:
        raise BlobCorrupt(sha)


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
    # The queued checks come first; the next sweep looks again.
    backlog = bool(ctx.queue_depth())
    last = seen = after
    named: list[int] = []
    try:
        # recorded_at never runs backwards along the log, so the events older than the grace are
        # a prefix of what follows the checkpoint: the database reads no younger ones (in a burst,
        # pages of them were read to be dropped).
        for event in () if backlog else ctx.store.read(after=after, until_time=cutoff):
            if event.data.archive() is not None:
                named.append(event.position)
            seen = event.position
            if len(named) == SWEEP_BATCH:
                check_archives(ctx, named)
                named, last = [], seen
        if named:
            check_archives(ctx, named)
        last = seen
    except Exception:
        # The checkpoint stays before the batch that failed, so the next
        # sweep tries it again (what the batch did record is found by its
        # idempotency keys); the projections still catch up below.
        log_failure(log, "Sweep stopped after position %d; it will retry from there", last)
    if last > after:
        _advance(ctx.engine, SWEEP_CHECKPOINT, last)
    catch_up(ctx)
    if ctx.collection_due():
        try:
            collect(ctx)
        except Exception:
            log_failure(log, "Blob collection failed; it runs again at its next interval")
    return last


@dataclass(frozen=True)
class Collection:
    """What one run of the blob collector removed."""

    position: int
    blobs: tuple[str, ...]
    leftovers: tuple[str, ...]


def collect(ctx: WorkerContext, grace: float | None = None) -> Collection:
    """Remove the blobs no committed event owns, and what crashes left behind, older than ``grace`` seconds.

    The blobs read model is first brought to the log's head: a blob is
    removed only if no event up to that position owns it (a purge disowns a
    release's archive; a submission or feedback owns its bytes for ever),
    and only once it is older than the grace, which must exceed the time an
    upload takes from being stored to its event's commit. Safe to run in
    several processes at once.
    """
    grace = ctx.blob_grace if grace is None else grace
    cutoff = time.time() - grace
    head = ctx.store.head()
    if catch_up_all(ctx.engine, until=head).get(BLOBS, 0) < head:
        raise Unavailable("The blobs read model did not reach the log's head; nothing was collected.")
    candidates = [sha for sha, stored_at in ctx.archives.blobs() if stored_at < cutoff]
    with translate_errors(), ctx.engine.connect() as conn:
        kept = owned(conn, candidates)
    removed = tuple(sha for sha in candidates if sha not in kept and ctx.archives.collect(sha, cutoff))
    leftovers = ctx.archives.remove_leftovers(cutoff)
    if removed or leftovers:
        log.info(
            "Collected %d blob(s) no event owns and %d leftover(s) older than %.0f s (log at %d)",
            len(removed),
            len(leftovers),
            grace,
            head,
        )
    return Collection(head, removed, tuple(leftovers))


def _advance(engine: Engine, name: str, position: int) -> None:
    # Two sweepers may race; the checkpoint only ever moves forward. Losing
    # the move to a power cut only means sweeping those events again.
    with write_transaction(engine, durable=False) as conn:
        if position > lock_checkpoint(conn, name):
            move_checkpoint(conn, name, position)
