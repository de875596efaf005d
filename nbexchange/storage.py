"""Durable, content-addressed storage of uploaded archives, each named by the sha256 of its bytes.

``ArchiveStore`` is what the exchange needs of a store; ``LocalArchiveStore``
keeps the blobs in a folder (the default), ``storage_s3.S3ArchiveStore`` in
an S3-compatible object store. ``open_archive_store`` builds the one the
settings choose.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import re
import shutil
import tempfile
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, BinaryIO, Protocol

from nbexchange.errors import ExchangeError, InsufficientStorage, NotFound, TooLarge

if TYPE_CHECKING:
    from nbexchange.app import NbExchange

FILE_MODE = 0o640
DIR_MODE = 0o750
#: How much is read or hashed at a time: files are never held whole in memory.
CHUNK_SIZE = 1024 * 1024
#: A stored blob's read buffer: small enough that what it holds is still in the CPU's cache when it is
#: used (a check that hashes and inflates a 1 MB archive took 2.1 ms of CPU with a 1 MB buffer, 1.4-1.5 ms
#: with this).
READ_BUFFER = 256 * 1024

_DIGEST = re.compile(r"[0-9a-f]{64}")

#: The prefix, in ``tmp/``, of a blob the collector has set aside to remove.
COLLECTING = "collecting-"


@dataclass(frozen=True)
class StoredArchive:
    """An archive safely stored: its sha256 (hex) and its size in bytes."""

    sha256: str
    size: int


class BlobReader(io.BufferedReader):
    """A stored blob opened for reading, as a stream; ``size`` is its length in bytes."""

    def __init__(self, raw: io.RawIOBase, size: int) -> None:
        super().__init__(raw, READ_BUFFER)
        self.size = size


class ArchiveStore(ABC):
    """Where the blobs live, each named by its sha256; uploads in progress wait in ``tmp`` on local disk.

    Every implementation keeps the same promises: an upload streams to a
    temp file (bounded memory) and is durable once ``Upload.finish``
    returns; the same bytes are stored once and shared; ``open`` streams;
    ``collect`` never removes a blob an upload stored again after the
    cutoff.
    """

    tmp: Path
    #: Whether an upload's temp file is flushed to disk before ``_keep`` (it is when it becomes the blob).
    sync_temp = True

    def new_upload(self, max_size: int | None = None) -> Upload:
        """Start a streamed upload that refuses to grow past ``max_size`` bytes."""
        return Upload(self, max_size)

    def store_bytes(self, data: bytes) -> StoredArchive:
        """Store a small payload held in memory, as durably as a streamed upload."""
        with self.new_upload() as upload:
            upload.write(data)
            return upload.finish()

    @abstractmethod
    def exists(self, sha256: str) -> bool:
        """Whether the archive with this sha256 is stored (never, for a malformed digest)."""

    @abstractmethod
    def open(self, sha256: str) -> BlobReader:
        """Open the stored archive for reading, as a stream; NotFound if it is not stored."""

    @abstractmethod
    def blobs(self) -> Iterator[tuple[str, float]]:
        """Every stored blob's sha256 and the time it was last stored or stored again (seconds since the epoch)."""

    @abstractmethod
    def collect(self, sha256: str, cutoff: float) -> bool:
        """Remove a blob no event owns, unless an upload stored it again after ``cutoff``; True if removed.

        Only the blob collector calls this, once it knows no committed event
        owns the blob. An upload of the same bytes meanwhile must end with
        the blob stored: its event names a blob that stays.
        """

    @abstractmethod
    def remove_leftovers(self, cutoff: float) -> list[str]:
        """Remove what crashes left older than ``cutoff`` (partial uploads, blobs set aside…); name each.

        Several processes share the store, so only age tells a crash's
        leftover from work in progress.
        """

    @abstractmethod
    def _keep(self, temp: Path, sha256: str) -> None:
        """Make the finished temp file durable as the blob ``sha256`` (or rely on the copy stored), removing it."""

    def verify(self, sha256: str) -> bool:
        """Whether the stored bytes still hash to their name; NotFound if not stored."""
        with self.open(sha256) as stored:
            return HashingReader(stored).hexdigest() == sha256


def open_archive_store(settings: NbExchange, create: bool = True) -> ArchiveStore:
    """The store the settings choose (``blob_store``); with ``create`` False, one that writes nothing."""
    tmp = Path(settings.base_storage_location) / "tmp"
    if settings.blob_store == "s3":
        # Imported here: the default local store needs no AWS SDK loaded.
        from nbexchange.storage_s3 import S3ArchiveStore

        if not settings.s3_bucket:
            raise ExchangeError("blob_store is 's3' but no s3_bucket is set.")
        return S3ArchiveStore(
            bucket=settings.s3_bucket,
            prefix=settings.s3_prefix,
            tmp=tmp,
            endpoint_url=settings.s3_endpoint_url or None,
            region=settings.s3_region or None,
            addressing_style=settings.s3_addressing_style,
            create=create,
            create_bucket=settings.s3_create_bucket,
        )
    return LocalArchiveStore(Path(settings.base_storage_location), create=create)


class LocalArchiveStore(ArchiveStore):
    """Archives under ``root/archives/ab/<sha256>``; uploads in progress under ``root/tmp``."""

    def __init__(self, root: Path, create: bool = True) -> None:
        self.root = Path(root)
        self.archives = self.root / "archives"
        self.tmp = self.root / "tmp"
        #: Where versions before 2.0 unpacked each archive; nothing reads it now, and the collector empties it.
        self.extracted = self.root / "extracted"
        #: Shards whose entry in ``archives`` this process has flushed to disk since it saw them exist.
        self._durable_shards: set[str] = set()
        if create:  # an auditor's read of a backup creates nothing
            for folder in (self.root, self.archives, self.tmp):
                make_dirs(folder)

    def __repr__(self) -> str:
        return f"LocalArchiveStore({str(self.root)!r})"

    def path(self, sha256: str) -> Path:
        """Where the archive with this sha256 lives; NotFound if it is not stored."""
        path = self._archive_path(sha256)
        if not path.is_file():
            raise NotFound(f"No archive with sha256 {sha256} is stored.")
        return path

    def exists(self, sha256: str) -> bool:
        if not is_digest(sha256):
            return False
        return self._archive_path(sha256).is_file()

    def open(self, sha256: str) -> BlobReader:
        try:
            raw = io.FileIO(self.path(sha256), "r")
        except FileNotFoundError as e:
            # Purged between the check and the open.
            raise NotFound(f"No archive with sha256 {sha256} is stored.") from e
        return BlobReader(raw, os.fstat(raw.fileno()).st_size)

    def blobs(self) -> Iterator[tuple[str, float]]:
        for folder in self.archives.iterdir() if self.archives.is_dir() else ():
            if not folder.is_dir():
                continue
            for entry in os.scandir(folder):
                if is_digest(entry.name):
                    try:
                        yield entry.name, entry.stat().st_mtime
                    except FileNotFoundError:
                        continue  # collected meanwhile

    def collect(self, sha256: str, cutoff: float) -> bool:
        """As the base's: an upload meanwhile either touched the blob before it was moved aside (its time is
        then after the cutoff, and it is put back) or found it gone and stored its own copy (``_keep``)."""
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

    def remove_leftovers(self, cutoff: float) -> list[str]:
        """Partial uploads, blobs set aside, and the trees versions before 2.0 unpacked (:meth:`leftovers`)."""
        found = self.leftovers(cutoff)
        for path in found:
            self.remove_leftover(path)
        return [str(path) for path in found]

    def leftovers(self, cutoff: float) -> list[Path]:
        """What crashes left older than ``cutoff``: partial uploads, blobs set aside, half-unpacked trees.

        Several processes share the folders, so only age tells a crash's
        leftover from work in progress. The trees that versions before 2.0
        unpacked into ``extracted/`` are leftovers too: nothing reads them.
        """
        found = [p for p in self.tmp.iterdir() if older_than(p, cutoff)]
        if self.extracted.is_dir():
            trees = (tree for folder in self.extracted.iterdir() for tree in _entries(folder))
            found.extend(tree for tree in trees if older_than(tree, cutoff))
        return found

    def remove_leftover(self, path: Path) -> None:
        """Remove one of :meth:`leftovers`' paths (already gone is fine)."""
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    def _keep(self, temp: Path, sha256: str) -> None:
        dest = self._archive_path(sha256)
        make_dirs(dest.parent)
        try:
            # The same name means the same bytes: keep the copy already stored,
            # marked as stored again now, so the blob collector leaves it be
            # (see collect).
            os.utime(dest)
            temp.unlink()
        except FileNotFoundError:
            os.replace(temp, dest)
        # Both entries must reach the disk before an event may name this archive: the blob's in its shard,
        # each time; the shard's in ``archives``, once (nothing removes a shard, so once flushed, it stays).
        fsync_dir(dest.parent)
        shard = dest.parent.name
        if shard not in self._durable_shards:
            fsync_dir(self.archives)
            self._durable_shards.add(shard)

    def _archive_path(self, sha256: str) -> Path:
        check_digest(sha256)
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
        if self._store.sync_temp:
            os.fsync(self._file.fileno())
        self._file.close()
        sha256 = self._digest.hexdigest()
        self._store._keep(self._temp, sha256)
        self._result = StoredArchive(sha256, self._size)
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


def older_than(path: Path, cutoff: float) -> bool:
    """Whether ``path`` was last changed before ``cutoff`` (False if it is gone)."""
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


def is_digest(sha256: str) -> bool:
    """Whether ``sha256`` is a sha256 as the store spells it: 64 lower-case hex digits."""
    return isinstance(sha256, str) and _DIGEST.fullmatch(sha256) is not None


def check_digest(sha256: str) -> None:
    """NotFound unless ``sha256`` is a digest (``is_digest``)."""
    # Names come from clients: anything but a hex digest could walk out of the store.
    if not is_digest(sha256):
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
