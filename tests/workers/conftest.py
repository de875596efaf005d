"""Fixtures for the workers' tests: a Redis and a PostgreSQL of the test's own, to stop and start at will."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import PostgresServer, RedisServer


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A private Redis (never the shared one on 6379, which other tests and sessions use)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A private PostgreSQL cluster (never the shared one on 5432, which other tests and sessions use)."""
    if shutil.which("initdb") is None or shutil.which("postgres") is None:
        pytest.skip("PostgreSQL's initdb and postgres are not installed")
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.remove()
