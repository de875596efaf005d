"""Property: what the archive check accepts unpacks, with the plugin's own unpacking, to exactly its files and folders.

Hypothesis writes real gzip'd tars of members of every type (regular, folder,
symlink, hard link, character and block device, FIFO, contiguous, GNU and pax
sparse), under names that are absolute, hold ``..`` or ``.``, are unicode, very
long (pax and GNU long names), not UTF-8, duplicated, or a file shadowing a
folder, with sizes up to a small bomb, under small limits. The check (one
read, nothing written) must refuse each, or accept it with a report that
matches what a notebook server's unpacking (the plugin's ``unpack``) then
writes, all inside its destination. The suite runs a
fixed budget of a few seconds; a long run is::

    NBEX_HYPOTHESIS_PROFILE=long python -m pytest --timeout=0 tests/workers/test_archive_properties.py
"""

from __future__ import annotations

import gzip
import io
import itertools
import os
import stat
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from builders import fix_checksum
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from nbexchange.errors import UnsafeArchive, UnsupportedMedia
from nbexchange.plugin.transfer import unpack
from nbexchange.workers import archives
from nbexchange.workers.archives import ArchiveLimits, inspect_archive

settings.register_profile("archives-ci", max_examples=300, deadline=None)
settings.register_profile("archives-long", max_examples=20_000, deadline=None)
PROFILE = settings.get_profile("archives-" + os.environ.get("NBEX_HYPOTHESIS_PROFILE", "ci"))

FILE = (tarfile.REGTYPE, tarfile.AREGTYPE)
PAX_SPARSE = b"pax-sparse"  # a regular member made sparse by pax headers (GNU sparse 0.1)
KINDS = [
    tarfile.REGTYPE,
    tarfile.AREGTYPE,
    tarfile.DIRTYPE,
    tarfile.SYMTYPE,
    tarfile.LNKTYPE,
    tarfile.CHRTYPE,
    tarfile.BLKTYPE,
    tarfile.FIFOTYPE,
    tarfile.CONTTYPE,
    tarfile.GNUTYPE_SPARSE,
    PAX_SPARSE,
]
#: Path components that each break, or come close to breaking, a rule.
PARTS = [
    "ps1",
    "a.ipynb",
    "données",
    "日本語",
    "..",
    ".",
    "",
    "x" * 120,  # past ustar's 100 bytes: a pax header or a GNU long name
    "n" * 256,  # past a file name's 255 bytes
    "\x00",
    "\x1b[31m",
    "a\u202eb",
    "\udcff",  # a byte that is not UTF-8, as tarfile decodes it
    "\u0085",
]


@dataclass(frozen=True)
class Member:
    name: str
    kind: bytes
    data: bytes
    link: str


hostile_names = st.builds(
    lambda lead, parts, trail: lead + "/".join(parts) + trail,
    st.sampled_from(["", "", "/", "./"]),
    st.lists(
        st.sampled_from(PARTS) | st.text(st.characters(exclude_categories=["Cc", "Cs"]), min_size=1, max_size=8),
        min_size=1,
        max_size=4,
    ),
    st.sampled_from(["", "", "/"]),
)
# Safe names (often colliding, or a file under another file) keep enough archives acceptable to test unpacking.
safe_names = st.lists(st.sampled_from(["ps1", "a.ipynb", "données", "x" * 120]), min_size=1, max_size=3).map("/".join)
names = st.sampled_from([safe_names] * 3 + [hostile_names]).flatmap(lambda s: s)
kinds = st.sampled_from([tarfile.REGTYPE] * 4 + [tarfile.DIRTYPE] * 2 + KINDS)
# Mostly small bytes; one time in four, zeros up to a small bomb.
contents = st.sampled_from([st.binary(max_size=512)] * 3 + [st.integers(0, 300_000).map(bytes)]).flatmap(lambda s: s)
members = st.builds(Member, names, kinds, contents, names)
limits = st.builds(
    ArchiveLimits,
    max_members=st.sampled_from([2, 12]),
    max_total_size=st.sampled_from([1024, 64 * 1024, 1024 * 1024]),
    max_ratio=st.sampled_from([2.0, 200.0, 1000.0]),
)


def write(path: Path, chosen: list[Member], form: int) -> None:
    """A real gzip'd tar holding ``chosen`` in order (``assume`` away what tarfile itself cannot write)."""
    with tarfile.open(path, "w:gz", format=form) as tar:
        for m in chosen:
            info = tarfile.TarInfo(m.name)
            info.type = tarfile.REGTYPE if m.kind == PAX_SPARSE else m.kind
            info.linkname = m.link if m.kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
            has_data = m.kind in (*FILE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE, PAX_SPARSE)
            info.size = len(m.data) if has_data else 0
            if m.kind == PAX_SPARSE:
                info.pax_headers = {
                    "GNU.sparse.major": "0",
                    "GNU.sparse.minor": "1",
                    "GNU.sparse.map": f"0,{len(m.data)}",
                    "GNU.sparse.size": str(len(m.data) + 4096),
                }
            try:
                tar.addfile(info, io.BytesIO(m.data) if has_data else None)
            except (ValueError, UnicodeError):  # e.g. a NUL or an unencodable name in this format
                assume(False)


def canonical(name: str) -> str:
    return "/".join(part for part in name.split("/") if part not in ("", "."))


def read_back(path: Path) -> list[tuple[str, bytes, bytes]]:
    """Each member as a tar reader sees it (name, type, bytes): the writer may have changed what was asked.

    ustar cuts a name at a NUL, and a V7 file whose name ends in '/' is read as a folder (its data
    then read as the next header).
    """
    with tarfile.open(path, "r|gz") as tar:
        return [
            (m.name, m.type, tar.extractfile(m).read() if m.isreg() and not m.issparse() else b"")  # type: ignore[union-attr]
            for m in tar
        ]


def tree(root: Path) -> tuple[dict[str, bytes], set[str]]:
    """Files (with bytes) and folders under ``root``; fails on anything else, links included."""
    files: dict[str, bytes] = {}
    folders: set[str] = set()
    for folder, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            path = Path(folder) / name
            mode = path.lstat().st_mode
            relative = path.relative_to(root).as_posix()
            assert os.path.realpath(path).startswith(str(root.resolve()) + os.sep), relative
            if stat.S_ISDIR(mode):
                folders.add(relative)
            else:
                assert stat.S_ISREG(mode), f"{relative} is neither a file nor a folder"
                assert stat.S_IMODE(mode) & 0o7000 == 0, f"{relative} is setuid, setgid or sticky"
                files[relative] = path.read_bytes()
    return files, folders


@pytest.mark.hostile(
    "Archives",
    "generated archives (hypothesis): members of every type (file, folder, symlink, hard link, devices, FIFO, "
    "contiguous, GNU and pax sparse) under absolute, '..', unicode, non-UTF-8, very long, duplicated and "
    "shadowing names, sizes up to a small bomb, under small limits",
    "refused with 415/422 (never another error), or accepted with a report of exactly the regular files and "
    "folders that the plugin's unpacking then writes, all inside the destination",
)
@settings(PROFILE, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(
    chosen=st.lists(members, max_size=6), bounds=limits, form=st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
)
def test_accepts_only_what_unpacks_to_exactly_its_files_inside_the_destination(
    chosen: list[Member], bounds: ArchiveLimits, form: int
) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        archive = root / "upload.tar.gz"
        write(archive, chosen, form)
        dest = root / "out" / "tree"
        try:
            with archive.open("rb") as source:
                report = inspect_archive(source, bounds)
        except (UnsafeArchive, UnsupportedMedia) as e:
            event(f"refused: {type(e).__name__}")
            assert sorted(p.name for p in root.iterdir()) == ["upload.tar.gz"]  # the check writes nothing
            return
        event("unpacked" if report.files else "unpacked, no files")
        inside = read_back(archive)
        kinds = {kind for _, kind, _ in inside}
        assert kinds <= {*FILE, tarfile.DIRTYPE}, f"accepted members of the types {kinds}"
        regular = [(name, data) for name, kind, data in inside if kind in FILE]
        expected = {canonical(name): data for name, data in regular}
        assert len(expected) == len(regular), "two members were accepted for one path"
        unpack(str(archive), str(dest))  # as a notebook server unpacks what it fetched or collected
        files, folders = tree(dest)
        assert files == expected
        assert folders == {canonical(name) for name, kind, _ in inside if kind == tarfile.DIRTYPE} - {""} | {
            "/".join(name.split("/")[:i]) for name in [*files, *folders] for i in range(1, name.count("/") + 1)
        }
        assert report.files == tuple(sorted(expected))
        assert report.total_size == sum(map(len, expected.values())) <= bounds.max_total_size
        assert report.members <= bounds.max_members
        for name in [*files, *folders]:
            parts = name.split("/")
            assert ".." not in parts and all(0 < len(p.encode()) <= 255 for p in parts)
        assert sorted(p.name for p in (root / "out").iterdir()) == ["tree"]


@settings(PROFILE)
@given(
    members=st.lists(st.binary(max_size=4096) | st.integers(0, 200_000).map(bytes), min_size=1, max_size=3),
    level=st.integers(0, 9),
    reads=st.lists(st.integers(1, 70_000), min_size=1, max_size=8),
)
def test_the_inflater_reads_what_gzip_wrote_and_counts_every_compressed_byte(
    members: list[bytes], level: int, reads: list[int]
) -> None:
    compressed = b"".join(gzip.compress(data, compresslevel=level) for data in members)
    inflater = archives._Inflater(io.BytesIO(compressed))
    out = bytearray()
    for size in itertools.cycle(reads):
        piece = inflater.inflate(size)
        if not piece:
            break
        assert len(piece) <= size
        out += piece
        # Never more unpacked than the compressed bytes used could hold (deflate's limit is 1032:1).
        assert len(out) <= 1032 * inflater.consumed + 1032
    assert bytes(out) == b"".join(members)
    assert inflater.consumed == len(compressed)
    with pytest.raises((EOFError, archives._INFLATE_ERROR)):
        cut = archives._Inflater(io.BytesIO(compressed[:-1]))
        while cut.inflate(65536):
            pass


def _inspected_with(inflate: Any, data: bytes, bounds: ArchiveLimits) -> tuple[str, object]:
    """The check's verdict on ``data`` with this inflating module: its report, or that it refused."""
    with pytest.MonkeyPatch.context() as patch:
        unreadable = tuple(inflate.error if e is archives._INFLATE_ERROR else e for e in archives.UNREADABLE)
        patch.setattr(archives, "zlib_ng", inflate)
        patch.setattr(archives, "_INFLATE_ERROR", inflate.error)
        patch.setattr(archives, "UNREADABLE", unreadable)
        try:
            return "accepted", inspect_archive(io.BytesIO(data), bounds)
        except (UnsafeArchive, UnsupportedMedia):
            return "refused", None


# Files and folders under safe names: most archives are acceptable as written, so the changes decide.
plain_members = st.builds(
    Member, safe_names, st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE]), contents, st.just("")
)
mutations = st.one_of(
    st.just(("as written", 0, b"")),
    st.tuples(st.just("byte changed"), st.integers(0, 2**31), st.integers(1, 255).map(lambda b: bytes([b]))),
    st.tuples(st.just("cut short"), st.integers(0, 2**31), st.just(b"")),
    st.tuples(st.just("bytes after"), st.just(0), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("a second member after"), st.just(0), st.binary(max_size=600).map(gzip.compress)),
    # In the tar itself: a header field's byte set (the header's checksum made right again, so that tarfile
    # parses what follows), the tar then whole or ending within the next two blocks.
    st.tuples(
        st.sampled_from(["tar header changed", "tar header changed, then cut"]),
        st.integers(0, 2**31),
        st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 16)).map(bytes),
    ),
)
#: Where a tar header's fields start (ustar, and GNU's sparse map, isextended and real size).
HEADER_FIELDS = [0, 100, 108, 116, 124, 136, 148, 156, 157, 257, 263, 265, 297, 329, 337, 345, 386, 482, 483]


def mutated(chosen: list[Member], form: int, change: tuple[str, int, bytes]) -> bytes:
    """The gzip'd tar of ``chosen``, then changed as ``change`` (one of ``mutations``) says."""
    how, where, extra = change
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "upload.tar.gz"
        write(path, chosen, form)
        data = path.read_bytes()
    if how == "byte changed":
        at = where % len(data)
        return data[:at] + bytes([data[at] ^ extra[0]]) + data[at + 1 :]
    if how == "cut short":
        return data[: where % len(data)]
    if how.startswith("tar header changed"):
        tar = bytearray(gzip.decompress(data))
        block = where % (len(tar) // 512) * 512
        field, value, cut = extra
        tar[block + HEADER_FIELDS[field % len(HEADER_FIELDS)]] = value
        fix_checksum(tar, block)
        if how.endswith("cut"):
            del tar[block + 512 + 64 * cut :]
        return gzip.compress(bytes(tar))
    return data + extra


@settings(PROFILE, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(
    chosen=st.lists(plain_members, max_size=4),
    form=st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT]),
    change=mutations,
)
def test_zlib_ng_accepts_exactly_what_the_standard_zlib_accepts(
    chosen: list[Member], form: int, change: tuple[str, int, bytes]
) -> None:
    """The check inflates with zlib-ng for speed; it must not accept a stream the standard library's zlib refuses.

    Valid archives, and the same with a byte changed (header, deflate data, CRC-32 or length), cut
    short, or followed by other bytes or another gzip member: accepted by both with the same report,
    or refused by both.
    """
    data = mutated(chosen, form, change)
    bounds = ArchiveLimits()
    verdict = _inspected_with(archives.zlib_ng, data, bounds)
    event(f"{change[0]}: {verdict[0]}")
    assert verdict == _inspected_with(zlib, data, bounds)


def _read_through_verdict(data: bytes, bounds: ArchiveLimits) -> tuple[str, object]:
    """The reference: tarfile's stream mode reads every byte, each file's data read through, then the rest.

    The same rules (``_Checker``) and the same inflater, but none of the walk's
    skipping: what the check accepted when it read the archive this way, with
    the gzip stream then inflated to its end.
    """
    if data[: len(archives.GZIP_MAGIC)] != archives.GZIP_MAGIC:
        return "refused", None
    checker = archives._Checker(bounds)
    inflater = checker.inflater = archives._Inflater(io.BytesIO(data))
    try:
        # tarfile's stream mode only calls read(n), which inflate is.
        with tarfile.open(fileobj=SimpleNamespace(read=inflater.inflate), mode="r|") as tar:
            for member in tar:
                checker.admit(member)
                if member.type in FILE:
                    stream = tar.extractfile(member)
                    assert stream is not None
                    while chunk := stream.read(65536):
                        checker.count(member.name, len(chunk))
        while inflater.inflate(65536):
            pass
    except (UnsafeArchive, *archives.UNREADABLE):
        return "refused", None
    return "accepted", checker.report()


@settings(PROFILE, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(
    chosen=st.lists(plain_members | members, max_size=5),
    form=st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT]),
    change=mutations,
    bounds=limits.map(lambda b: ArchiveLimits(b.max_members, b.max_total_size, max_ratio=1e9)),
)
def test_the_walk_accepts_exactly_what_reading_every_byte_accepts(
    chosen: list[Member], form: int, change: tuple[str, int, bytes], bounds: ArchiveLimits
) -> None:
    """The walk inflates and drops the members' data rather than reading it through tarfile's stream.

    Against the reference that reads every byte: archives of every kind of
    member, as written or with a byte changed, cut short, or followed by other
    bytes or another gzip member, are accepted by both with the same report or
    refused by both. (The ratio is left out: the two take it at different
    points; tests/workers/test_archives.py holds the walk to it.)
    """
    data = mutated(chosen, form, change)
    try:
        verdict: tuple[str, object] = ("accepted", inspect_archive(io.BytesIO(data), bounds))
    except (UnsafeArchive, UnsupportedMedia):
        verdict = ("refused", None)
    event(f"{change[0]}: {verdict[0]}")
    assert verdict == _read_through_verdict(data, bounds)
