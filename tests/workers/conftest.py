"""Fixtures for the workers' tests: a broker and a PostgreSQL of the test's own, to stop and start at will."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from servers import PostgresServer, RabbitMQServer, RedisServer, rabbitmq_script
from service import TEST_BROKER_URL

from nbexchange.workers.app import is_rabbitmq


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
def own_rabbitmq(tmp_path: Path) -> Iterator[RabbitMQServer]:
    """A private RabbitMQ node (never the shared one on 5672, which other tests and sessions use)."""
    if rabbitmq_script("rabbitmq-server") is None or rabbitmq_script("rabbitmqctl") is None:
        pytest.skip("rabbitmq-server is not installed")
    server = RabbitMQServer(tmp_path / "rabbitmq")
    try:
        server.start()
        yield server
    finally:
        server.remove()


@pytest.fixture
def own_broker(request: pytest.FixtureRequest) -> RedisServer | RabbitMQServer:
    """A private broker of the kind this pass runs on: RabbitMQ if NBEX_TEST_BROKER_URL names it, else Redis."""
    name = "own_rabbitmq" if is_rabbitmq(TEST_BROKER_URL) else "own_redis"
    server: RedisServer | RabbitMQServer = request.getfixturevalue(name)
    return server


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
