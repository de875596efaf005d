"""A timer thread that runs one piece of work now and then every ``interval`` seconds until stopped."""

from __future__ import annotations

import logging
import sys
import threading
from typing import Protocol

from nbexchange.errors import Unavailable

log = logging.getLogger(__name__)


def log_failure(logger: logging.Logger, message: str, *args: object) -> None:
    """Log the exception being handled by background work that will try again: a service the exchange
    depends on being away (``Unavailable``, already explained by its note) in one line, anything else,
    which nobody expected, with its traceback."""
    error = sys.exc_info()[1]
    if isinstance(error, Unavailable):
        logger.warning(message + " (%s)", *args, error.note)
    else:
        logger.exception(message, *args)


class Outage(Protocol):
    """What a failing run reports to (the workers' ``OutageLog``: once when it begins, once when it ends)."""

    def failed(self, error: BaseException) -> None: ...

    def worked(self) -> None: ...


class Periodic:
    """Runs :meth:`tick` on start, then every ``interval`` seconds; :meth:`stop` waits for the current run.

    A failing run is reported to ``outage`` (else logged) and tried again at
    the next interval: the work (a sweep, an anchor) depends on a database or
    a place that may be away.
    """

    def __init__(self, name: str, interval: float, outage: Outage | None = None) -> None:
        self.interval = interval
        self.outage = outage
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def tick(self) -> None:
        """One run of the work."""
        raise NotImplementedError

    def start(self) -> None:
        """Start running in the background."""
        self._thread.start()

    def stop(self) -> None:
        """Stop after the current run."""
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as e:
                if self.outage is None:
                    log_failure(log, "%s failed; trying again in %s s", self._thread.name, self.interval)
                else:
                    self.outage.failed(e)
            else:
                if self.outage is not None:
                    self.outage.worked()
            self._stop.wait(self.interval)
