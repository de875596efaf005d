"""Read model: every action in a course, for the history route."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from nbexchange.db import POSITION, Moment, metadata
from nbexchange.events.domain import StudentEvent
from nbexchange.events.store import RecordedEvent
from nbexchange.projections.base import Rows

history = sa.Table(
    "proj_history",
    metadata,
    sa.Column("position", POSITION, primary_key=True, autoincrement=False),
    sa.Column("org_id", sa.Integer, nullable=False),
    sa.Column("course_id", sa.String(255), nullable=False),
    sa.Column("assignment_id", sa.String(255), nullable=False),
    sa.Column("action", sa.String(32), nullable=False),
    sa.Column("actor", sa.String(255), nullable=False),
    sa.Column("role", sa.String(32), nullable=False),
    sa.Column("student_id", sa.String(255), nullable=True),
    sa.Column("recorded_at", Moment, nullable=False),
    sa.Column("details", sa.Text, nullable=False),
    # A course's history is read in order from it, never sorted.
    sa.Index("ix_proj_history_course", "org_id", "course_id", "position"),
)

#: Payload fields worth showing in a history line; the rest is in the log.
_DETAILS = (
    "timestamp",
    "notebooks",
    "notebook_id",
    "archive_sha256",
    "reason",
    "purge",
    "source_position",
)


class HistoryProjection:
    """One row per event, with the facts a person reads in a history."""

    def __init__(self, name: str = "history", tables: Sequence[sa.Table] = (history,)) -> None:
        self.name = name
        self.tables = tuple(tables)
        (self._history,) = self.tables

    def into(self, name: str, tables: Sequence[sa.Table]) -> HistoryProjection:
        return HistoryProjection(name, tables)

    def apply(self, rows: Rows, event: RecordedEvent) -> None:
        data = event.data
        student = data.student_id if isinstance(data, StudentEvent) else event.payload.get("student_id")
        rows.insert(
            self._history,
            {
                "position": event.position,
                "org_id": data.org_id,
                "course_id": data.course_id,
                "assignment_id": data.assignment_id,
                "action": event.type,
                "actor": event.actor.name,
                "role": event.actor.role,
                "student_id": student,
                "recorded_at": event.recorded_at,
                "details": orjson.dumps({k: event.payload[k] for k in _DETAILS if k in event.payload}).decode(),
            },
        )


def course_history(
    conn: Connection,
    org_id: int,
    course_ids: list[str],
    *,
    user_id: str | None = None,
    action: str | None = None,
) -> list[dict[str, Any]]:
    """Rows of the given courses, oldest first; ``user_id`` keeps that user's own and releases."""
    query = sa.select(history).where(history.c.org_id == org_id, history.c.course_id.in_(course_ids))
    if user_id is not None:
        query = query.where(
            sa.or_(
                history.c.actor == user_id,
                history.c.student_id == user_id,
                history.c.action.in_(["released", "unreleased"]),
            )
        )
    if action is not None:
        query = query.where(history.c.action == action)
    out = []
    for row in conn.execute(query.order_by(history.c.position)):
        item = dict(row._mapping)
        item["details"] = orjson.loads(item["details"])
        out.append(item)
    return out
