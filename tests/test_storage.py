"""Tests for the content-addressed archive store: hashing, limits, cleanup, durability, names."""

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

from nbexchange.errors import NotFound, TooLarge
from nbexchange.storage import ArchiveStore, StoredArchive


@pytest.fixture
def store(tmp_path: Path) -> ArchiveStore:
    return ArchiveStore(tmp_path / "storage")


@pytest.fixture
def strict_umask() -> Iterator[None]:
    """A umask that would strip group bits, to show the store sets its modes itself."""
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


def stored_files(store: ArchiveStore) -> list[Path]:
    return sorted(path for path in store.archives.rglob("*") if path.is_file())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@settings(max_examples=60, deadline=None)
@given(chunks=st.lists(st.binary(max_size=5000), max_size=12))
def test_hash_and_size_match_hashlib(chunks: list[bytes]) -> None:
    data = b"".join(chunks)
    with tempfile.TemporaryDirectory() as root:
        store = ArchiveStore(Path(root))
        with store.new_upload() as upload:
            for chunk in chunks:
                upload.write(chunk)
            assert upload.size == len(data)
            stored = upload.finish()

        assert stored.sha256 == hashlib.sha256(data).hexdigest()
        assert stored.size == len(data)
        assert stored.path == store.archives / stored.sha256[:2] / stored.sha256
        assert stored.path.read_bytes() == data
        assert list(store.tmp.iterdir()) == []


def test_a_large_upload_streams_through(store: ArchiveStore) -> None:
    block = os.urandom(1024 * 1024)
    digest = hashlib.sha256()
    with store.new_upload() as upload:
        for _ in range(5):
            upload.write(block)
            digest.update(block)
        stored = upload.finish()
    assert stored.sha256 == digest.hexdigest()
    assert stored.size == 5 * len(block)
    assert store.verify(stored.sha256)


def test_root_layout_and_modes(tmp_path: Path, strict_umask: None) -> None:
    store = ArchiveStore(tmp_path / "storage")
    for folder in ("archives", "tmp"):
        assert (tmp_path / "storage" / folder).is_dir()
        assert mode(tmp_path / "storage" / folder) == 0o750

    stored = store.store_bytes(b"some archive")
    assert mode(stored.path) == 0o640
    assert mode(stored.path.parent) == 0o750


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
    inode = first.path.stat().st_ino
    with store.new_upload() as upload:
        upload.write(b"the same ")
        upload.write(b"bytes")
        second = upload.finish()

    assert first == second
    assert stored_files(store) == [first.path]
    # The copy already stored is kept, not replaced by the newcomer.
    assert first.path.stat().st_ino == inode
    assert list(store.tmp.iterdir()) == []


def test_too_large_at_the_byte_past_the_limit(store: ArchiveStore) -> None:
    upload = store.new_upload(max_size=10)
    upload.write(b"123456")
    upload.write(b"7890")  # exactly the limit is allowed
    assert upload.size == 10
    assert list(store.tmp.iterdir()) != []

    with pytest.raises(TooLarge) as caught:
        upload.write(b"x")
    assert "10 bytes" in caught.value.note
    assert list(store.tmp.iterdir()) == []
    assert stored_files(store) == []
    with pytest.raises(ValueError):
        upload.write(b"")
    with pytest.raises(ValueError):
        upload.finish()


def test_too_large_in_one_chunk_writes_nothing(store: ArchiveStore) -> None:
    with store.new_upload(max_size=5) as upload:
        with pytest.raises(TooLarge):
            upload.write(b"123456")
        assert upload.size == 0
    assert list(store.tmp.iterdir()) == []


def test_abort_removes_the_temp_file_and_may_repeat(store: ArchiveStore) -> None:
    upload = store.new_upload()
    upload.write(b"half an upload")
    assert len(list(store.tmp.iterdir())) == 1
    upload.abort()
    upload.abort()
    assert list(store.tmp.iterdir()) == []
    assert stored_files(store) == []


def test_context_manager_aborts_on_exception(store: ArchiveStore) -> None:
    with pytest.raises(RuntimeError), store.new_upload() as upload:
        upload.write(b"interrupted")
        raise RuntimeError("client went away")
    assert list(store.tmp.iterdir()) == []
    assert stored_files(store) == []


def test_context_manager_discards_an_unfinished_upload(store: ArchiveStore) -> None:
    with store.new_upload() as upload:
        upload.write(b"never finished")
    assert list(store.tmp.iterdir()) == []


def test_abort_after_finish_keeps_the_archive(store: ArchiveStore) -> None:
    upload = store.new_upload()
    upload.write(b"kept")
    stored = upload.finish()
    upload.abort()
    assert upload.finish() == stored
    assert stored.path.read_bytes() == b"kept"
    with pytest.raises(ValueError):
        upload.write(b"more")


def test_archives_survive_a_new_store_on_the_same_root(tmp_path: Path) -> None:
    stored = ArchiveStore(tmp_path).store_bytes(b"\x1f\x8b durable bytes")

    reopened = ArchiveStore(tmp_path)
    assert reopened.exists(stored.sha256)
    assert reopened.path(stored.sha256) == stored.path
    with reopened.open(stored.sha256) as archive:
        assert archive.read() == b"\x1f\x8b durable bytes"
    assert reopened.verify(stored.sha256)


def test_verify_detects_a_tampered_archive(store: ArchiveStore) -> None:
    stored = store.store_bytes(b"original bytes")
    assert store.verify(stored.sha256)
    stored.path.write_bytes(b"original bytez")
    assert not store.verify(stored.sha256)


def test_verify_of_a_missing_archive_is_not_found(store: ArchiveStore) -> None:
    with pytest.raises(NotFound):
        store.verify(hashlib.sha256(b"never stored").hexdigest())


def _age(path: Path, seconds: float) -> None:
    when = time.time() - seconds
    os.utime(path, (when, when), follow_symlinks=False)


def test_collect_removes_an_old_blob(store: ArchiveStore) -> None:
    stored = store.store_bytes(b"to be collected")
    _age(stored.path, 100)

    assert store.collect(stored.sha256, cutoff=time.time() - 50) is True
    assert not stored.path.exists() and not store.exists(stored.sha256)
    assert store.collect(stored.sha256, cutoff=time.time()) is False  # already gone
    assert not list(store.tmp.iterdir())  # nothing left aside
    with pytest.raises(NotFound):
        store.path(stored.sha256)


def test_storing_the_same_bytes_again_keeps_a_blob_from_the_collector(store: ArchiveStore) -> None:
    """An upload of a blob's bytes marks it stored again: the collector, deciding on the older time, keeps it."""
    stored = store.store_bytes(b"shared bytes")
    _age(stored.path, 100)
    cutoff = time.time() - 50  # the collector's cutoff, taken before the upload below
    assert store.store_bytes(b"shared bytes").sha256 == stored.sha256
    assert store.collect(stored.sha256, cutoff) is False
    assert store.verify(stored.sha256)
    assert not list(store.tmp.iterdir())


def test_an_upload_finishing_after_the_blob_was_set_aside_stores_its_own_copy(store: ArchiveStore) -> None:
    stored = store.store_bytes(b"raced bytes")
    _age(stored.path, 100)
    upload = store.new_upload()
    upload.write(b"raced bytes")
    assert store.collect(stored.sha256, cutoff=time.time() - 50) is True
    assert upload.finish().sha256 == stored.sha256
    assert store.verify(stored.sha256)


def test_leftovers_are_old_partial_uploads_and_the_trees_earlier_versions_unpacked(store: ArchiveStore) -> None:
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

    found = set(store.leftovers(cutoff=time.time() - 50))
    assert found == {partial_path, old_tree, old_staging}
    for path in found:
        store.remove_leftover(path)
    assert store.exists(kept.sha256) and store.verify(kept.sha256)
    assert young_tree.exists()
    assert len(list(store.tmp.iterdir())) == 1  # the fresh upload
    fresh.abort()


def test_an_auditors_store_creates_nothing(tmp_path: Path) -> None:
    store = ArchiveStore(tmp_path / "backup", create=False)
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
        store.path(name)
    with pytest.raises(NotFound):
        store.open(name)
    assert store.exists(name) is False
    with pytest.raises(NotFound):
        store.collect(name, time.time())


def test_malformed_name_cannot_reach_a_file_outside(tmp_path: Path) -> None:
    store = ArchiveStore(tmp_path / "storage")
    secret = tmp_path / "secret"
    secret.write_bytes(b"do not serve")
    with pytest.raises(NotFound):
        store.open("../../secret")
    assert secret.exists()


def test_absent_archive_is_not_found(store: ArchiveStore) -> None:
    absent = hashlib.sha256(b"absent").hexdigest()
    assert not store.exists(absent)
    with pytest.raises(NotFound):
        store.path(absent)
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
    assert stored_files(store) == [results[0].path]
    assert results[0].path.read_bytes() == data
    assert list(store.tmp.iterdir()) == []
