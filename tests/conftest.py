"""Shared fixtures: a fresh database per test (SQLite or PostgreSQL) and a live exchange service.

The backend is chosen by the environment, as JupyterHub's suite does:

- ``NBEX_TEST_DB_URL``: a PostgreSQL URL (e.g.
  ``postgresql+psycopg://postgres@127.0.0.1:5432/test``); each test gets a
  schema of its own there. Unset: a SQLite file in the test's tmp folder.
- ``NBEX_TEST_BROKER_URL``: a Redis URL; the live service then runs
  ``nbexchange worker`` processes on it. Unset: the embedded in-process
  broker and worker thread.
- ``NBEX_TEST_BLOB_STORE``: ``s3`` keeps the archives in an S3-compatible
  store (moto's server on loopback, started once for the session), a bucket
  per service or test. Unset: the local folder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from hostile import cases, render
from s3server import new_bucket_name, shared_s3
from service import TEST_BLOB_STORE, TEST_BROKER_URL, Service, drop_db, fresh_db_url, start_service

from nbexchange.db import make_engine, upgrade
from nbexchange.events.sql import SQLEventStore
from nbexchange.storage import ArchiveStore, LocalArchiveStore


@pytest.fixture
def db_url(tmp_path: Path) -> Iterator[str]:
    """An empty database for this test (not yet migrated)."""
    url, token = fresh_db_url(tmp_path)
    yield url
    drop_db(token)


@pytest.fixture
def engine(db_url: str) -> Iterator[sa.Engine]:
    """A migrated database for this test."""
    eng = make_engine(db_url)
    upgrade(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def store(engine: sa.Engine) -> SQLEventStore:
    """The action log on this test's database."""
    return SQLEventStore(engine)


@pytest.fixture
def archive_store(tmp_path: Path) -> ArchiveStore:
    """An empty archive store of the kind this run tests (``NBEX_TEST_BLOB_STORE``)."""
    if TEST_BLOB_STORE != "s3":
        return LocalArchiveStore(tmp_path / "store")
    from nbexchange.storage_s3 import S3ArchiveStore

    return S3ArchiveStore(
        bucket=new_bucket_name(),
        tmp=tmp_path / "store" / "tmp",
        endpoint_url=shared_s3().url,
        addressing_style="path",
        create_bucket=True,
    )


@pytest.fixture
def exchange_service(tmp_path: Path) -> Iterator[Callable[..., Service]]:
    """Factory: ``exchange_service(users={"ada": {"phys101": "Instructor"}, ...})`` starts a live service.

    It runs on this test's database backend and, with ``NBEX_TEST_BROKER_URL``
    set, on that broker with ``nbexchange worker`` processes; otherwise the
    embedded broker and worker thread. Everything is stopped after the test.
    """
    started: list[tuple[Service, object]] = []

    def start(users: dict[str, dict[str, str]], **kwargs: Any) -> Service:
        root = tmp_path / f"exchange-{len(started)}"
        root.mkdir()
        url, token = fresh_db_url(root)
        kwargs.setdefault("broker_url", TEST_BROKER_URL)
        service = start_service(root, users, db_url=url, **kwargs)
        started.append((service, token))
        return service

    yield start
    for service, token in started:
        service.stop()
        drop_db(token)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--security-doc",
        default=None,
        help="Write the page of hostile inputs (docs/security.md) from the collected tests' hostile markers.",
    )


def pytest_collection_finish(session: pytest.Session) -> None:
    target = session.config.getoption("--security-doc")
    if target:
        Path(target).write_text(render(cases(session.items)), encoding="utf-8")
