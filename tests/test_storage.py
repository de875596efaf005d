"""Tests for the content-addressed archive store: hashing, limits, cleanup, durability, names.

One set of tests for the contract, run on both stores (the local folder and
S3 on moto's server); the local store's own layout and modes apart.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from s3server import new_bucket_name, shared_s3

from nbexchange import storage
from nbexchange.errors import NotFound, TooLarge
from nbexchange.storage import ArchiveStore, LocalArchiveStore, StoredArchive
from nbexchange.storage_s3 import S3ArchiveStore


def make_store(kind: str, root: Path) -> ArchiveStore:
    """A new, empty store of this kind: a folder under ``root``, or a new bucket on the shared S3 server."""
    if kind == "local":
        return LocalArchiveStore(root / "storage")
    server = shared_s3()
    return S3ArchiveStore(
        bucket=new_bucket_name(),
        prefix="exchange/",
        tmp=root / "tmp",
        endpoint_url=server.url,
        addressing_style="path",
        create_bucket=True,
    )


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArchiveStore:
    """Each store in turn: the contract is the same."""
    return make_store(request.param, tmp_path)


@pytest.fixture
def local(tmp_path: Path) -> LocalArchiveStore:
    return LocalArchiveStore(tmp_path / "storage")


@pytest.fixture
def strict_umask() -> Iterator[None]:
    """A umask that would strip group bits, to show the store sets its modes itself."""
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


def stored_files(store: LocalArchiveStore) -> list[Path]:
    return sorted(path for path in store.archives.rglob("*") if path.is_file())


def stored_blobs(store: ArchiveStore) -> list[str]:
    return sorted(sha for sha, _ in store.blobs())


def read_blob(store: ArchiveStore, sha256: str) -> bytes:
    with store.open(sha256) as blob:
        data = blob.read()
        assert blob.size == len(data)
        return data


def temp_files(store: ArchiveStore) -> list[Path]:
    return list(store.tmp.iterdir())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@settings(max_examples=60, deadline=None)
@given(chunks=st.lists(st.binary(max_size=5000), max_size=12))
def test_hash_and_size_match_hashlib(chunks: list[bytes]) -> None:
    data = b"".join(chunks)
    with tempfile.TemporaryDirectory() as root:
        store = LocalArchiveStore(Path(root))
        with store.new_upload() as upload:
            for chunk in chunks:
                upload.write(chunk)
            assert upload.size == len(data)
            stored = upload.finish()

        assert stored.sha256 == hashlib.sha256(data).hexdigest()
        assert stored.size == len(data)
        assert store.path(stored.sha256) == store.archives / stored.sha256[:2] / stored.sha256
        assert read_blob(store, stored.sha256) == data
        assert temp_files(store) == []


def test_a_stored_blob_reads_back_by_its_sha256(store: ArchiveStore) -> None:
    data = b"".join(os.urandom(1000) for _ in range(7))
    with store.new_upload() as upload:
        for offset in range(0, len(data), 999):
            upload.write(data[offset : offset + 999])
        stored = upload.finish()
    assert stored == StoredArchive(hashlib.sha256(data).hexdigest(), len(data))
    assert read_blob(store, stored.sha256) == data
    assert stored_blobs(store) == [stored.sha256]
    assert temp_files(store) == []


def stored_as(store: LocalArchiveStore, data: bytes) -> StoredArchive:
    with store.new_upload() as upload:
        upload.write(data)
        return upload.finish()


def test_an_archive_s_folder_entries_reach_the_disk_before_it_counts_as_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``finish`` flushes the blob's entry in its shard every time, and the shard's entry in ``archives`` the
    first time the process stores into that shard (created now or by another process): never an event naming
    an archive whose name a crash could take back. Nothing removes a shard, so once is enough."""
    flushed: list[Path] = []
    monkeypatch.setattr(storage, "fsync_dir", lambda path: flushed.append(Path(path)))
    store = LocalArchiveStore(tmp_path / "store")
    first = stored_as(store, b"one")
    shard = store.archives / first.sha256[:2]
    assert flushed == [shard, store.archives]
    same_shard = next(
        data for i in range(10_000) if hashlib.sha256(data := b"%d" % i).hexdigest()[:2] == first.sha256[:2]
    )
    flushed.clear()
    stored_as(store, same_shard)
    stored_as(store, b"one")  # the same bytes again: kept as stored
    assert flushed == [shard, shard]
    other = next(data for i in range(10_000) if hashlib.sha256(data := b"%d" % i).hexdigest()[:2] != shard.name)
    flushed.clear()
    stored_as(store, other)
    assert flushed == [store.archives / hashlib.sha256(other).hexdigest()[:2], store.archives]
    flushed.clear()
    # Another process (a store of its own) finds the shard there, made by someone else: it flushes it once too.
    stored_as(LocalArchiveStore(tmp_path / "store"), same_shard)
    assert flushed == [shard, store.archives]


def test_a_large_upload_streams_through(store: ArchiveStore) -> None:
    """Past the S3 store's multipart size (16 MiB), in parts; read back a chunk at a time."""
    block = os.urandom(1024 * 1024)
    digest = hashlib.sha256()
    with store.new_upload() as upload:
        for _ in range(18):
            upload.write(block)
            digest.update(block)
        stored = upload.finish()
    assert stored.sha256 == digest.hexdigest()
    assert stored.size == 18 * len(block)
    assert store.verify(stored.sha256)
    with store.open(stored.sha256) as blob:
        assert blob.size == stored.size
        assert blob.read(len(block)) == block
    assert temp_files(store) == []


def test_root_layout_and_modes(tmp_path: Path, strict_umask: None) -> None:
    store = LocalArchiveStore(tmp_path / "storage")
    for folder in ("archives", "tmp"):
        assert (tmp_path / "storage" / folder).is_dir()
        assert mode(tmp_path / "storage" / folder) == 0o750

    stored = store.store_bytes(b"some archive")
    assert mode(store.path(stored.sha256)) == 0o640
    assert mode(store.path(stored.sha256).parent) == 0o750


def test_head_is_the_first_two_bytes_however_they_arrive(store: ArchiveStore) -> None:
    with store.new_upload() as upload:
        assert upload.head == b""
        upload.write(b"\x1f")
        assert upload.head == b"\x1f"
        upload.write(b"")
        upload.write(b"\x8b\x08rest")
        assert upload.head == b"\x1f\x8b"
        upload.write(b"more")
        assert upload.head == b"\x1f\x8b"


def test_identical_uploads_are_stored_once(store: ArchiveStore) -> None:
    first = store.store_bytes(b"the same bytes")
    with store.new_upload() as upload:
        upload.write(b"the same ")
        upload.write(b"bytes")
        second = upload.finish()

    assert first == second
    assert stored_blobs(store) == [first.sha256]
    assert read_blob(store, first.sha256) == b"the same bytes"
    assert temp_files(store) == []


def test_the_local_store_keeps_the_copy_already_stored(local: LocalArchiveStore) -> None:
    first = local.store_bytes(b"the same bytes")
    inode = local.path(first.sha256).stat().st_ino
    local.store_bytes(b"the same bytes")
    assert stored_files(local) == [local.path(first.sha256)]
    assert local.path(first.sha256).stat().st_ino == inode


def test_too_large_at_the_byte_past_the_limit(store: ArchiveStore) -> None:
    upload = store.new_upload(max_size=10)
    upload.write(b"123456")
    upload.write(b"7890")  # exactly the limit is allowed
    assert upload.size == 10
    assert temp_files(store) != []

    with pytest.raises(TooLarge) as caught:
        upload.write(b"x")
    assert "10 bytes" in caught.value.note
    assert temp_files(store) == []
    assert stored_blobs(store) == []
    with pytest.raises(ValueError):
        upload.write(b"")
    with pytest.raises(ValueError):
        upload.finish()


def test_too_large_in_one_chunk_writes_nothing(store: ArchiveStore) -> None:
    with store.new_upload(max_size=5) as upload:
        with pytest.raises(TooLarge):
            upload.write(b"123456")
        assert upload.size == 0
    assert temp_files(store) == []


def test_abort_removes_the_temp_file_and_may_repeat(store: ArchiveStore) -> None:
    upload = store.new_upload()
    upload.write(b"half an upload")
    assert len(temp_files(store)) == 1
    upload.abort()
    upload.abort()
    assert temp_files(store) == []
    assert stored_blobs(store) == []


def test_context_manager_aborts_on_exception(store: ArchiveStore) -> None:
    with pytest.raises(RuntimeError), store.new_upload() as upload:
        upload.write(b"interrupted")
        raise RuntimeError("client went away")
    assert temp_files(store) == []
    assert stored_blobs(store) == []


def test_context_manager_discards_an_unfinished_upload(store: ArchiveStore) -> None:
    with store.new_upload() as upload:
        upload.write(b"never finished")
    assert temp_files(store) == []


def test_abort_after_finish_keeps_the_archive(store: ArchiveStore) -> None:
    upload = store.new_upload()
    upload.write(b"kept")
    stored = upload.finish()
    upload.abort()
    assert upload.finish() == stored
    assert read_blob(store, stored.sha256) == b"kept"
    with pytest.raises(ValueError):
        upload.write(b"more")


def test_archives_survive_a_new_store_on_the_same_root(tmp_path: Path) -> None:
    stored = LocalArchiveStore(tmp_path).store_bytes(b"\x1f\x8b durable bytes")

    reopened = LocalArchiveStore(tmp_path)
    assert reopened.exists(stored.sha256)
    assert read_blob(reopened, stored.sha256) == b"\x1f\x8b durable bytes"
    assert reopened.verify(stored.sha256)


def test_an_auditors_s3_store_reads_what_the_service_stored(store: ArchiveStore, tmp_path: Path) -> None:
    stored = store.store_bytes(b"\x1f\x8b durable bytes")
    if isinstance(store, S3ArchiveStore):
        auditor: ArchiveStore = S3ArchiveStore(
            bucket=store.bucket,
            prefix=store.prefix,
            tmp=tmp_path / "auditor",
            endpoint_url=shared_s3().url,
            addressing_style="path",
            create=False,
        )
        assert not (tmp_path / "auditor").exists()  # created nothing
    else:
        auditor = LocalArchiveStore(store.root, create=False)  # type: ignore[attr-defined]
    assert auditor.exists(stored.sha256) and auditor.verify(stored.sha256)
    assert stored_blobs(auditor) == [stored.sha256]


def corrupt(store: ArchiveStore, sha256: str, data: bytes) -> None:
    """Change the stored bytes behind the store's back (a failing disk, a hand on the bucket)."""
    if isinstance(store, S3ArchiveStore):
        store.client.put_object(Bucket=store.bucket, Key=f"{store.prefix}archives/{sha256}", Body=data)
    else:
        assert isinstance(store, LocalArchiveStore)
        store.path(sha256).write_bytes(data)


def test_verify_detects_a_tampered_archive(store: ArchiveStore) -> None:
    stored = store.store_bytes(b"original bytes")
    assert store.verify(stored.sha256)
    corrupt(store, stored.sha256, b"original bytez")
    assert not store.verify(stored.sha256)


def test_verify_of_a_missing_archive_is_not_found(store: ArchiveStore) -> None:
    with pytest.raises(NotFound):
        store.verify(hashlib.sha256(b"never stored").hexdigest())


def _age(path: Path, seconds: float) -> None:
    when = time.time() - seconds
    os.utime(path, (when, when), follow_symlinks=False)


#: The object store's times are whole seconds: a test waits this long for "older than the cutoff".
ONE_SECOND = 1.1


def test_collect_removes_an_unowned_blob(store: ArchiveStore) -> None:
    stored = store.store_bytes(b"to be collected")
    time.sleep(ONE_SECOND)
    assert store.collect(stored.sha256, cutoff=time.time()) is True
    assert not store.exists(stored.sha256) and stored_blobs(store) == []
    assert store.collect(stored.sha256, cutoff=time.time()) is False  # already gone
    assert store.remove_leftovers(cutoff=time.time() + 5) == []  # nothing left aside
    with pytest.raises(NotFound):
        store.open(stored.sha256)


def test_collect_keeps_a_blob_stored_after_the_cutoff(store: ArchiveStore) -> None:
    stored = store.store_bytes(b"young bytes")
    assert store.collect(stored.sha256, cutoff=time.time() - 60) is False
    assert store.verify(stored.sha256)


def test_storing_the_same_bytes_again_keeps_a_blob_from_the_collector(store: ArchiveStore) -> None:
    """An upload of a blob's bytes marks it stored again: the collector, deciding on the older time, keeps it."""
    stored = store.store_bytes(b"shared bytes")
    time.sleep(ONE_SECOND)
    cutoff = time.time()  # the collector's cutoff, taken before the upload below
    assert store.store_bytes(b"shared bytes").sha256 == stored.sha256
    assert dict(store.blobs())[stored.sha256] > cutoff - 1  # whole seconds
    assert store.collect(stored.sha256, cutoff) is False
    assert store.verify(stored.sha256)
    assert temp_files(store) == []


def test_an_upload_finishing_after_the_blob_was_set_aside_stores_its_own_copy(store: ArchiveStore) -> None:
    stored = store.store_bytes(b"raced bytes")
    upload = store.new_upload()
    upload.write(b"raced bytes")
    time.sleep(ONE_SECOND)
    assert store.collect(stored.sha256, cutoff=time.time()) is True
    assert upload.finish().sha256 == stored.sha256
    assert store.verify(stored.sha256)


def test_leftovers_are_old_partial_uploads_and_the_trees_earlier_versions_unpacked(local: LocalArchiveStore) -> None:
    store = local
    partial = store.new_upload()
    partial.write(b"half of it")  # a crashed API's upload: never finished nor aborted
    (partial_path,) = store.tmp.iterdir()
    kept = store.store_bytes(b"stored and kept")
    # Versions before 2.0 unpacked every archive under extracted/ab/<sha256>; nothing reads those trees now.
    old_tree = store.extracted / kept.sha256[:2] / kept.sha256
    old_tree.mkdir(parents=True)
    (old_tree / "problem1.ipynb").write_text("{}")
    old_staging = old_tree.parent / f".{kept.sha256}.x1y2"
    old_staging.mkdir()
    young_tree = store.extracted / "cd" / ("cd" * 32)  # left by an old worker still running: young
    young_tree.mkdir(parents=True)
    fresh = store.new_upload()  # still arriving: young
    fresh.write(b"x")
    for path in (partial_path, old_tree, old_staging):
        _age(path, 100)

    found = store.remove_leftovers(cutoff=time.time() - 50)
    assert sorted(found) == sorted(str(path) for path in (partial_path, old_tree, old_staging))
    assert store.exists(kept.sha256) and store.verify(kept.sha256)
    assert young_tree.exists() and not old_tree.exists()
    assert len(list(store.tmp.iterdir())) == 1  # the fresh upload
    fresh.abort()


def test_partial_uploads_older_than_the_cutoff_are_leftovers(store: ArchiveStore) -> None:
    partial = store.new_upload()
    partial.write(b"half of it")  # a crashed API's upload: never finished nor aborted
    (partial_path,) = temp_files(store)
    assert store.remove_leftovers(cutoff=time.time() - 60) == []  # young: perhaps still arriving
    assert store.remove_leftovers(cutoff=time.time() + 5) == [str(partial_path)]
    assert temp_files(store) == []


def test_an_auditors_store_creates_nothing(tmp_path: Path) -> None:
    store = LocalArchiveStore(tmp_path / "backup", create=False)
    assert list(store.blobs()) == [] and not (tmp_path / "backup").exists()


BAD_NAMES = [
    "",
    "not-hex",
    "A" * 64,  # upper case is not the store's spelling
    "a" * 63,
    "a" * 65,
    "g" * 64,
    "../" + "a" * 61,
    "../../etc/passwd",
    "aa/" + "a" * 61,
    "a" * 64 + "\n",
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_malformed_names_are_refused(store: ArchiveStore, name: str) -> None:
    with pytest.raises(NotFound):
        store.open(name)
    with pytest.raises(NotFound):
        store.verify(name)
    assert store.exists(name) is False
    with pytest.raises(NotFound):
        store.collect(name, time.time())
    if isinstance(store, LocalArchiveStore):
        with pytest.raises(NotFound):
            store.path(name)


def test_malformed_name_cannot_reach_a_file_outside(tmp_path: Path) -> None:
    store = LocalArchiveStore(tmp_path / "storage")
    secret = tmp_path / "secret"
    secret.write_bytes(b"do not serve")
    with pytest.raises(NotFound):
        store.open("../../secret")
    assert secret.exists()


def test_absent_archive_is_not_found(store: ArchiveStore) -> None:
    absent = hashlib.sha256(b"absent").hexdigest()
    assert not store.exists(absent)
    with pytest.raises(NotFound):
        store.open(absent)


def test_concurrent_uploads_of_the_same_bytes(store: ArchiveStore) -> None:
    data = os.urandom(256 * 1024)
    start = threading.Barrier(8)
    results: list[StoredArchive] = []
    errors: list[BaseException] = []

    def upload_once() -> None:
        try:
            start.wait()
            with store.new_upload() as upload:
                for offset in range(0, len(data), 16 * 1024):
                    upload.write(data[offset : offset + 16 * 1024])
                results.append(upload.finish())
        except BaseException as e:  # surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=upload_once) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert len(results) == 8
    assert len(set(results)) == 1
    assert results[0].sha256 == hashlib.sha256(data).hexdigest()
    assert stored_blobs(store) == [results[0].sha256]
    assert read_blob(store, results[0].sha256) == data
    assert temp_files(store) == []
