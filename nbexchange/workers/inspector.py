"""The archive check's byte work (read the blob, its sha256, inflate, the tar walk), in processes of its own.

A check makes many short calls into C (a piece of the blob read, hashed,
inflated), and each gives up the interpreter's lock (the GIL) and must win it
back. Where other threads of the same interpreter are busy, as the upload
handlers are in the embedded default during a deadline's burst, every call
waits for them, and each hand-over of the lock costs both sides. Measured on
this project's 2-core machine, beside one busy thread: a 1 MB check took 5-7
ms of CPU instead of 1.4 ms, and 230 ms instead of 1.4 ms of wall time. In a
child process, which has an interpreter of its own, the check costs its 1.4
ms there, and the worker's thread that waits for the answer 0.03-0.07 ms.
"""

from __future__ import annotations

import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from nbexchange.errors import BlobCorrupt, ExchangeError, NotFound, UnsafeArchive, UnsupportedMedia
from nbexchange.storage import ArchiveStore, HashingReader, LocalArchiveStore
from nbexchange.workers.archives import ArchiveLimits, ArchiveReport, inspect_archive

#: What a check may find wrong with an archive: it is then rejected, with the error's note as the reason.
REJECTIONS: tuple[type[ExchangeError], ...] = (UnsafeArchive, UnsupportedMedia, NotFound, BlobCorrupt)


def inspect_stored(archives: ArchiveStore, sha: str, limits: ArchiveLimits) -> ArchiveReport:
    """Read the stored archive ``sha`` once: what it holds, if it is safe and its bytes still hash to ``sha``.

    Raises one of ``REJECTIONS`` otherwise.
    """
    with archives.open(sha) as stored:
        reading = HashingReader(stored)
        report = inspect_archive(reading, limits)
        if reading.hexdigest() != sha:
            raise BlobCorrupt(sha)
    return report


class Inspector:
    """Runs :func:`inspect_stored`, in up to ``processes`` child processes (0: in the calling thread).

    The children start with the first check, so a process that never checks
    (an API process with a broker) never has any. Only the local store's
    archives go to them; an S3 store's checks run in the calling thread (its
    client cannot be sent to another process). A child that dies (killed,
    out of memory) takes its check with it: the pool is started again and
    the check tried once more there, then the error is raised like any
    other unexpected failure of a check.
    """

    def __init__(self, processes: int = 0) -> None:
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def inspect(self, archives: ArchiveStore, sha: str, limits: ArchiveLimits) -> ArchiveReport:
        """:func:`inspect_stored`, in a child process where there are any."""
        if self.processes <= 0 or not isinstance(archives, LocalArchiveStore):
            return inspect_stored(archives, sha, limits)
        try:
            answer = self._run(archives.root, sha, limits)
        except BrokenProcessPool:
            answer = self._run(archives.root, sha, limits)
        if isinstance(answer, ArchiveReport):
            return answer
        kind, note = answer
        if kind == BlobCorrupt.__name__:
            raise BlobCorrupt(sha)
        raise {error.__name__: error for error in REJECTIONS}[kind](note)

    def close(self) -> None:
        """Stop the children (a check in progress is finished first)."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def _run(self, root: Path, sha: str, limits: ArchiveLimits) -> ArchiveReport | tuple[str, str]:
        pool = self._started()
        try:
            return pool.submit(_inspect_local, str(root), sha, limits).result()
        except BrokenProcessPool:
            with self._lock:
                if self._pool is pool:
                    self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)
            raise

    def _started(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                # Not forked: this process has threads (the event loop, the committer) whose locks a fork would copy.
                self._pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"))
            return self._pool


def _inspect_local(root: str, sha: str, limits: ArchiveLimits) -> ArchiveReport | tuple[str, str]:
    """In a child: the report, or the rejection's kind and note (errors are sent back as plain values)."""
    try:
        return inspect_stored(LocalArchiveStore(Path(root), create=False), sha, limits)
    except REJECTIONS as e:
        return type(e).__name__, e.note
