"""Check an uploaded gzip'd tar against the unpacking rules, reading it once and writing nothing."""

from __future__ import annotations

import io
import tarfile
import unicodedata
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import cast

from zlib_ng import zlib_ng

from nbexchange.errors import UnsafeArchive, UnsupportedMedia
from nbexchange.storage import Readable

GZIP_MAGIC = b"\x1f\x8b"

#: Decompressed bytes allowed beyond the members' data, for headers and padding:
#: a fixed part for the end-of-archive blocks, and a part per member for its header,
#: a pax header for a long name, and the padding of its data to 512 bytes.
HEADER_ALLOWANCE = 1024 * 1024
HEADER_ALLOWANCE_PER_MEMBER = 4096

#: Compressed bytes read from the upload at a time (``consumed`` stays exact whatever the size).
INFLATE_PIECE = 64 * 1024
#: Decompressed bytes inflated at a time. Pieces of a megabyte cost more than their inflating
#: (each a fresh allocation, its pages faulted in): a 1 MB archive took 2.4-2.8 ms of CPU to
#: check with them, 0.7-0.9 ms with pieces of 64-128 KiB.
UNPACKED_PIECE = 128 * 1024
#: zlib's window bits for a gzip header and trailer (CRC-32 and length checked).
_GZIP_WBITS = 16 + zlib_ng.MAX_WBITS
#: What zlib-ng raises on a stream it cannot inflate (its type stub calls it an instance).
_INFLATE_ERROR = cast("type[Exception]", zlib_ng.error)

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


#: What reading an archive raises when its bytes are not a readable gzip'd tar. tarfile raises ValueError or
#: IndexError, not a TarError, for some headers it cannot read (numbers in pax headers: GNU.sparse.size,
#: .map, .realsize, a 1.0 sparse map; a GNU sparse member whose extension blocks are cut short): refused
#: like any other unreadable header. The source's own failures (OSError, Unavailable) are not here: the
#: check is tried again, not decided.
UNREADABLE: tuple[type[Exception], ...] = (tarfile.TarError, EOFError, ValueError, IndexError, _INFLATE_ERROR)


def inspect_archive(source: Readable, limits: ArchiveLimits) -> ArchiveReport:
    """Check every member of the gzip'd tar read from ``source`` against the rules, writing nothing.

    The archive is read once, as a stream (it need not be seekable), and never
    unpacked: the rules are proved on the members' headers and on counts of
    their bytes as they go by; the members' data is inflated and dropped, and
    so is whatever follows the tar's end, so that every gzip member's CRC-32
    and length are checked to the end of the file. Raises UnsupportedMedia if
    it is not a gzip'd tar, UnsafeArchive at the first member that breaks a
    rule (reading no further).
    """
    head = source.read(len(GZIP_MAGIC))
    if head != GZIP_MAGIC:
        raise UnsupportedMedia("The archive is not gzip-compressed.")
    checker = _Checker(limits)
    try:
        unpacked = _Unpacked(_Inflater(source, head), checker)
        # tarfile's seekable mode reads the headers and seeks past the data, which _Unpacked
        # inflates and drops; its stream mode would copy every byte through two more buffers.
        # (typeshed's file type also asks for write and close, which reading never calls.)
        with tarfile.open(fileobj=unpacked, mode="r:") as tar:  # type: ignore[call-overload]
            for member in tar:
                checker.admit(member)
                if member.type in _FILE_TYPES:
                    unpacked.skip_data(member)
        unpacked.skip_rest()
    except UNREADABLE as e:
        raise UnsupportedMedia(f"The archive is not a readable gzip'd tar: {e}") from e
    return checker.report()


class _Checker:
    """The running state of one pass over an archive, and the rules applied member by member."""

    def __init__(self, limits: ArchiveLimits) -> None:
        self.limits = limits
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
        if not is_dir and raw.rsplit("/", 1)[-1] in ("", "."):
            # Unpackers disagree on such a file: tarfile makes a folder of it and fails to write it.
            raise UnsafeArchive(f"Member {raw!r} is a file whose name ends like a folder's ('/' or '/.').")
        self._check_place(raw, name, is_dir)
        if not is_dir:
            self.files.append(name)
        return name

    def count(self, raw: str, size: int) -> None:
        """Add bytes actually read from a member; UnsafeArchive past a limit.

        Counting what is read, rather than trusting headers, bounds the work a bomb can cause.
        The ratio is taken against the compressed bytes used so far, not the whole file's
        size: a bomb followed by incompressible padding would otherwise be read
        up to the ratio times the whole file before the padding is reached.
        """
        self.total_size += size
        limits = self.limits
        if self.total_size > limits.max_total_size:
            raise UnsafeArchive(
                f"Member {raw!r} takes the archive past the {limits.max_total_size} bytes it may "
                f"unpack to ({self.total_size} bytes so far)."
            )
        consumed = self.inflater.consumed if self.inflater is not None else 0
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


class _Unpacked:
    """The archive's decompressed bytes as tarfile's seekable mode reads them: forward only, data dropped.

    tarfile reads the headers (``read``) and moves past the members' data
    (``seek``); the walk moves past each regular file's data first
    (``skip_data``), counting it against the member's limits as it is
    inflated. Nothing is copied but the headers. Every byte inflated, header
    or data, also counts against the members' allowance plus headers: this
    catches what is not data, such as a pax header that would otherwise be
    read whole into memory. Like the members' ratio, the allowance grows with
    the compressed bytes used so far.
    """

    def __init__(self, inflater: _Inflater, checker: _Checker) -> None:
        self._inflater = checker.inflater = inflater
        self._checker = checker
        self._headers = HEADER_ALLOWANCE + HEADER_ALLOWANCE_PER_MEMBER * checker.limits.max_members
        self._inflated = 0
        self._pending = memoryview(b"")  # inflated, not yet read or skipped
        self._position = 0

    def tell(self) -> int:
        return self._position

    def read(self, size: int) -> bytes:
        """The next ``size`` bytes, fewer only at the end."""
        pieces = []
        while size > 0 and (piece := self._take(size)):
            pieces.append(piece)
            size -= len(piece)
        return b"".join(pieces)

    def seek(self, position: int, whence: int = io.SEEK_SET) -> int:
        """Move forward to ``position`` (or to the end, if it comes first)."""
        if whence != io.SEEK_SET or position < self._position:
            raise io.UnsupportedOperation("The archive's bytes are read forward only.")
        left = position - self._position
        while left > 0 and (piece := self._take(left)):
            left -= len(piece)
        return self._position

    def skip_data(self, member: tarfile.TarInfo) -> None:
        """Move past the data of ``member`` (just read), counting it against the limits as it is inflated."""
        left = member.size
        while left > 0:
            piece = self._take(left)
            if not piece:
                raise tarfile.ReadError("unexpected end of data")
            self._checker.count(member.name, len(piece))
            left -= len(piece)

    def skip_rest(self) -> None:
        """Inflate what follows the tar's end to the end of the file (padding, trailers), checking it."""
        while self._take(UNPACKED_PIECE):
            pass

    def _take(self, most: int) -> memoryview:
        """The next up to ``most`` inflated bytes; empty at the end."""
        if not self._pending:
            self._pending = memoryview(self._inflate())
        piece = self._pending[:most]
        self._pending = self._pending[len(piece) :]
        self._position += len(piece)
        return piece

    def _inflate(self) -> bytes:
        out = self._inflater.inflate(UNPACKED_PIECE)
        self._inflated += len(out)
        limits = self._checker.limits
        bound = min(limits.max_total_size, int(limits.max_ratio * self._inflater.consumed)) + self._headers
        if self._inflated > bound:
            after = self._checker.last_name
            where = f"after member {after!r}" if after else "before its first member"
            raise UnsafeArchive(f"The archive's headers unpack to more than {bound} bytes {where}.")
        return out


class _Inflater:
    """A gzip stream's decompressed bytes, counting exactly the compressed bytes they took.

    ``gzip.GzipFile`` reads ahead of what it has inflated; this feeds zlib small
    pieces and counts what zlib used, so a ratio taken against ``consumed`` is
    the ratio of the bytes unpacked so far.

    It inflates with zlib-ng (the same API and the same deflate, refusing the
    same streams: tests/workers/test_archive_properties.py compares the two),
    whose CRC-32 and copies are vectorised: a 1 MB archive's check took
    0.67-1.02 ms of CPU with the standard library's zlib, 0.44-0.45 with it;
    notebooks that compress 45:1, 1.07-1.31 against 0.65.
    """

    def __init__(self, compressed: Readable, already_read: bytes = b"") -> None:
        self._source = compressed
        self._zlib = zlib_ng.decompressobj(_GZIP_WBITS)
        self._input = already_read  # bytes taken from the source before (the gzip magic)
        self.consumed = 0

    def inflate(self, most: int) -> bytes:
        """The next up to ``most`` decompressed bytes; empty at the end of the file."""
        while True:
            if self._zlib.eof and not self._next_member():
                return b""
            if not self._input:
                self._input = self._source.read(INFLATE_PIECE)
            # At the end of the file zlib may still hold output it had no room for; only then is it cut short.
            out = self._zlib.decompress(self._input, most)
            if not out and not self._input and not self._zlib.eof:
                raise EOFError("the gzip stream is cut short")
            left = self._zlib.unconsumed_tail or self._zlib.unused_data
            self.consumed += len(self._input) - len(left)
            self._input = left
            if out:
                return out

    def _next_member(self) -> bool:
        """Start the gzip member that follows the one just ended (``cat a.gz b.gz``); False at the end."""
        if not self._input:
            self._input = self._source.read(INFLATE_PIECE)
        if not self._input:
            return False
        self._zlib = zlib_ng.decompressobj(_GZIP_WBITS)
        return True


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
