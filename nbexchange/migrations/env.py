"""Alembic environment: migrations run on the connection handed over by ``nbexchange.db.upgrade``."""

from __future__ import annotations

from alembic import context

import nbexchange.events.sql  # noqa: F401  (registers the log's table)
import nbexchange.projections  # noqa: F401  (registers the projections' tables)
from nbexchange.db import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("Run migrations through `nbexchange upgrade-db` (nbexchange.db.upgrade).")

context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
