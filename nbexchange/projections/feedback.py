"""Read model: the feedback released to each student, per submission and notebook."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from nbexchange.db import POSITION, Moment, metadata
from nbexchange.events.domain import FeedbackFetched, FeedbackReleased
from nbexchange.events.store import RecordedEvent
from nbexchange.projections.base import USED_BY_APPLY, Rows

feedback = sa.Table(
    "proj_feedback",
    metadata,
    sa.Column("position", POSITION, primary_key=True, autoincrement=False),
    sa.Column("org_id", sa.Integer, nullable=False),
    sa.Column("course_id", sa.String(255), nullable=False),
    sa.Column("assignment_id", sa.String(255), nullable=False),
    sa.Column("student_id", sa.String(255), nullable=False),
    sa.Column("notebook_id", sa.String(255), nullable=False),
    sa.Column("timestamp", Moment, nullable=False),
    sa.Column("checksum", sa.String(255), nullable=False),
    sa.Column("feedback_sha256", sa.String(64), nullable=False),
    sa.Column("released_by", sa.String(255), nullable=False),
    sa.Column("released_at", Moment, nullable=False),
    sa.Column("fetched_at", Moment, nullable=True),
    # ``apply`` finds the feedback a new release replaces through it. Lists read
    # their rows in order from these, never sorting them.
    sa.Index(
        "ix_proj_feedback_student",
        "org_id",
        "course_id",
        "assignment_id",
        "student_id",
        "position",
        info={USED_BY_APPLY: True},
    ),
    sa.Index("ix_proj_feedback_listed", "org_id", "course_id", "assignment_id", "position"),
)


class FeedbackProjection:
    """The current feedback file for each (student, submission timestamp, notebook)."""

    def __init__(self, name: str = "feedback", tables: Sequence[sa.Table] = (feedback,)) -> None:
        self.name = name
        self.tables = tuple(tables)
        (self._feedback,) = self.tables
        table = self._feedback
        self._replaced = table.delete().where(
            table.c.org_id == sa.bindparam("org"),
            table.c.course_id == sa.bindparam("course"),
            table.c.assignment_id == sa.bindparam("assignment"),
            table.c.student_id == sa.bindparam("student"),
            table.c.notebook_id == sa.bindparam("notebook"),
            table.c.timestamp == sa.bindparam("stamp"),
        )
        self._fetched = (
            table.update().where(table.c.position == sa.bindparam("source")).values(fetched_at=sa.bindparam("at"))
        )

    def into(self, name: str, tables: Sequence[sa.Table]) -> FeedbackProjection:
        return FeedbackProjection(name, tables)

    def apply(self, rows: Rows, event: RecordedEvent) -> None:
        data = event.data
        if isinstance(data, FeedbackReleased):
            # Releasing feedback again for the same notebook of the same
            # submission replaces it; the log keeps both.
            rows.write(
                self._replaced,
                {
                    "org": data.org_id,
                    "course": data.course_id,
                    "assignment": data.assignment_id,
                    "student": data.student_id,
                    "notebook": data.notebook_id,
                    "stamp": data.timestamp,
                },
            )
            rows.insert(
                self._feedback,
                {
                    "position": event.position,
                    "org_id": data.org_id,
                    "course_id": data.course_id,
                    "assignment_id": data.assignment_id,
                    "student_id": data.student_id,
                    "notebook_id": data.notebook_id,
                    "timestamp": data.timestamp,
                    "checksum": data.checksum,
                    "feedback_sha256": data.feedback_sha256,
                    "released_by": event.actor.name,
                    "released_at": event.recorded_at,
                    "fetched_at": None,
                },
            )
        elif isinstance(data, FeedbackFetched):
            for position in data.feedback_positions:
                rows.write(self._fetched, {"source": position, "at": event.recorded_at})


def student_feedback(
    conn: Connection, org_id: int, course_id: str, assignment_id: str, student_id: str | None
) -> list[dict[str, Any]]:
    """A student's current feedback on an assignment (every student's, for ``None``), oldest first."""
    query = sa.select(feedback).where(
        feedback.c.org_id == org_id,
        feedback.c.course_id == course_id,
        feedback.c.assignment_id == assignment_id,
    )
    if student_id is not None:
        query = query.where(feedback.c.student_id == student_id)
    rows = conn.execute(query.order_by(feedback.c.position))
    out = []
    for row in rows:
        out.append(dict(row._mapping))
    return out
