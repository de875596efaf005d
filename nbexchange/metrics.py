"""Prometheus metrics: request latency per route, events appended per type, queue depth, projection lag."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from nbexchange.events.store import RecordedEvent

REQUEST_LATENCY = Histogram(
    "nbexchange_request_duration_seconds",
    "Time to answer a request, by route, method and status.",
    ["route", "method", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)

EVENTS_APPENDED = Counter(
    "nbexchange_events_appended_total",
    "Events this process appended to the log, by type.",
    ["type"],
)


def count_appended(events: Sequence[RecordedEvent]) -> None:
    """Count freshly committed events by type."""
    for event in events:
        EVENTS_APPENDED.labels(event.type).inc()


class StateCollector(Collector):
    """Gauges read at scrape time: projection lag and queue depth."""

    def __init__(self, lag: Callable[[], int], queue_depth: Callable[[], int | None]) -> None:
        self._lag = lag
        self._queue_depth = queue_depth

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "nbexchange_projection_lag_events",
            "Events in the log that the slowest projection has not applied yet.",
            value=self._lag(),
        )
        depth = self._queue_depth()
        if depth is not None:
            yield GaugeMetricFamily(
                "nbexchange_queue_depth_messages", "Messages waiting in the workers' queue.", value=depth
            )
