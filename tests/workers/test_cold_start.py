"""Processes started together on an empty database all come up: one migrates, the others wait and find it done."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import service as service_module
import sqlalchemy as sa
from httpclient import COURSE, get, ok, release, submit, until
from servers import PostgresServer, RedisServer
from service import TEST_DB_URL, Service, start_service

USERS = {"ada": {COURSE: "Instructor"}, "s1": {COURSE: "Student"}}
#: The PostgreSQL the suite runs on, or the shared one when this is the SQLite pass.
PG_URL = TEST_DB_URL if TEST_DB_URL.startswith("postgresql") else "postgresql+psycopg://postgres@127.0.0.1:5432/test"
ROUNDS = 3


def _backend_url(backend: str) -> str:
    """What ``fresh_db_url`` makes databases from: "" for SQLite files, else a PostgreSQL URL (skip if down)."""
    if backend == "sqlite":
        return ""
    engine = sa.create_engine(PG_URL, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except sa.exc.OperationalError as e:
        pytest.skip(f"PostgreSQL is unavailable at {PG_URL}: {e}")
    finally:
        engine.dispose()
    return PG_URL


def _serves(svc: Service, round_: int) -> None:
    """Every API answers; a release through one and a submission through the other are accepted and checked."""
    first, second = (dataclasses.replace(svc, url=url) for url in svc.api_urls)
    for api in (first, second):
        assert ok(requests.get(api.url + "health", timeout=10)) == {"success": True, "status": "ok"}
    assignment = f"ps{round_}"
    ok(release(first, "ada", assignment), 201)
    until(
        lambda: get(second, "assignment", "s1", course_id=COURSE, assignment_id=assignment).status_code == 200,
        30,
        lambda: f"the release never reached the second API\n{svc.log_text()[-4000:]}",
    )
    position = ok(submit(second, "s1", assignment), 201)["position"]

    def checked() -> bool:
        listed = get(first, "collections", "ada", course_id=COURSE, assignment_id=assignment, min_position=position)
        items = ok(listed)["value"] if listed.status_code == 200 else []
        return [item["archive"]["state"] for item in items] == ["unpacked"]

    until(checked, 30, lambda: f"no worker checked the submission\n{svc.log_text()[-4000:]}")


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_apis_and_two_workers_started_at_once_on_an_empty_database_all_come_up(
    backend: str,
    monkeypatch: pytest.MonkeyPatch,
    exchange_service: Callable[..., Service],
    own_redis: RedisServer,
) -> None:
    # fresh_db_url reads this module global: an empty SQLite file, or an empty PostgreSQL schema, per round.
    monkeypatch.setattr(service_module, "TEST_DB_URL", _backend_url(backend))
    for round_ in range(ROUNDS):
        # Every process migrates on start (upgrade_db, the default), all four started together;
        # start_service fails with the logs if one exits or an API never answers.
        svc = exchange_service(USERS, broker_url=own_redis.url, api_processes=2, workers=2, cold_start=True)
        _serves(svc, round_)
        exited = [(proc.args, proc.returncode) for proc in svc.procs if proc.poll() is not None]
        assert not exited, f"round {round_}: {exited}\n{svc.log_text()[-4000:]}"
        svc.stop()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_processes_started_before_their_database_come_up_when_it_does(
    own_postgres: PostgresServer, own_redis: RedisServer, tmp_path: Path
) -> None:
    """As ``docker compose up`` without its migrate step may: the processes wait for the database, then migrate."""
    own_postgres.stop()
    root = tmp_path / "exchange"
    flags = {"db_url": own_postgres.url, "broker_url": own_redis.url, "api_processes": 2, "workers": 2}
    pool = ThreadPoolExecutor(1)
    starting = pool.submit(start_service, root, USERS, **flags, cold_start=True)

    def all_waiting() -> bool:
        if starting.done():
            starting.result()  # raises with the logs if a process exited
        logs = [log.read_text(errors="replace") for log in root.glob("*.log")]
        return len(logs) == 4 and all("The database does not answer" in text for text in logs)

    # The database comes up once every process is waiting for it.
    waiting: Exception | None = None
    try:
        until(all_waiting, 60, lambda: "\n".join(log.read_text() for log in root.glob("*.log"))[-4000:])
    except Exception as e:  # reported once the processes are stopped
        waiting = e
    own_postgres.start()
    pool.shutdown(wait=True)
    svc = starting.result()  # raises with the logs if a process exited
    try:
        assert waiting is None, waiting
        _serves(svc, 0)
        assert all(proc.poll() is None for proc in svc.procs), svc.log_text()[-4000:]
        assert all("The database answers" in log.read_text() for log in svc.logs), svc.log_text()[-4000:]
    finally:
        svc.stop()
