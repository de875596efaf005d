"""Durable, content-addressed storage of uploaded archives, each named by the sha256 of its bytes."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Protocol

from nbexchange.errors import InsufficientStorage, NotFound, TooLarge

FILE_MODE = 0o640
DIR_MODE = 0o750
#: How much is read or hashed at a time: files are never held whole in memory.
CHUNK_SIZE = 1024 * 1024

_DIGEST = re.compile(r"[0-9a-f]{64}")

#: The prefix, in ``tmp/``, of a blob the collector has set aside to remove.
COLLECTING = "collecting-"


@dataclass(frozen=True)
class StoredArchive:
    """An archive safely on disk: its sha256 (hex), its size in bytes and where it lives."""

    sha256: str
    size: int
    path: Path


class ArchiveStore:
    """Archives under ``root/archives/ab/<sha256>``; uploads in progress under ``root/tmp``."""

    def __init__(self, root: Path, create: bool = True) -> None:
        self.root = Path(root)
        self.archives = self.root / "archives"
        self.tmp = self.root / "tmp"
        #: Where versions before 2.0 unpacked each archive; nothing reads it now, and the collector empties it.
        self.extracted = self.root / "extracted"
        if create:  # an auditor's read of a backup creates nothing
            for folder in (self.root, self.archives, self.tmp):
                make_dirs(folder)

    def new_upload(self, max_size: int | None = None) -> Upload:
        """Start a streamed upload that refuses to grow past ``max_size`` bytes."""
        return Upload(self, max_size)

    def path(self, sha256: str) -> Path:
        """Where the archive with this sha256 lives; NotFound if it is not stored."""
        path = self._archive_path(sha256)
        if not path.is_file():
            raise NotFound(f"No archive with sha256 {sha256} is stored.")
        return path

    def exists(self, sha256: str) -> bool:
        """Whether the archive with this sha256 is stored (never, for a malformed digest)."""
        if not _is_digest(sha256):
            return False
        return self._archive_path(sha256).is_file()

    def open(self, sha256: str) -> BinaryIO:
        """Open the stored archive for reading; NotFound if it is not stored."""
        try:
            return self.path(sha256).open("rb")
        except FileNotFoundError as e:
            # Purged between the check and the open.
            raise NotFound(f"No archive with sha256 {sha256} is stored.") from e

    def blobs(self) -> Iterator[tuple[str, float]]:
        """Every stored blob's sha256 and the time (``st_mtime``) it was last stored or stored again."""
        for folder in self.archives.iterdir() if self.archives.is_dir() else ():
            if not folder.is_dir():
                continue
            for entry in os.scandir(folder):
                if _is_digest(entry.name):
                    try:
                        yield entry.name, entry.stat().st_mtime
                    except FileNotFoundError:
                        continue  # collected meanwhile

    def collect(self, sha256: str, cutoff: float) -> bool:
        """Remove a blob no event owns, unless an upload stored it again after ``cutoff``; True if removed.

        Only the blob collector calls this, once it knows no committed event
        owns the blob. An upload of the same bytes meanwhile either touched
        the blob before it was moved aside (its time is then after the
        cutoff, and it is put back) or found it gone and stored its own copy
        (``Upload.finish``): either way the upload's event names a blob that
        stays.
        """
        path = self._archive_path(sha256)
        aside = self.tmp / f"{COLLECTING}{sha256}-{uuid.uuid4().hex}"
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return False
        if os.stat(aside).st_mtime > cutoff:
            os.replace(aside, path)  # stored again meanwhile: same bytes, whichever copy stays
            return False
        aside.unlink()
        fsync_dir(path.parent)
        return True

    def leftovers(self, cutoff: float) -> list[Path]:
        """What crashes left older than ``cutoff``: partial uploads, blobs set aside, half-unpacked trees.

        Several processes share the folders, so only age tells a crash's
        leftover from work in progress. The trees that versions before 2.0
        unpacked into ``extracted/`` are leftovers too: nothing reads them.
        """
        found = [p for p in self.tmp.iterdir() if _older(p, cutoff)]
        if self.extracted.is_dir():
            trees = (tree for folder in self.extracted.iterdir() for tree in _entries(folder))
            found.extend(tree for tree in trees if _older(tree, cutoff))
        return found

    def remove_leftover(self, path: Path) -> None:
        """Remove one of :meth:`leftovers`' paths (already gone is fine)."""
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def verify(self, sha256: str) -> bool:
        """Whether the stored bytes still hash to their name; NotFound if not stored."""
        with self.open(sha256) as stored:
            return HashingReader(stored).hexdigest() == sha256

    def store_bytes(self, data: bytes) -> StoredArchive:
        """Store a small payload held in memory, as durably as a streamed upload."""
        with self.new_upload() as upload:
            upload.write(data)
            return upload.finish()

    def _archive_path(self, sha256: str) -> Path:
        _check_digest(sha256)
        return self.archives / sha256[:2] / sha256


class Readable(Protocol):
    """Anything archives are read from: a file, an object store's body, a reader wrapping either."""

    def read(self, size: int = -1, /) -> bytes: ...


class HashingReader:
    """Reads through to ``source``, hashing every byte that goes by."""

    def __init__(self, source: Readable) -> None:
        self._source = source
        self._digest = hashlib.sha256()

    def read(self, size: int = -1, /) -> bytes:
        chunk = self._source.read(size)
        self._digest.update(chunk)
        return chunk

    def hexdigest(self) -> str:
        """The sha256 of the whole source: what is left is read first."""
        while self.read(CHUNK_SIZE):
            pass
        return self._digest.hexdigest()


class Upload:
    """One streamed upload in progress: written to a temp file, hashed and counted as it comes.

    Used as a context manager, leaving the block without ``finish()`` discards it.
    """

    def __init__(self, store: ArchiveStore, max_size: int | None = None) -> None:
        self._store = store
        self._max_size = max_size
        self._digest = hashlib.sha256()
        self._size = 0
        self._head = b""
        self._result: StoredArchive | None = None
        self._aborted = False
        try:
            fd, name = tempfile.mkstemp(prefix="upload-", dir=store.tmp)
        except OSError as e:
            raise_if_full(e)
            raise
        self._temp = Path(name)
        try:
            os.fchmod(fd, FILE_MODE)
            self._file: BinaryIO = os.fdopen(fd, "wb")
        except BaseException:
            os.close(fd)
            self._temp.unlink(missing_ok=True)
            raise

    @property
    def size(self) -> int:
        """How many bytes have been written so far."""
        return self._size

    @property
    def head(self) -> bytes:
        """The first (up to) two bytes written, enough to check the gzip magic."""
        return self._head

    def write(self, chunk: bytes | memoryview) -> None:
        """Append a chunk; TooLarge (and the upload discarded) if it would pass ``max_size``."""
        self._check_open()
        if self._max_size is not None and self._size + len(chunk) > self._max_size:
            self.abort()
            raise TooLarge(f"The upload is larger than the {self._max_size} bytes this exchange accepts.")
        try:
            self._file.write(chunk)
        except OSError as e:
            self.abort()
            raise_if_full(e)
            raise
        self._digest.update(chunk)
        if len(self._head) < 2:
            self._head += bytes(chunk[: 2 - len(self._head)])
        self._size += len(chunk)

    def finish(self) -> StoredArchive:
        """Make the upload durable under its sha256 and say where it is."""
        if self._result is not None:
            return self._result
        self._check_open()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        sha256 = self._digest.hexdigest()
        dest = self._store._archive_path(sha256)
        make_dirs(dest.parent)
        try:
            # The same name means the same bytes: keep the copy already stored,
            # marked as stored again now, so the blob collector leaves it be
            # (see ArchiveStore.collect).
            os.utime(dest)
            self._temp.unlink()
        except FileNotFoundError:
            os.replace(self._temp, dest)
        # Both entries must reach the disk before an event may name this archive.
        fsync_dir(dest.parent)
        fsync_dir(dest.parent.parent)
        self._result = StoredArchive(sha256, self._size, dest)
        return self._result

    def abort(self) -> None:
        """Discard the upload; harmless if already aborted or finished."""
        if self._aborted or self._result is not None:
            return
        self._aborted = True
        with contextlib.suppress(OSError):  # a full disk refuses the buffered rest: it is being discarded anyway
            self._file.close()
        self._temp.unlink(missing_ok=True)

    def __enter__(self) -> Upload:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.abort()

    def _check_open(self) -> None:
        if self._aborted:
            raise ValueError("This upload was aborted.")
        if self._result is not None:
            raise ValueError("This upload is already finished.")


def _entries(folder: Path) -> list[Path]:
    """A folder's entries, or the path itself if it is not a folder."""
    return list(folder.iterdir()) if folder.is_dir() and not folder.is_symlink() else [folder]


def _older(path: Path, cutoff: float) -> bool:
    try:
        return path.lstat().st_mtime < cutoff
    except FileNotFoundError:
        return False


#: The errors that mean "no room": the disk is full, or the store's quota is used up.
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


def raise_if_full(error: OSError) -> None:
    """``InsufficientStorage`` (from ``error``) if the store's disk or quota is full; otherwise nothing."""
    if error.errno in _NO_SPACE:
        raise InsufficientStorage(
            "The exchange's storage is full, so the upload was not stored; try again later and tell "
            "the exchange's operators."
        ) from error


def _is_digest(sha256: str) -> bool:
    return isinstance(sha256, str) and _DIGEST.fullmatch(sha256) is not None


def _check_digest(sha256: str) -> None:
    # Names come from clients: anything but a hex digest could walk out of the store.
    if not _is_digest(sha256):
        raise NotFound(f"{str(sha256)[:80]!r} is not a sha256 hex digest.")


def make_dirs(path: Path) -> None:
    """Create a folder and its missing parents, each with DIR_MODE whatever the umask."""
    missing: list[Path] = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):
        try:
            os.mkdir(folder, DIR_MODE)
        except FileExistsError:
            continue  # made meanwhile by a concurrent upload
        os.chmod(folder, DIR_MODE)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries to disk, so that a rename or an unlink in it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
