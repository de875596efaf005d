"""Group commit: many concurrent appends share one transaction and one fsync."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future

from nbexchange.errors import ExchangeError, Unavailable
from nbexchange.events.store import Appended, AppendRequest, EventStore, RecordedEvent

log = logging.getLogger(__name__)

_STOP = object()


class GroupCommitter:
    """Appends from many threads, committed in batches by one thread.

    A caller blocks until its own event is committed (or refused), exactly as
    with a direct append; while one batch commits, the next one gathers. On a
    disk where an fsync costs milliseconds this is what keeps the accept path
    fast under a burst. ``on_commit`` receives the newly stored events (not
    duplicates) after each commit, to wake the workers.
    """

    def __init__(
        self,
        store: EventStore,
        on_commit: Callable[[Sequence[RecordedEvent]], None] = lambda events: None,
        max_batch: int = 256,
    ) -> None:
        self.store = store
        self.on_commit = on_commit
        self.max_batch = max_batch
        self._queue: queue.Queue[object] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="nbexchange-committer", daemon=True)
        self._thread.start()

    def append(self, request: AppendRequest, timeout: float | None = 120.0) -> Appended:
        """Append one event through the next batch; raises what the store raised for it."""
        future: Future[Appended] = Future()
        self._queue.put((request, future))
        return future.result(timeout=timeout)

    def append_batch(
        self, requests: Sequence[AppendRequest], timeout: float | None = 120.0
    ) -> list[Appended | ExchangeError]:
        """Append several events through the next batch (as one, unless it fills); each fails or succeeds alone."""
        futures: list[Future[Appended]] = []
        for request in requests:
            futures.append(Future())
            self._queue.put((request, futures[-1]))
        outcomes: list[Appended | ExchangeError] = []
        for future in futures:
            try:
                outcomes.append(future.result(timeout=timeout))
            except ExchangeError as e:
                if isinstance(e, Unavailable):
                    raise
                outcomes.append(e)
        return outcomes

    def close(self) -> None:
        """Commit what is queued, then stop the thread."""
        self._queue.put(_STOP)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            batch = [item]
            stopping = False
            while len(batch) < self.max_batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    stopping = True
                    break
                batch.append(more)
            self._commit(batch)  # type: ignore[arg-type]
            if stopping:
                return

    def _commit(self, batch: list[tuple[AppendRequest, Future[Appended]]]) -> None:
        try:
            outcomes = self.store.append_batch([request for request, _ in batch])
        except ExchangeError as e:
            for _, future in batch:
                future.set_exception(e)
            return
        except Exception as e:  # the store translates what it knows; anything else is an outage
            log.exception("Append batch of %d failed", len(batch))
            for _, future in batch:
                future.set_exception(Unavailable("The log could not be written; retry shortly."))
            del e
            return
        fresh: list[RecordedEvent] = []
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, ExchangeError):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
                if not outcome.duplicate:
                    fresh.append(outcome.event)
        if fresh:
            try:
                self.on_commit(fresh)
            except Exception:
                # Committed is committed: a failed wake-up only delays the
                # workers until their next sweep.
                log.exception("Waking the workers after commit failed")
