"""Processes started together on an empty database all come up: one migrates, the others wait and find it done."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
import requests
import service as service_module
import sqlalchemy as sa
from httpclient import COURSE, get, ok, release, submit, until
from servers import RedisServer
from service import TEST_DB_URL, Service

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
