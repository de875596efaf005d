"""The archive check's byte work in child processes: the outcomes of the worker's own thread; a dead child replaced."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbexchange.errors import ExchangeError
from nbexchange.storage import ArchiveStore, LocalArchiveStore
from nbexchange.workers.archives import ArchiveLimits, ArchiveReport
from nbexchange.workers.inspector import Inspector
from tests.workers.test_archives import GOOD, build, entry

LIMITS = ArchiveLimits(max_members=50)


def children() -> set[int]:
    """The processes this one's main thread started (a process pool starts its children from the submitting thread)."""
    pid = os.getpid()
    return {int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


@pytest.fixture
def local(tmp_path: Path) -> LocalArchiveStore:
    return LocalArchiveStore(tmp_path / "store")


@pytest.fixture
def inspector() -> Iterator[Inspector]:
    inspector = Inspector(1)
    yield inspector
    inspector.close()


def stored(store: LocalArchiveStore, tmp_path: Path) -> dict[str, str]:
    """Archives of every outcome, stored: name -> sha256."""
    good = build(tmp_path / "good.tar.gz", GOOD).read_bytes()
    unsafe = build(tmp_path / "unsafe.tar.gz", [entry("../escape.txt", b"x")]).read_bytes()
    changed = store.store_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # its trailer's length no longer matches
    corrupt = store.store_bytes(build(tmp_path / "other.tar.gz", [entry("a.ipynb", b"{}")]).read_bytes())
    # The blob's bytes replaced by another valid archive's: still a readable gzip'd tar, no longer its sha256.
    store.path(corrupt.sha256).write_bytes(good)
    return {
        "good": store.store_bytes(good).sha256,
        "unsafe": store.store_bytes(unsafe).sha256,
        "not gzip": store.store_bytes(b"PK\x03\x04 a zip").sha256,
        "cut": changed.sha256,
        "corrupt": corrupt.sha256,
        "missing": "0" * 64,
    }


def outcome(inspector: Inspector, store: LocalArchiveStore, sha: str) -> ArchiveReport | tuple[str, str]:
    try:
        return inspector.inspect(store, sha, LIMITS)
    except ExchangeError as e:
        return type(e).__name__, e.note


def test_a_child_process_checks_with_the_same_outcomes_as_the_workers_thread(
    local: LocalArchiveStore, tmp_path: Path, inspector: Inspector
) -> None:
    archives = stored(local, tmp_path)
    before = children()
    inline = {name: outcome(Inspector(0), local, sha) for name, sha in archives.items()}
    assert children() == before  # in this process
    assert isinstance(inline["good"], ArchiveReport)
    assert {name: result[0] for name, result in inline.items() if isinstance(result, tuple)} == {
        "unsafe": "UnsafeArchive",
        "not gzip": "UnsupportedMedia",
        "cut": "UnsupportedMedia",
        "corrupt": "BlobCorrupt",
        "missing": "NotFound",
    }
    assert {name: outcome(inspector, local, sha) for name, sha in archives.items()} == inline
    assert children() - before, "no child process did the checks"


def test_a_child_killed_during_the_burst_is_replaced_and_the_check_done(
    local: LocalArchiveStore, tmp_path: Path, inspector: Inspector
) -> None:
    sha = stored(local, tmp_path)["good"]
    before = children()
    first = inspector.inspect(local, sha, LIMITS)
    (child,) = children() - before
    os.kill(child, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while child in children() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert inspector.inspect(local, sha, LIMITS) == first
    assert children() - before - {child}, "the pool was not started again"


def test_the_store_of_this_run_is_checked_where_its_kind_says(archive_store: ArchiveStore, tmp_path: Path) -> None:
    """The local store's archives go to a child process; an S3 store's stay in the calling thread, with its client."""
    sha = archive_store.store_bytes(build(tmp_path / "good.tar.gz", GOOD).read_bytes()).sha256
    before = children()
    inspector = Inspector(1)
    try:
        assert inspector.inspect(archive_store, sha, LIMITS) == Inspector(0).inspect(archive_store, sha, LIMITS)
        assert bool(children() - before) == isinstance(archive_store, LocalArchiveStore)
    finally:
        inspector.close()
