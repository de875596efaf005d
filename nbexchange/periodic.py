"""A timer thread that runs one piece of work now and then every ``interval`` seconds until stopped."""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)


class Periodic:
    """Runs :meth:`tick` on start, then every ``interval`` seconds; :meth:`stop` waits for the current run.

    A failing run is logged and tried again at the next interval: the work
    (a sweep, an anchor) depends on a database or a place that may be away.
    """

    def __init__(self, name: str, interval: float) -> None:
        self.interval = interval
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
            except Exception:
                log.exception("%s failed; trying again in %s s", self._thread.name, self.interval)
            self._stop.wait(self.interval)
