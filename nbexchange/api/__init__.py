"""The HTTP API: one module per REST resource, each ending with its ``(route, Handler)`` pairs."""

from __future__ import annotations

from typing import Any

from nbexchange.api import (
    about,
    assignment,
    assignments,
    collections,
    deadlines,
    feedback,
    head,
    health,
    history,
    report,
    submission,
)

#: Every route, relative to ``base_url``.
default_handlers: list[tuple[str, Any]] = [
    *assignments.default_handlers,
    *assignment.default_handlers,
    *deadlines.default_handlers,
    *submission.default_handlers,
    *collections.default_handlers,
    *feedback.default_handlers,
    *history.default_handlers,
    *health.default_handlers,
    *head.default_handlers,
    *report.default_handlers,
    *about.default_handlers,
]
