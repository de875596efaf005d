"""Tests of the S3 archive store's own parts, on moto's server: the collector's races, leftovers, failures."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from s3server import CuttableLink, S3Server, new_bucket_name, shared_s3
from service import free_port

from nbexchange.errors import NotFound, Unavailable
from nbexchange.storage_s3 import S3ArchiveStore

#: The object store's times are whole seconds: a test waits this long for "older than the cutoff".
ONE_SECOND = 1.1


def s3_store(tmp: Path, bucket: str | None = None, url: str | None = None, **kwargs: Any) -> S3ArchiveStore:
    return S3ArchiveStore(
        bucket=bucket or new_bucket_name(),
        prefix="exchange/",
        tmp=tmp,
        endpoint_url=url or shared_s3().url,
        addressing_style="path",
        **kwargs,
    )


@pytest.fixture
def store(tmp_path: Path) -> S3ArchiveStore:
    return s3_store(tmp_path / "tmp", create_bucket=True)


class Interleaved:
    """The store's S3 client, running ``then`` once right after the first call of ``method``."""

    def __init__(self, client: Any, method: str, then: Callable[[], None]) -> None:
        self._client, self._method, self._then = client, method, then

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if name != self._method or self._then is None:
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            answer = attr(*args, **kwargs)
            then, self._then = self._then, None
            then()
            return answer

        return call


def keys(store: S3ArchiveStore) -> list[str]:
    pages = store.client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", ()))


def test_everything_is_under_the_prefix(store: S3ArchiveStore) -> None:
    stored = store.store_bytes(b"bytes")
    store.store_bytes(b"bytes")  # stored again: a mark
    assert keys(store)[0] == f"exchange/archives/{stored.sha256}"
    assert all(key.startswith("exchange/") for key in keys(store)) and len(keys(store)) == 2


def test_an_upload_stored_again_while_the_collector_removes_the_blob_gets_it_back(
    store: S3ArchiveStore, tmp_path: Path
) -> None:
    """The upload finds the blob, marks it and finds it again, between the collector's copy aside and its delete."""
    data = b"shared bytes"
    stored = store.store_bytes(data)
    time.sleep(ONE_SECOND)
    cutoff = time.time()
    uploader = s3_store(tmp_path / "uploader", bucket=store.bucket)

    def upload_meanwhile() -> None:
        assert uploader.store_bytes(data) == stored

    store.client = Interleaved(store.client, "copy", upload_meanwhile)
    assert store.collect(stored.sha256, cutoff) is False
    assert store.verify(stored.sha256)
    assert [key for key in keys(store) if "/collecting/" in key] == []


def test_an_upload_that_finds_the_blob_gone_on_its_second_look_stores_its_own_copy(
    store: S3ArchiveStore, tmp_path: Path
) -> None:
    """The collector removes the blob between the upload's first look and its second."""
    data = b"raced bytes"
    stored = store.store_bytes(data)
    time.sleep(ONE_SECOND)
    cutoff = time.time()
    collector = s3_store(tmp_path / "collector", bucket=store.bucket)
    removed: list[bool] = []
    store.client = Interleaved(
        store.client, "head_object", lambda: removed.append(collector.collect(stored.sha256, cutoff))
    )
    assert store.store_bytes(data) == stored
    assert removed == [True]
    assert store.verify(stored.sha256)


def test_a_blob_stored_anew_after_the_collector_listed_it_is_kept(store: S3ArchiveStore, tmp_path: Path) -> None:
    """Removed by one collector, stored anew by an upload, then reached by a second collector that listed the
    old blob: the copy aside is conditional on the blob's time, so the new copy stays."""
    data = b"stored anew"
    stored = store.store_bytes(data)
    time.sleep(ONE_SECOND)
    cutoff = time.time()
    assert [sha for sha, at in store.blobs() if at < cutoff] == [stored.sha256]  # the second collector's list
    assert s3_store(tmp_path / "first", bucket=store.bucket).collect(stored.sha256, cutoff) is True
    time.sleep(ONE_SECOND)
    assert store.store_bytes(data) == stored
    assert store.collect(stored.sha256, cutoff) is False
    assert store.verify(stored.sha256)


def test_leftovers_are_old_marks_blobs_set_aside_and_unfinished_multipart_uploads(store: S3ArchiveStore) -> None:
    stored = store.store_bytes(b"marked")
    store.store_bytes(b"marked")
    aside = f"exchange/collecting/{stored.sha256}/crashed"
    store.client.put_object(Bucket=store.bucket, Key=aside, Body=b"marked")
    # An upload in flight: moto says every multipart upload began in 2010 (a fixed date in its answer), so
    # only this process's first sight of it keeps it, as it must keep any upload younger than the grace.
    unfinished = store.client.create_multipart_upload(Bucket=store.bucket, Key=f"exchange/archives/{'ab' * 32}")
    assert store.remove_leftovers(cutoff=time.time() - 60) == []  # all young
    assert store.remove_leftovers(cutoff=time.time() - 60) == []  # and still young on a second look

    found = store.remove_leftovers(cutoff=time.time() + 5)
    assert len(found) == 3
    assert f"s3://{store.bucket}/{aside}" in found
    assert any(name.endswith(f"?uploadId={unfinished['UploadId']}") for name in found)
    assert keys(store) == [f"exchange/archives/{stored.sha256}"]
    assert store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", []) == []


def test_an_unreachable_store_is_unavailable_and_keeps_no_temp_file(tmp_path: Path) -> None:
    down = s3_store(tmp_path / "tmp", url=f"http://127.0.0.1:{free_port()}")
    upload = down.new_upload()
    upload.write(b"\x1f\x8b nobody to store it")
    with pytest.raises(Unavailable) as caught:
        upload.finish()
    assert "unreachable" in caught.value.note
    upload.abort()
    assert list((tmp_path / "tmp").iterdir()) == []
    sha = hashlib.sha256(b"x").hexdigest()
    for call in (down.exists, down.open, down.verify, lambda sha: list(down.blobs())):
        with pytest.raises(Unavailable):
            call(sha)


def test_a_store_that_went_away_mid_download_is_unavailable(tmp_path: Path) -> None:
    server = S3Server()
    server.start()
    # At most 2 MB of any answer reaches the store before the cut: the rest cannot wait in socket buffers.
    link = CuttableLink(server.url, down_limit=2 * 1024 * 1024)
    try:
        store = s3_store(tmp_path / "tmp", url=link.url, create_bucket=True)
        stored = store.store_bytes(bytes(range(256)) * 40_000)  # 10 MB: more than one read
        with store.open(stored.sha256) as blob:
            assert len(blob.read(1024 * 1024)) == 1024 * 1024
            link.cut()
            server.stop()
            with pytest.raises(Unavailable):
                while blob.read(1024 * 1024):
                    pass
    finally:
        link.cut()
        server.stop()


def test_a_missing_bucket_is_unavailable_not_missing_blobs(tmp_path: Path) -> None:
    store = s3_store(tmp_path / "tmp")  # the bucket was never created
    with pytest.raises(Unavailable):
        store.store_bytes(b"bytes")
    with pytest.raises(Unavailable):
        store.open(hashlib.sha256(b"bytes").hexdigest())


def test_a_blob_removed_behind_the_stores_back_is_not_found(store: S3ArchiveStore) -> None:
    stored = store.store_bytes(b"gone")
    store.client.delete_object(Bucket=store.bucket, Key=f"exchange/archives/{stored.sha256}")
    assert not store.exists(stored.sha256)
    with pytest.raises(NotFound):
        store.open(stored.sha256)
