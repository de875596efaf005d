"""A live service on the S3 store whose object store goes away: answers 503, and records nothing it did not do."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from builders import make_archive
from httpclient import COURSE, course_events, get, ok, refused, release, submit, until
from s3server import S3Server, new_bucket_name
from service import REDIS_URL, Service, run_nbexchange, service_archives, verify

from nbexchange.storage_s3 import S3ArchiveStore

USERS = {"ada": {COURSE: "Instructor"}, "s1": {COURSE: "Student"}}


@pytest.fixture
def own_s3() -> Iterator[S3Server]:
    """An S3 server of the test's own (never the suite's shared one), to stop at will."""
    server = S3Server()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def on_s3(server: S3Server) -> list[str]:
    return [
        "--NbExchange.blob_store=s3",
        f"--NbExchange.s3_endpoint_url={server.url}",
        f"--NbExchange.s3_bucket={new_bucket_name()}",
        "--NbExchange.s3_prefix=nbexchange/",
        "--NbExchange.s3_addressing_style=path",
        "--NbExchange.s3_create_bucket=True",
    ]


@pytest.fixture
def on_own_s3(exchange_service: Callable[..., Service], own_s3: S3Server) -> Service:
    return exchange_service(USERS, extra=on_s3(own_s3))


def test_the_service_keeps_its_archives_in_the_bucket(on_own_s3: Service, tmp_path: Path) -> None:
    svc = on_own_s3
    archive = make_archive({"nb1.ipynb": b"in the bucket"})
    ok(release(svc, "ada", "ps1", archive=archive), 201)
    sha = hashlib.sha256(archive).hexdigest()
    store = service_archives(svc)
    assert store.exists(sha) and store.verify(sha)
    assert not (svc.storage / "exchange-0" / "store" / "archives").exists()
    fetched = get(svc, "assignment", "s1", course_id=COURSE, assignment_id="ps1")
    assert fetched.status_code == 200 and fetched.content == archive
    work = make_archive({"nb1.ipynb": b"my work"})
    position = ok(submit(svc, "s1", "ps1", archive=work), 201)["position"]
    assert verify(svc)["ok"]

    # An auditor's extract reads the bucket and writes nothing there, nor in the store's folder.
    before = sorted(key for key, _ in store.blobs())
    out = tmp_path / "evidence.tar.gz"
    done = run_nbexchange("extract", f"--submission={position}", f"--output={out}", *svc.flags)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes() == work and json.loads(done.stdout)["archive_sha256"] == hashlib.sha256(work).hexdigest()
    assert sorted(key for key, _ in store.blobs()) == before


def test_an_unreachable_object_store_answers_503_and_records_nothing(on_own_s3: Service, own_s3: S3Server) -> None:
    svc = on_own_s3
    ok(release(svc, "ada", "ps1"), 201)
    # The release's check reads the bucket too: done before the object store goes away.
    before = until(
        lambda: (types := [e["type"] for e in course_events(svc, "ada")]) and "archive_unpacked" in types and types
    )
    own_s3.stop()

    answer = submit(svc, "s1", "ps1")
    refused(answer, 503, "archive store", "unreachable", "nothing was stored")
    assert answer.headers["Retry-After"].isdigit()
    refused(get(svc, "assignment", "s1", course_id=COURSE, assignment_id="ps1"), 503, "archive store")

    assert [e["type"] for e in course_events(svc, "ada")] == before  # no submission, no fetch
    tmp = svc.storage / "store" / "tmp"
    assert not tmp.exists() or os.listdir(tmp) == []
    assert "Traceback" not in svc.log_text()


def test_a_blob_gone_from_the_bucket_is_an_archive_rejected_and_a_fault_of_verify(
    exchange_service: Callable[..., Service], own_s3: S3Server
) -> None:
    # No worker yet: the blob is removed from the bucket after the submission is accepted, before its check.
    svc = exchange_service(USERS, broker_url=REDIS_URL, workers=0, extra=on_s3(own_s3))
    archive = make_archive({"nb1.ipynb": b"lost"})
    sha = hashlib.sha256(archive).hexdigest()
    ok(release(svc, "ada", "ps1"), 201)
    position = ok(submit(svc, "s1", "ps1", archive=archive), 201)["position"]
    store = service_archives(svc)
    assert isinstance(store, S3ArchiveStore)
    store.client.delete_object(Bucket=store.bucket, Key=f"nbexchange/archives/{sha}")
    svc.start_worker()

    def outcome() -> dict[str, Any] | None:
        events = course_events(svc, "ada")
        found = [e for e in events if e["type"].startswith("archive_") and e["payload"]["source_position"] == position]
        return found[0] if found else None

    checked = until(outcome, timeout=60, message=svc.log_text)
    assert checked["type"] == "archive_rejected", checked
    assert f"No archive with sha256 {sha} is stored" in checked["payload"]["reason"]
    faults = verify(svc)["faults"]
    assert [f["reason"] for f in faults] == [f"archive {sha} is missing from storage"]
