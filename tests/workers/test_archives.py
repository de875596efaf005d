"""Tests for checking archives: every unpacking rule, on real tar.gz files read once as streams."""

from __future__ import annotations

import gzip
import io
import os
import re
import tarfile
from collections.abc import Sequence
from pathlib import Path

import pytest
from builders import UNREADABLE_PAX, fix_checksum, make_archive

from nbexchange.errors import UnsafeArchive, UnsupportedMedia
from nbexchange.workers import archives
from nbexchange.workers.archives import ArchiveLimits, ArchiveReport, inspect_archive

LIMITS = ArchiveLimits()

Member = tuple[tarfile.TarInfo, bytes | None]


def entry(
    name: str,
    data: bytes | None = b"",
    kind: bytes = tarfile.REGTYPE,
    mode: int = 0o644,
    linkname: str = "",
) -> Member:
    """A tar member: a file with ``data``, or any other kind (``data=None``)."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.linkname = linkname
    if data is not None:
        info.size = len(data)
    return info, data


def folder(name: str, mode: int = 0o755) -> Member:
    return entry(name, None, tarfile.DIRTYPE, mode)


def build(path: Path, members: Sequence[Member]) -> Path:
    """Write a real gzip'd tar holding ``members`` in that order."""
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


class Unseekable:
    """A file read forward only, as an object store's body is; counts the bytes taken from it."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("rb")
        self.taken = 0

    def read(self, size: int = -1, /) -> bytes:
        chunk = self._file.read(size)
        self.taken += len(chunk)
        return chunk

    def close(self) -> None:
        self._file.close()


def inspect(path: Path, limits: ArchiveLimits) -> ArchiveReport:
    """Check the archive at ``path`` as the worker does: one forward read of a stream."""
    source = Unseekable(path)
    try:
        return inspect_archive(source, limits)
    finally:
        source.close()


NOTEBOOK = b'{"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}'

GOOD = [
    folder("ps1"),
    entry("ps1/problem1.ipynb", NOTEBOOK),
    folder("ps1/data"),
    entry("ps1/data/input.csv", b"a,b\n1,2\n"),
    entry("ps1/extra/deep/problem2.ipynb", NOTEBOOK + b" "),  # folders implied, never listed
    entry("ps1/extra/problem1.ipynb", NOTEBOOK),  # same notebook id in another folder
    entry("ps1/.ipynb_checkpoints/problem1-checkpoint.ipynb", NOTEBOOK),
    entry("ps1/run.sh", b"#!/bin/sh\n", mode=0o4755),  # setuid in the archive
    entry("ps1/empty.txt", b""),
    entry("ps1/données.txt", "é".encode()),
]


def test_good_archive_report(tmp_path: Path) -> None:
    archive = build(tmp_path / "good.tar.gz", GOOD)
    report = inspect(archive, LIMITS)
    assert report == ArchiveReport(
        members=10,
        total_size=sum(len(data) for _, data in GOOD if data),
        files=(
            "ps1/.ipynb_checkpoints/problem1-checkpoint.ipynb",
            "ps1/data/input.csv",
            "ps1/données.txt",
            "ps1/empty.txt",
            "ps1/extra/deep/problem2.ipynb",
            "ps1/extra/problem1.ipynb",
            "ps1/problem1.ipynb",
            "ps1/run.sh",
        ),
        notebooks=("problem1", "problem2"),
    )


def test_inspect_extracts_nothing(tmp_path: Path) -> None:
    archive = build(tmp_path / "good.tar.gz", GOOD)
    inspect(archive, LIMITS)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["good.tar.gz"]


def test_dot_slash_names_are_normalised(tmp_path: Path) -> None:
    archive = build(
        tmp_path / "dots.tar.gz",
        [
            folder("./"),
            folder("./ps1"),
            entry("./ps1/problem1.ipynb", NOTEBOOK),
            entry("././ps1/notes.txt", b"notes"),
        ],
    )
    report = inspect(archive, LIMITS)
    assert report.files == ("ps1/notes.txt", "ps1/problem1.ipynb")
    assert report.notebooks == ("problem1",)


def test_an_empty_archive_is_safe(tmp_path: Path) -> None:
    archive = build(tmp_path / "empty.tar.gz", [])
    assert inspect(archive, LIMITS) == ArchiveReport(0, 0, (), ())


def pax_sparse(name: str, data: bytes) -> Member:
    """A member of the regular type that pax headers make sparse (GNU sparse format 0.1)."""
    info, _ = entry(name, data)
    info.pax_headers = {
        "GNU.sparse.major": "0",
        "GNU.sparse.minor": "1",
        "GNU.sparse.map": f"0,{len(data)}",
        "GNU.sparse.size": str(len(data) + 4096),
    }
    return info, data


UNSAFE: dict[str, tuple[list[Member], str]] = {
    "absolute path": ([entry("/etc/passwd", b"x")], "'/etc/passwd'"),
    "dot-dot": ([entry("../evil.py", b"x")], "'../evil.py'"),
    "dot-dot inside": ([entry("ps1/../../evil.py", b"x")], "'ps1/../../evil.py'"),
    "dot-dot folder": ([folder("ps1/..")], "'ps1/..'"),
    "symlink": ([entry("link", None, tarfile.SYMTYPE, linkname="/etc/passwd")], "'link'"),
    "harmless-looking symlink": (
        [entry("a.txt", b"x"), entry("b.txt", None, tarfile.SYMTYPE, linkname="a.txt")],
        "'b.txt'",
    ),
    "hard link": ([entry("a.txt", b"x"), entry("b.txt", None, tarfile.LNKTYPE, linkname="a.txt")], "'b.txt'"),
    "character device": ([entry("null", None, tarfile.CHRTYPE)], "'null'"),
    "block device": ([entry("sda", None, tarfile.BLKTYPE)], "'sda'"),
    "fifo": ([entry("pipe", None, tarfile.FIFOTYPE)], "'pipe'"),
    "contiguous file": ([entry("contig", b"x", tarfile.CONTTYPE)], "'contig'"),
    "GNU sparse file": ([entry("holes.bin", b"x", tarfile.GNUTYPE_SPARSE)], "'holes.bin' is a sparse file"),
    "pax sparse file": ([pax_sparse("holes.bin", b"x")], "'holes.bin' is a sparse file"),
    "duplicate file": ([entry("a.txt", b"one"), entry("a.txt", b"two")], "'a.txt'"),
    "duplicate after ./": ([entry("a.txt", b"one"), entry("./a.txt", b"two")], "'./a.txt'"),
    "duplicate folder": ([folder("ps1"), folder("ps1/")], "'ps1'"),
    "file over a folder": ([entry("ps1/a.txt", b"x"), entry("ps1", b"x")], "'ps1'"),
    "file under a file": ([entry("ps1", b"x"), entry("ps1/a.txt", b"x")], "'ps1/a.txt'"),
    "bell in name": ([entry("bad\x07name", b"x")], "'bad\\x07name'"),
    "newline in name": ([entry("ps1/a\nb.txt", b"x")], "'ps1/a\\nb.txt'"),
    "escape in name": ([entry("\x1b[31mred", b"x")], "'\\x1b[31mred'"),
    "C1 control in name": ([entry("a\x85b", b"x")], "'a\\x85b'"),
    # Long enough to go into a pax header, where a NUL survives the round trip.
    "NUL in name": ([entry("n" * 120 + "\x00.ipynb", b"x")], "\\x00.ipynb'"),
    "name too long": ([entry("x" * 300, b"x")], "'" + "x" * 300 + "'"),
    "file with no name": ([entry("./", b"x")], "'./'"),
    "file named like a folder": ([entry("ps1/", b"x")], "'ps1/'"),
    "file named like a folder's dot": ([entry("0/.", b"x")], "'0/.'"),
}


@pytest.mark.hostile(
    "Archives",
    "members that are absolute, hold '..', are symlinks, hard links, devices, FIFOs, contiguous files, "
    "duplicates (also after './'), a file over or under a folder, names with control characters or NUL, "
    "names too long, files with no name, files named like folders ('ps1/', '0/.')",
    "422 naming the member; nothing written",
)
@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_unsafe_archives_are_refused(tmp_path: Path, case: str) -> None:
    members, named = UNSAFE[case]
    archive = build(tmp_path / "unsafe.tar.gz", members)
    with pytest.raises(UnsafeArchive) as inspected:
        inspect(archive, LIMITS)
    assert named in inspected.value.note
    assert sorted(path.name for path in tmp_path.iterdir()) == ["unsafe.tar.gz"]


def test_the_reason_reads_as_a_sentence(tmp_path: Path) -> None:
    archive = build(tmp_path / "link.tar.gz", [entry("ps1/link", None, tarfile.SYMTYPE, linkname="/etc")])
    with pytest.raises(UnsafeArchive) as caught:
        inspect(archive, LIMITS)
    assert caught.value.note == ("Member 'ps1/link' is a symbolic link: only regular files and folders are allowed.")


def test_empty_member_name_is_refused(tmp_path: Path) -> None:
    archive = build(tmp_path / "empty-name.tar.gz", [entry("", b"x")])
    with pytest.raises(UnsafeArchive) as caught:
        inspect(archive, LIMITS)
    assert "empty name" in caught.value.note


def test_too_many_members(tmp_path: Path) -> None:
    limits = ArchiveLimits(max_members=4)
    four = build(tmp_path / "four.tar.gz", [entry(f"f{i}.txt", b"x") for i in range(4)])
    assert inspect(four, limits).members == 4
    archive = build(tmp_path / "many.tar.gz", [entry(f"f{i}.txt", b"x") for i in range(5)])

    with pytest.raises(UnsafeArchive) as caught:
        inspect(archive, limits)
    assert "'f4.txt'" in caught.value.note
    assert "more than 4 members" in caught.value.note


def test_total_size_over_the_limit(tmp_path: Path) -> None:
    members = [entry("a.bin", bytes(range(256)) * 3), entry("b.bin", bytes(range(256)) * 3)]
    archive = build(tmp_path / "big.tar.gz", members)
    limits = ArchiveLimits(max_total_size=1500, max_ratio=1000)
    assert inspect(archive, ArchiveLimits(max_total_size=1536, max_ratio=1000)).total_size == 1536

    with pytest.raises(UnsafeArchive) as caught:
        inspect(archive, limits)
    assert "'b.bin'" in caught.value.note
    assert "1500" in caught.value.note


class _Zeros(io.RawIOBase):
    """``size`` zero bytes, made as they are read, so the test never holds the bomb whole."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        count = min(len(buffer), self.left)
        buffer[:count] = bytes(count)
        self.left -= count
        return count


def test_compression_bomb_stops_early(tmp_path: Path) -> None:
    size = 50 * 1024 * 1024
    info = tarfile.TarInfo("ps1/zeros.bin")
    info.size = size
    archive = tmp_path / "bomb.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.addfile(entry("ps1/ok.txt", b"fine")[0], io.BytesIO(b"fine"))
        tar.addfile(info, io.BufferedReader(_Zeros(size)))
    assert archive.stat().st_size < size / 100

    # Sizes allow the bomb; only the ratio does not.
    limits = ArchiveLimits(max_total_size=size * 2, max_ratio=20)
    with pytest.raises(UnsafeArchive) as caught:
        inspect(archive, limits)
    assert "'ps1/zeros.bin'" in caught.value.note
    assert "ratio" in caught.value.note
    # It stopped within the first megabytes of the member, not after reading it all.
    read_so_far = int(re.search(r"(\d+) bytes so far", caught.value.note).group(1))  # type: ignore[union-attr]
    assert read_so_far < 4 * 1024 * 1024
    # Under a generous ratio the same archive is fine: it is the ratio that stopped it.
    assert inspect(archive, ArchiveLimits(max_total_size=size * 2, max_ratio=10_000)).total_size == size + 4


def test_ratio_counts_against_the_compressed_size(tmp_path: Path) -> None:
    data = b"abcdefgh" * 4096  # 32 KiB that compresses to almost nothing
    archive = build(tmp_path / "squeezed.tar.gz", [entry("a.txt", data)])
    compressed = archive.stat().st_size
    ratio = len(data) / compressed
    assert inspect(archive, ArchiveLimits(max_ratio=ratio + 1)).total_size == len(data)
    with pytest.raises(UnsafeArchive) as caught:
        inspect(archive, ArchiveLimits(max_ratio=ratio - 1))
    assert "'a.txt'" in caught.value.note


@pytest.mark.hostile(
    "Archives", "a 20 MiB pax header on a one-byte file", "422 'headers unpack to more than', read no further"
)
def test_header_bomb_is_stopped_before_it_is_read_whole(tmp_path: Path) -> None:
    info, data = entry("ps1/small.txt", b"x")
    info.pax_headers = {"comment": "c" * (20 * 1024 * 1024)}
    archive = build(tmp_path / "header-bomb.tar.gz", [(info, data)])
    limits = ArchiveLimits(max_members=10)

    with pytest.raises(UnsafeArchive) as caught:
        inspect(archive, limits)
    assert "headers" in caught.value.note
    assert "before its first member" in caught.value.note


def test_plain_tar_is_not_gzip(tmp_path: Path) -> None:
    archive = tmp_path / "plain.tar"
    with tarfile.open(archive, "w") as tar:
        info, data = entry("a.txt", b"x")
        tar.addfile(info, io.BytesIO(data or b""))
    with pytest.raises(UnsupportedMedia) as caught:
        inspect(archive, LIMITS)
    assert "not gzip" in caught.value.note


@pytest.mark.hostile(
    "Archives", "an empty file, a zip, a gzip of text, a gzip of nothing, a broken gzip", "415, nothing left behind"
)
@pytest.mark.parametrize(
    "content",
    [
        pytest.param(b"", id="empty file"),
        pytest.param(b"PK\x03\x04 a zip file", id="zip"),
        pytest.param(gzip.compress(b"just some text, not a tar\n" * 100), id="gzip but not tar"),
        pytest.param(gzip.compress(b""), id="gzip of nothing"),
        pytest.param(b"\x1f\x8b\x08\x00garbage after the magic", id="broken gzip"),
    ],
)
def test_not_a_gzipped_tar(tmp_path: Path, content: bytes) -> None:
    archive = tmp_path / "upload.tar.gz"
    archive.write_bytes(content)
    with pytest.raises(UnsupportedMedia):
        inspect(archive, LIMITS)


@pytest.mark.hostile("Archives", "an archive cut in half", "415, nothing left behind")
def test_truncated_archive_is_unsupported(tmp_path: Path) -> None:
    archive = build(tmp_path / "whole.tar.gz", [entry("a.bin", bytes(range(256)) * 400)])
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(UnsupportedMedia):
        inspect(cut, LIMITS)


@pytest.mark.hostile(
    "Archives",
    "pax headers whose numbers tarfile cannot read (GNU.sparse.size, .map, .realsize, a 1.0 sparse map): "
    "tarfile raises ValueError, not one of its own errors",
    "415, refused like any unreadable header (not an error that would leave the check to be retried forever)",
)
@pytest.mark.parametrize("which", sorted(UNREADABLE_PAX))
def test_pax_numbers_tarfile_cannot_read_are_unsupported(tmp_path: Path, which: str) -> None:
    assert_unreadable(tmp_path, make_archive({"ps1/a.ipynb": b"not a number\n" * 100}, UNREADABLE_PAX[which]))


def _sparse_with_extension_blocks_cut(tail: bytes) -> bytes:
    """A GNU sparse member's header that says extension blocks follow, then only ``tail``."""
    info = tarfile.TarInfo("ps1/sparse")
    info.type = tarfile.GNUTYPE_SPARSE
    header = bytearray(info.tobuf(format=tarfile.GNU_FORMAT))
    header[482] = 1  # isextended
    fix_checksum(header, 0)
    return gzip.compress(bytes(header) + tail)


@pytest.mark.hostile(
    "Archives",
    "a GNU sparse member whose header says extension blocks follow, cut before them or within one: tarfile "
    "raises IndexError, not one of its own errors",
    "415, refused like any unreadable header",
)
@pytest.mark.parametrize("tail", [b"", b"\0" * 100], ids=["nothing after", "half a block after"])
def test_sparse_extension_blocks_cut_short_are_unsupported(tmp_path: Path, tail: bytes) -> None:
    assert_unreadable(tmp_path, _sparse_with_extension_blocks_cut(tail))


def assert_unreadable(tmp_path: Path, data: bytes) -> None:
    """The check refuses the archive ``data`` as not a readable gzip'd tar (415), with no other error."""
    path = tmp_path / "upload.tar.gz"
    path.write_bytes(data)
    with pytest.raises(UnsupportedMedia) as caught:
        inspect(path, LIMITS)
    assert "not a readable gzip'd tar" in caught.value.note


def _damaged_after_the_tar(how: str) -> bytes:
    """A 1 MB archive whose tar is whole, damaged only after the tar's end (in gzip's trailer or past it)."""
    tar = io.BytesIO()
    info, content = entry("ps1/data.bin", os.urandom(1024 * 1024))
    with tarfile.open(fileobj=tar, mode="w") as writer:
        writer.addfile(info, io.BytesIO(content))
    data = gzip.compress(tar.getvalue(), compresslevel=1)
    damage = {
        "CRC-32 changed": lambda d: d[:-8] + bytes([d[-8] ^ 1]) + d[-7:],
        "length changed": lambda d: d[:-1] + bytes([d[-1] ^ 1]),
        "trailer cut": lambda d: d[:-3],
        "no trailer": lambda d: d[:-8],
        "bytes after": lambda d: d + b"junk",
        "a broken second member": lambda d: d + gzip.compress(b"more")[:-2],
    }
    return damage[how](data)


@pytest.mark.hostile(
    "Archives",
    "a whole tar in a gzip stream damaged after the tar's end: CRC-32 or length changed, trailer cut or missing, "
    "other bytes or a broken gzip member after it",
    "415: the gzip stream is checked to the end of the file, not only as far as the tar goes",
)
@pytest.mark.parametrize(
    "how",
    ["CRC-32 changed", "length changed", "trailer cut", "no trailer", "bytes after", "a broken second member"],
)
def test_damage_after_the_tar_end_is_unsupported(tmp_path: Path, how: str) -> None:
    assert_unreadable(tmp_path, _damaged_after_the_tar(how))


def test_a_gzip_stream_of_two_whole_members_is_read_to_its_end(tmp_path: Path) -> None:
    whole = build(tmp_path / "whole.tar.gz", [entry("ps1/a.txt", b"a" * 5000)]).read_bytes()
    path = tmp_path / "two.tar.gz"
    path.write_bytes(whole + gzip.compress(b""))  # `cat a.tar.gz empty.gz`: still one valid gzip file
    source = Unseekable(path)
    try:
        assert inspect_archive(source, LIMITS).files == ("ps1/a.txt",)
    finally:
        source.close()
    assert source.taken == len(path.read_bytes())


# -- bombs: stopped before the bytes that pass a limit are written -----------------------


def bomb_then_padding(path: Path, zeros: int, padding: int) -> Path:
    """A member of ``zeros`` zero bytes (a bomb), then ``padding`` incompressible bytes that dilute its ratio."""
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("ps1/zeros.bin")
        info.size = zeros
        tar.addfile(info, io.BufferedReader(_Zeros(zeros)))
        noise = tarfile.TarInfo("ps1/noise.bin")
        noise.size = padding
        tar.addfile(noise, io.BytesIO(os.urandom(padding)))
    return path


@pytest.mark.hostile(
    "Archives",
    "a ratio bomb (64 MiB of zeros in 64 KiB) followed by 2 MiB of incompressible padding that brings the whole "
    "file's ratio under the limit",
    "422 'past its allowed compression ratio', stopped before the padding is read (the ratio is taken "
    "against the compressed bytes used so far)",
)
def test_a_bomb_hidden_by_padding_is_stopped_before_the_padding(tmp_path: Path) -> None:
    size = 64 * 1024 * 1024
    padding = 2 * 1024 * 1024
    archive = bomb_then_padding(tmp_path / "bomb.tar.gz", size, padding)
    whole_ratio = (size + padding) / archive.stat().st_size
    assert 25 < whole_ratio < 40  # the whole file looks harmless under a ratio of 40
    source = Unseekable(archive)
    with pytest.raises(UnsafeArchive) as caught:
        inspect_archive(source, ArchiveLimits(max_ratio=40.0))
    source.close()
    assert "'ps1/zeros.bin'" in caught.value.note and "compression ratio" in caught.value.note
    assert source.taken < archive.stat().st_size - padding  # the padding was never reached
    assert int(re.search(r"(\d+) bytes so far", caught.value.note).group(1)) < 4 * 1024 * 1024  # type: ignore[union-attr]


@pytest.mark.hostile(
    "Archives",
    "an archive that unpacks past max_total_size (64 MiB of zeros, 3 MiB allowed, any ratio)",
    "422 naming the limit, reading stopped within a chunk of it",
)
def test_total_size_stops_reading_at_the_limit(tmp_path: Path) -> None:
    archive = bomb_then_padding(tmp_path / "big.tar.gz", 64 * 1024 * 1024, 1024)
    limit = 3 * 1024 * 1024
    with pytest.raises(UnsafeArchive) as caught:
        inspect(archive, ArchiveLimits(max_total_size=limit, max_ratio=1e9))
    assert f"past the {limit} bytes" in caught.value.note
    so_far = int(re.search(r"\((\d+) bytes so far\)", caught.value.note).group(1))  # type: ignore[union-attr]
    assert limit < so_far <= limit + archives.UNPACKED_PIECE
    # Within the limit the same archive shape is fine: it is the limit that stopped it.
    fine = bomb_then_padding(tmp_path / "fine.tar.gz", limit - 1024, 1024)
    assert inspect(fine, ArchiveLimits(max_total_size=limit, max_ratio=1e9)).total_size == limit


def test_the_ratio_is_counted_against_the_compressed_bytes_used(tmp_path: Path) -> None:
    data = os.urandom(256 * 1024)
    squeezed = gzip.compress(data) + gzip.compress(bytes(1024 * 1024))  # two gzip members, as `cat` makes
    path = tmp_path / "two.gz"
    path.write_bytes(squeezed)
    with open(path, "rb") as f:
        inflater = archives._Inflater(f)
        got = bytearray()
        used_at_noise_end = None
        while chunk := inflater.inflate(64 * 1024):
            got += chunk
            if len(got) == len(data):
                used_at_noise_end = inflater.consumed
    assert bytes(got) == data + bytes(1024 * 1024)
    assert inflater.consumed == len(squeezed)
    # After the incompressible part, about as many compressed bytes were used as it holds, not the whole file.
    assert used_at_noise_end is not None and len(data) <= used_at_noise_end < len(data) + 20 * 1024
    with open(path, "rb") as f, pytest.raises(EOFError):
        cut = archives._Inflater(io.BytesIO(f.read()[:-5000]))
        while cut.inflate(64 * 1024):
            pass
