"""Check an uploaded gzip'd tar against the unpacking rules, and unpack it safely."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import tempfile
import unicodedata
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, BinaryIO

from nbexchange.errors import UnsafeArchive, UnsupportedMedia
from nbexchange.storage import CHUNK_SIZE, DIR_MODE, FILE_MODE, fsync_dir, make_dirs

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

GZIP_MAGIC = b"\x1f\x8b"

#: Decompressed bytes allowed beyond the members' data, for headers and padding:
#: a fixed part for the end-of-archive blocks, and a part per member for its header,
#: a pax header for a long name, and the padding of its data to 512 bytes.
HEADER_ALLOWANCE = 1024 * 1024
HEADER_ALLOWANCE_PER_MEMBER = 4096

#: Compressed bytes read from the upload at a time.
INFLATE_PIECE = 16 * 1024
#: zlib's window bits for a gzip header and trailer (CRC-32 and length checked).
_GZIP_WBITS = 16 + zlib.MAX_WBITS

#: Linux's limits on one name and on a whole path, in bytes.
MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 4096

_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE)
_REFUSED_TYPES = {
    tarfile.SYMTYPE: "a symbolic link",
    tarfile.LNKTYPE: "a hard link",
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a FIFO",
    tarfile.CONTTYPE: "a contiguous file",
    tarfile.GNUTYPE_SPARSE: "a sparse file",
}


@dataclass(frozen=True)
class ArchiveLimits:
    """Bounds on what one archive may unpack to; ratio is unpacked size over compressed size."""

    max_members: int = 10_000
    max_total_size: int = 2 * 1024**3
    max_ratio: float = 200.0


@dataclass(frozen=True)
class ArchiveReport:
    """What a safe archive holds: files as sorted relative posix paths, notebook ids sorted."""

    members: int
    total_size: int
    files: tuple[str, ...]
    notebooks: tuple[str, ...]


def inspect_archive(path: Path, limits: ArchiveLimits) -> ArchiveReport:
    """Check every member of the gzip'd tar at ``path`` against the rules, extracting nothing.

    Raises UnsupportedMedia if it is not a gzip'd tar, UnsafeArchive if it breaks a rule.
    """
    return _walk(path, limits, None)


def unpack_archive(path: Path, dest: Path, limits: ArchiveLimits) -> ArchiveReport:
    """Check the archive and unpack it to ``dest``, all or nothing; if ``dest`` exists, only report.

    Raises as ``inspect_archive`` does, leaving nothing behind.
    """
    if dest.exists():
        return inspect_archive(path, limits)
    make_dirs(dest.parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        report = _walk(path, limits, staging)
        os.chmod(staging, DIR_MODE)
        for folder, _, _ in os.walk(staging):
            fsync_dir(Path(folder))
        try:
            os.rename(staging, dest)
        except OSError:
            if not dest.is_dir():
                raise
            # Another worker unpacked the same archive first: its tree is as good as ours.
            shutil.rmtree(staging)
        fsync_dir(dest.parent)
        return report
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


class _Checker:
    """The running state of one pass over an archive, and the rules applied member by member."""

    def __init__(self, limits: ArchiveLimits, compressed_size: int) -> None:
        self.limits = limits
        self.compressed_size = compressed_size
        self.inflater: _Inflater | None = None  # set once the archive's stream is opened
        self.members = 0
        self.total_size = 0
        self.last_name = ""
        self.kinds: dict[str, bool] = {}  # name -> is a folder, for every member named so far
        self.parents: set[str] = set()  # folders implied by the members' paths
        self.files: list[str] = []

    def admit(self, member: tarfile.TarInfo) -> str:
        """The member's normalised name if it may be unpacked; UnsafeArchive otherwise."""
        self.members += 1
        raw = member.name
        if self.members > self.limits.max_members:
            raise UnsafeArchive(
                f"The archive has more than {self.limits.max_members} members: stopped at member {raw!r}."
            )
        name = _normalise(raw)
        self.last_name = name
        if member.type in _REFUSED_TYPES or member.issparse():
            # A pax header can make a member of the regular type sparse (GNU.sparse.map).
            kind = _REFUSED_TYPES.get(member.type, _REFUSED_TYPES[tarfile.GNUTYPE_SPARSE])
            raise UnsafeArchive(f"Member {raw!r} is {kind}: only regular files and folders are allowed.")
        is_dir = member.type == tarfile.DIRTYPE
        if not is_dir and member.type not in _FILE_TYPES:
            raise UnsafeArchive(
                f"Member {raw!r} has the unsupported type {member.type!r}: only regular files and folders are allowed."
            )
        if not name:
            if is_dir:
                return name  # "./": the archive's own top folder
            raise UnsafeArchive(f"Member {raw!r} is a file with no name.")
        self._check_place(raw, name, is_dir)
        if not is_dir:
            self.files.append(name)
        return name

    def count(self, raw: str, size: int) -> None:
        """Add bytes actually read from a member, before they are written; UnsafeArchive past a limit.

        Counting what is read, rather than trusting headers, bounds the work a bomb can cause.
        The ratio is taken against the compressed bytes used so far, not the whole file's
        size: a bomb followed by incompressible padding would otherwise be written out
        up to the ratio times the whole file before the padding is reached.
        """
        self.total_size += size
        limits = self.limits
        if self.total_size > limits.max_total_size:
            raise UnsafeArchive(
                f"Member {raw!r} takes the archive past the {limits.max_total_size} bytes it may "
                f"unpack to ({self.total_size} bytes so far)."
            )
        consumed = self.inflater.consumed if self.inflater is not None else self.compressed_size
        if self.total_size > limits.max_ratio * consumed:
            raise UnsafeArchive(
                f"Member {raw!r} takes the archive past its allowed compression ratio: "
                f"{self.total_size} bytes so far from {consumed} compressed bytes, "
                f"more than {limits.max_ratio:g} times."
            )

    def report(self) -> ArchiveReport:
        notebooks = {
            path.stem
            for path in map(PurePosixPath, self.files)
            # nbgrader ignores Jupyter's autosaved copies; they are not notebooks of the assignment.
            if path.suffix == ".ipynb" and ".ipynb_checkpoints" not in path.parts
        }
        return ArchiveReport(
            members=self.members,
            total_size=self.total_size,
            files=tuple(sorted(self.files)),
            notebooks=tuple(sorted(notebooks)),
        )

    def _check_place(self, raw: str, name: str, is_dir: bool) -> None:
        if name in self.kinds:
            raise UnsafeArchive(f"Member {raw!r} appears more than once in the archive.")
        if not is_dir and name in self.parents:
            raise UnsafeArchive(f"Member {raw!r} is a file, but earlier members lie inside it.")
        for parent in PurePosixPath(name).parents:
            if self.kinds.get(str(parent)) is False:
                raise UnsafeArchive(f"Member {raw!r} lies inside {str(parent)!r}, which is a file.")
            self.parents.add(str(parent))
        self.kinds[name] = is_dir


class _BoundedStream(io.RawIOBase):
    """The archive's decompressed bytes, refused past the members' allowance plus headers.

    The members' data is checked member by member; this catches what is not data, such as
    a pax header that would otherwise be read whole into memory.
    """

    def __init__(self, compressed: BinaryIO, checker: _Checker) -> None:
        super().__init__()
        self._inflater = checker.inflater = _Inflater(compressed)
        self._checker = checker
        limits = checker.limits
        data_bound = min(limits.max_total_size, int(limits.max_ratio * checker.compressed_size))
        self._bound = data_bound + HEADER_ALLOWANCE + HEADER_ALLOWANCE_PER_MEMBER * limits.max_members
        self._read = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        with memoryview(buffer) as view:
            count = self._inflater.readinto(view[:CHUNK_SIZE])
        self._read += count
        if self._read > self._bound:
            after = self._checker.last_name
            where = f"after member {after!r}" if after else "before its first member"
            raise UnsafeArchive(f"The archive's headers unpack to more than {self._bound} bytes {where}.")
        return count


class _Inflater(io.RawIOBase):
    """A gzip stream's decompressed bytes, counting exactly the compressed bytes they took.

    ``gzip.GzipFile`` reads ahead of what it has inflated; this feeds zlib small
    pieces and counts what zlib used, so a ratio taken against ``consumed`` is
    the ratio of the bytes unpacked so far.
    """

    def __init__(self, compressed: BinaryIO) -> None:
        super().__init__()
        self._source = compressed
        self._zlib = zlib.decompressobj(_GZIP_WBITS)
        self._input = b""
        self.consumed = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        with memoryview(buffer) as view:
            while True:
                if self._zlib.eof:
                    if not self._next_member():
                        return 0
                if not self._input:
                    self._input = self._source.read(INFLATE_PIECE)
                # At the end of the file zlib may still hold output it had no room for; only then is it cut short.
                out = self._zlib.decompress(self._input, len(view))
                if not out and not self._input and not self._zlib.eof:
                    raise EOFError("the gzip stream is cut short")
                left = self._zlib.unconsumed_tail or self._zlib.unused_data
                self.consumed += len(self._input) - len(left)
                self._input = left
                if out:
                    view[: len(out)] = out
                    return len(out)

    def _next_member(self) -> bool:
        """Start the gzip member that follows the one just ended (``cat a.gz b.gz``); False at the end."""
        if not self._input:
            self._input = self._source.read(INFLATE_PIECE)
        if not self._input:
            return False
        self._zlib = zlib.decompressobj(_GZIP_WBITS)
        return True


def _walk(path: Path, limits: ArchiveLimits, dest: Path | None) -> ArchiveReport:
    """Check every member in order and, given ``dest``, write it there."""
    with open(path, "rb") as compressed:
        if compressed.read(2) != GZIP_MAGIC:
            raise UnsupportedMedia(f"{path.name} is not gzip-compressed.")
        compressed.seek(0)
        checker = _Checker(limits, os.fstat(compressed.fileno()).st_size)
        try:
            with tarfile.open(fileobj=_BoundedStream(compressed, checker), mode="r|") as tar:
                for member in tar:
                    name = checker.admit(member)
                    if member.type == tarfile.DIRTYPE:
                        if dest is not None and name:
                            make_dirs(dest / name)
                        continue
                    source = tar.extractfile(member)
                    assert source is not None  # a regular file always has a stream
                    if dest is None:
                        _copy(source, member.name, checker, None)
                    else:
                        make_dirs((dest / name).parent)
                        _write_file(source, dest / name, member.name, checker)
        except (tarfile.TarError, EOFError, zlib.error) as e:
            raise UnsupportedMedia(f"{path.name} is not a readable gzip'd tar: {e}") from e
    return checker.report()


def _write_file(source: IO[bytes], target: Path, raw: str, checker: _Checker) -> None:
    # O_EXCL and O_NOFOLLOW: never write through anything that is already there.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(target, flags, FILE_MODE)
    with os.fdopen(fd, "wb") as out:
        # The archive's own modes are ignored: no setuid, no executables, no world access.
        os.fchmod(fd, FILE_MODE)
        _copy(source, raw, checker, out)
        out.flush()
        # The finished tree is trusted as complete once renamed into place.
        os.fsync(fd)


def _copy(source: IO[bytes], raw: str, checker: _Checker, out: IO[bytes] | None) -> None:
    """Read a member in chunks, counting each against the limits, and write it to ``out`` if any."""
    while chunk := source.read(CHUNK_SIZE):
        checker.count(raw, len(chunk))
        if out is not None:
            out.write(chunk)


def _normalise(raw: str) -> str:
    """The member's name as a relative posix path without ``./``; UnsafeArchive if unsafe."""
    if not raw:
        raise UnsafeArchive("A member of the archive has an empty name.")
    if any(unicodedata.category(char) == "Cc" for char in raw):
        raise UnsafeArchive(f"Member {raw!r} has a control character in its name.")
    try:
        encoded = raw.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafeArchive(f"Member {raw!r} has a name that is not valid UTF-8.") from None
    if raw.startswith("/"):
        raise UnsafeArchive(f"Member {raw!r} has an absolute path.")
    parts = [part for part in raw.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive(f"Member {raw!r} has a '..' component in its path.")
    if len(encoded) > MAX_PATH_BYTES or any(len(part.encode()) > MAX_NAME_BYTES for part in parts):
        raise UnsafeArchive(f"Member {raw!r} has a name too long for the file system.")
    return "/".join(parts)
