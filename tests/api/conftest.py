"""A live service shared by a test module, with users in every role the route table knows."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from service import TEST_BROKER_URL, Service, drop_db, fresh_db_url, start_service

USERS = {
    "ada": {"phys101": "Instructor"},
    "s1": {"phys101": "Student"},
    "s2": {"phys101": "Student"},
    "stranger": {"chem202": "Student"},
    "other_org_ada": {"phys101": "Instructor"},
}
ORGS = {"other_org_ada": 2}


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("exchange")
    url, token = fresh_db_url(root)
    service = start_service(
        root, USERS, db_url=url, broker_url=TEST_BROKER_URL, orgs=ORGS, extra=["--NbExchange.consistency_timeout=2"]
    )
    yield service
    service.stop()
    drop_db(token)
