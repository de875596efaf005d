"""What one exchange process runs on, built from the settings: database, log, archives, queue."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from nbexchange.committer import GroupCommitter
from nbexchange.db import make_engine, upgrade, wait_until_reachable
from nbexchange.events.sql import SQLEventStore
from nbexchange.events.store import RecordedEvent
from nbexchange.metrics import count_appended
from nbexchange.storage import open_archive_store
from nbexchange.workers.app import FOLLOW_POLL, Dispatcher, Projector, make_celery
from nbexchange.workers.archives import ArchiveLimits

if TYPE_CHECKING:
    from nbexchange.app import NbExchange

log = logging.getLogger(__name__)

#: Seconds a process that migrates on start waits for its database to answer before it gives up.
DATABASE_WAIT = 60.0
#: Seconds after bytes of an upload last arrived during which a process still counts as receiving uploads.
UPLOAD_GAP = 1.0


class Runtime:
    """The shared parts of one API or worker process, built once from the settings.

    It is also the context the Celery tasks run against: the same object in
    the embedded default (worker thread) and in a ``nbexchange worker`` process.
    """

    def __init__(self, settings: NbExchange, *, follow_log: bool = False) -> None:
        self.engine = make_engine(settings.db_url, settings.db_dead_client_timeout)
        if settings.upgrade_db:
            wait_until_reachable(self.engine, DATABASE_WAIT)
            upgrade(self.engine)
        self.store = SQLEventStore(self.engine)
        self.archives = open_archive_store(settings)
        self.limits = ArchiveLimits(
            max_members=settings.archive_max_members,
            max_total_size=settings.archive_max_total_size,
            max_ratio=settings.archive_max_ratio,
        )
        self.sweep_grace = settings.sweep_grace
        self.blob_grace = settings.blob_grace
        self.collect_interval = settings.collect_interval
        self._next_collection = time.monotonic()
        self.broker_url = settings.broker_url
        self.celery = make_celery(
            self,
            settings.broker_url,
            settings.queue_name,
            queue_type=settings.queue_type,
            confirm_timeout=settings.publish_confirm_timeout,
            # A process that follows the log is a worker process, whose Celery worker consumes.
            sends_only=not follow_log,
        )
        # When bytes of an upload last arrived at this process, kept by the
        # API's upload handlers on the event loop. A worker process never
        # receives any.
        self._upload_bytes_at = -math.inf
        # Catch-up has a thread of its own, so readers never wait behind
        # archive checks: woken after each commit in the embedded default,
        # following the log in a worker process (``follow_log``). Where
        # workers share this process's CPUs (always when embedded), check
        # messages wait while it receives uploads.
        self.projector: Projector | None = None
        if follow_log:
            self.projector = Projector(self, poll=FOLLOW_POLL)
        elif settings.embedded:
            self.projector = Projector(self)
        hold = settings.check_hold_seconds
        self.dispatcher = Dispatcher(
            self.celery,
            hold_checks=self.receiving_uploads if hold > 0 else None,
            hold_max=hold,
            catch_up=self.projector.wake if self.projector else None,
            confirm_timeout=settings.publish_confirm_timeout or None,
        )
        self.committer = GroupCommitter(self.store, on_commit=self._on_commit, max_batch=settings.group_commit_max)
        # Appends go through the group committer in API and worker processes alike.
        self.appender = self.committer

    def _on_commit(self, events: Sequence[RecordedEvent]) -> None:
        count_appended(events)
        self.dispatcher(events)

    def upload_started(self) -> None:
        """An upload's headers arrived (called on the event loop)."""
        self.upload_received()

    def upload_received(self) -> None:
        """Bytes of an upload's body arrived (called on the event loop, for each chunk)."""
        self._upload_bytes_at = time.monotonic()

    def upload_ended(self) -> None:
        """An upload's body arrived whole, or its connection closed (called on the event loop)."""
        self.upload_received()

    def receiving_uploads(self) -> bool:
        """Whether this process is receiving uploads, which its own archive checks let go first.

        It is while bytes arrive, not while a connection is merely open: an
        upload that stalls (a student's laptop gone to sleep, a client that
        never sends the rest) must not hold every check back for the whole
        of ``check_defer_max``. A moment without bytes (``UPLOAD_GAP``
        seconds) still counts: in a burst, between two chunks or two
        uploads, the held checks would otherwise all go out at once.
        """
        return time.monotonic() - self._upload_bytes_at < UPLOAD_GAP

    def collection_due(self) -> bool:
        """Whether the blob collector's interval has passed since it last ran here (and start its next one)."""
        now = time.monotonic()
        if self.collect_interval <= 0 or now < self._next_collection:
            return False
        self._next_collection = now + self.collect_interval
        return True

    def queue_depth(self) -> int | None:
        """Messages waiting for a worker, or ``None`` if the broker cannot say."""
        try:
            with self.celery.connection_for_read() as conn:
                conn.ensure_connection(max_retries=1, timeout=2)
                declared = conn.default_channel.queue_declare(queue=self.celery.conf.task_default_queue, passive=True)
                return int(declared.message_count)
        except Exception:
            return None

    def broker_reachable(self) -> bool:
        """Whether the broker answers (the embedded one always does)."""
        try:
            with self.celery.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=2)
            return True
        except Exception:
            return False

    def close(self) -> None:
        """Commit and send what is pending, then release connections."""
        self.committer.close()
        self.dispatcher.close()
        if self.projector:
            self.projector.stop()
        self.engine.dispose()
