"""The log's head, published and kept outside the exchange: what ``verify --anchors`` checks against."""

from __future__ import annotations

import json
import logging
import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from nbexchange.clock import format_iso, utcnow
from nbexchange.events.sql import SQLEventStore
from nbexchange.periodic import Periodic, log_failure

log = logging.getLogger(__name__)


def log_head(store: SQLEventStore) -> dict[str, Any]:
    """The last event's ``position``, ``hash`` and ``recorded_at`` (position 0 and no hash for an empty log)."""
    position = store.head()
    if not position:
        return {"position": 0, "hash": None, "recorded_at": None}
    event = store.get(position)  # a committed event never changes: no race with appends
    return {"position": event.position, "hash": event.hash, "recorded_at": format_iso(event.recorded_at)}


class HeadCollector(Collector):
    """The head in Prometheus: its position as a gauge, its hash as an info metric's label."""

    def __init__(self, store: SQLEventStore) -> None:
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily | InfoMetricFamily]:
        head = log_head(self.store)
        yield GaugeMetricFamily(
            "nbexchange_log_head_position", "The position of the last event in the log.", value=head["position"]
        )
        if head["hash"]:
            info = InfoMetricFamily("nbexchange_log_head", "The hash of the last event in the log.")
            info.add_metric([], {"position": str(head["position"]), "hash": head["hash"]})
            yield info


class Anchorer(Periodic):
    """Every ``interval`` seconds, appends a new head to a file and/or POSTs it to a URL.

    Each anchor is one JSON line ``{"position", "hash", "recorded_at",
    "anchored_at"}``, the format ``verify --anchors`` reads. A head already
    anchored is not sent again. The file is only ever appended to (make it
    append-only, ``chattr +a``, or keep it where the exchange's operators
    cannot edit it); a failure is logged and tried again at the next interval.
    """

    def __init__(self, store: SQLEventStore, interval: float, path: str = "", url: str = "") -> None:
        super().__init__("nbexchange-anchor", interval)
        self.store, self.path, self.url = store, path, url
        self._last = 0

    def tick(self) -> None:
        self.anchor()

    def stop(self) -> None:
        """Stop, then anchor the head one last time (the last events before a shutdown)."""
        super().stop()
        try:
            self.anchor()
        except Exception:
            log_failure(log, "Could not anchor the log's head at shutdown")

    def anchor(self) -> dict[str, Any] | None:
        """Anchor the current head if it moved since the last anchor; returns it, or None."""
        head = log_head(self.store)
        if head["position"] == self._last or not head["hash"]:
            return None
        head["anchored_at"] = format_iso(utcnow())
        line = json.dumps(head, sort_keys=True) + "\n"
        if self.path:
            append_line(Path(self.path), line)
        if self.url:
            request = urllib.request.Request(
                self.url, data=line.encode(), headers={"Content-Type": "application/json"}, method="POST"
            )
            with urllib.request.urlopen(request, timeout=30) as answer:
                answer.read()
        self._last = head["position"]
        log.info("Anchored the log's head: position %d, hash %s", head["position"], head["hash"])
        return head


def append_line(path: Path, line: str) -> None:
    """Append one line durably, never rewriting what the file holds (``O_APPEND``: one write, at the end)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
