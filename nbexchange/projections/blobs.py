"""Read model: which stored blobs the log still needs, row per event that owns one."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from nbexchange.db import POSITION, metadata
from nbexchange.events.domain import DomainEvent, FeedbackReleased, Released, Submitted, Unreleased
from nbexchange.events.store import RecordedEvent
from nbexchange.projections.base import USED_BY_APPLY, Rows

#: What owns a blob: a release (until a purge of its assignment), a submission, or feedback (for ever).
RELEASED, SUBMITTED, FEEDBACK = "released", "submitted", "feedback"

blob_refs = sa.Table(
    "proj_blob_refs",
    metadata,
    sa.Column("position", POSITION, primary_key=True, autoincrement=False),
    sa.Column("sha256", sa.String(64), nullable=False, index=True),
    sa.Column("org_id", sa.Integer, nullable=False),
    sa.Column("course_id", sa.String(255), nullable=False),
    sa.Column("assignment_id", sa.String(255), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    # ``apply`` finds the releases a purge disowns through it.
    sa.Index(
        "ix_proj_blob_refs_assignment", "org_id", "course_id", "assignment_id", "kind", info={USED_BY_APPLY: True}
    ),
)


def owned_blob(data: DomainEvent) -> tuple[str, str] | None:
    """The blob an event owns and how (``RELEASED``, ``SUBMITTED``, ``FEEDBACK``), if it owns one.

    Downloads (``fetched``, ``collected``) and archive checks name blobs
    others own; only these three keep one stored.
    """
    if isinstance(data, Released):
        return data.archive_sha256, RELEASED
    if isinstance(data, Submitted):
        return data.archive_sha256, SUBMITTED
    if isinstance(data, FeedbackReleased):
        return data.feedback_sha256, FEEDBACK
    return None


class BlobsProjection:
    """Every blob an event still owns: the blob collector removes only those no row names.

    A purge (``unreleased`` with ``purge``) disowns its assignment's earlier
    releases; a submission of the same bytes still owns them.
    """

    def __init__(self, name: str = "blobs", tables: Sequence[sa.Table] = (blob_refs,)) -> None:
        self.name = name
        self.tables = tuple(tables)
        (self._refs,) = self.tables
        table = self._refs
        self._purged = table.delete().where(
            table.c.org_id == sa.bindparam("org"),
            table.c.course_id == sa.bindparam("course"),
            table.c.assignment_id == sa.bindparam("assignment"),
            table.c.kind == RELEASED,
        )

    def into(self, name: str, tables: Sequence[sa.Table]) -> BlobsProjection:
        return BlobsProjection(name, tables)

    def apply(self, rows: Rows, event: RecordedEvent) -> None:
        data = event.data
        owned = owned_blob(data)
        if owned is not None:
            sha256, kind = owned
            rows.insert(
                self._refs,
                {
                    "position": event.position,
                    "sha256": sha256,
                    "org_id": data.org_id,
                    "course_id": data.course_id,
                    "assignment_id": data.assignment_id,
                    "kind": kind,
                },
            )
        elif isinstance(data, Unreleased) and data.purge:
            rows.write(self._purged, {"org": data.org_id, "course": data.course_id, "assignment": data.assignment_id})


def owned(conn: Connection, candidates: Iterable[str]) -> set[str]:
    """Which of ``candidates`` (sha256 digests) some event still owns."""
    wanted = list(candidates)
    found: set[str] = set()
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        found.update(conn.execute(sa.select(blob_refs.c.sha256).where(blob_refs.c.sha256.in_(chunk))).scalars())
    return found
