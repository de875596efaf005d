"""Read models built from the log: one module per projection, each with its checkpoint."""

from __future__ import annotations

from sqlalchemy.engine import Engine

from nbexchange.projections.assignments import AssignmentsProjection
from nbexchange.projections.base import (
    Projection,
    catch_up,
    catch_up_many,
    checkpoints,
    lag,
    rebuild,
    rebuild_many,
    replay,
    snapshot,
)
from nbexchange.projections.blobs import BlobsProjection
from nbexchange.projections.collections import CollectionsProjection
from nbexchange.projections.feedback import FeedbackProjection
from nbexchange.projections.history import HistoryProjection

#: Every read model, in the order they are caught up: those the API serves, and the blob collector's.
PROJECTIONS: tuple[Projection, ...] = (
    AssignmentsProjection(),
    CollectionsProjection(),
    FeedbackProjection(),
    HistoryProjection(),
    BlobsProjection(),
)

NAMES = tuple(p.name for p in PROJECTIONS)


def catch_up_all(engine: Engine, until: int | None = None) -> dict[str, int]:
    """Catch every projection up to the head of the log (or ``until``); returns their checkpoints."""
    return catch_up_many(engine, PROJECTIONS, until=until)


def rebuild_all(engine: Engine) -> dict[str, int]:
    """Rebuild every projection from position 0."""
    return rebuild_many(engine, PROJECTIONS)


__all__ = [
    "NAMES",
    "PROJECTIONS",
    "Projection",
    "catch_up",
    "catch_up_all",
    "catch_up_many",
    "checkpoints",
    "lag",
    "rebuild",
    "rebuild_all",
    "rebuild_many",
    "replay",
    "snapshot",
]
