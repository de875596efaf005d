"""Gzip'd tar archives of an exact size for the benchmarks, built fast or streamed without holding them.

The gzip members use deflate's *stored* blocks: the bytes go through as they
are (random data would not compress anyway), so an archive's size is known to
the byte before it is made, and making one costs a copy and a CRC.
"""

from __future__ import annotations

import io
import json
import os
import random
import struct
import tarfile
import zlib
from collections.abc import Iterator

#: Deflate's largest stored block.
_BLOCK = 65535
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # deflate, no flags, mtime 0, unknown OS
_END_OF_TAR = b"\0" * 1024


def gzip_size(raw_size: int) -> int:
    """The size of the gzip member that stores ``raw_size`` bytes."""
    blocks = max(1, -(-raw_size // _BLOCK))
    return len(_GZIP_HEADER) + 5 * blocks + raw_size + 8


def _stored_blocks(data: memoryview, final: bool) -> Iterator[bytes | memoryview]:
    if not data:
        if final:
            yield b"\x01\x00\x00\xff\xff"
        return
    for start in range(0, len(data), _BLOCK):
        block = data[start : start + _BLOCK]
        last = final and start + _BLOCK >= len(data)
        yield struct.pack("<BHH", 1 if last else 0, len(block), 0xFFFF ^ len(block))
        yield block


def _tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def _padding(size: int) -> bytes:
    return b"\0" * (-size % 512)


def archive(files: list[tuple[str, bytes]]) -> bytes:
    """A gzip'd tar of these (name, bytes) files, in memory."""
    tar = b"".join(_tar_header(name, len(data)) + data + _padding(len(data)) for name, data in files) + _END_OF_TAR
    out = [_GZIP_HEADER, *_stored_blocks(memoryview(tar), final=True)]
    out.append(struct.pack("<II", zlib.crc32(tar), len(tar) & 0xFFFFFFFF))
    return b"".join(out)


def notebook(student_id: str, pad_to: int = 256) -> bytes:
    """A small notebook naming the student, padded so every student's has the same size."""
    text = f'{{"cells": [], "metadata": {{"student": "{student_id}"}}, "nbformat": 4, "nbformat_minor": 5}}'
    return text.ljust(pad_to).encode()


class SubmissionBodies:
    """Students' archives of about ``size`` bytes each, sharing the bulk of their bytes in memory.

    Each archive holds a share of ``blob`` (random bytes), then the student's
    notebook, in a gzip member of stored blocks. The blob's tar entry, its
    blocks and their CRC are made once; a student's archive adds only its
    notebook's blocks (2 KB) and trailer. So 10,000 students' 1 MB archives
    take 1 MB and 20 MB, not 10 GB, while every archive's bytes (and sha256)
    still differ, as in real life.
    """

    def __init__(self, size: int, blob: bytes) -> None:
        nb_size = len(notebook(""))
        tail_size = 512 + nb_size + len(_padding(nb_size)) + len(_END_OF_TAR)
        framing = len(_GZIP_HEADER) + 8 + 5 * (_blocks(size) + _blocks(tail_size))
        data_size = max(0, size - framing - tail_size - 512)
        data_size -= data_size % 512  # no tar padding: the archive is within 512 bytes of ``size``
        shared = _tar_header("data.bin", data_size) + blob[:data_size]
        self._crc = zlib.crc32(shared)
        self._length = len(shared)
        self._shared = b"".join([_GZIP_HEADER, *_stored_blocks(memoryview(shared), final=False)])

    def parts(self, student_id: str) -> list[bytes]:
        """The buffers of this student's archive, in order (the first is shared by every student)."""
        nb = notebook(student_id)
        tail = _tar_header("nb1.ipynb", len(nb)) + nb + _padding(len(nb)) + _END_OF_TAR
        trailer = struct.pack("<II", zlib.crc32(tail, self._crc), (self._length + len(tail)) & 0xFFFFFFFF)
        return [self._shared, b"".join(_stored_blocks(memoryview(tail), final=True)), trailer]


def submission_archive(student_id: str, size: int, blob: bytes) -> bytes:
    """A student's archive of about ``size`` bytes, whole (see :class:`SubmissionBodies`)."""
    return b"".join(SubmissionBodies(size, blob).parts(student_id))


def random_blob(size: int) -> bytes:
    """Incompressible bytes, shared by the students' archives."""
    return os.urandom(size)


def _blocks(size: int) -> int:
    return -(-size // _BLOCK)


def big_archive_size(data_size: int, chunk: int = 1024 * 1024) -> int:
    """The exact size of :func:`big_archive`'s output (each piece is framed on its own)."""
    full, rest = divmod(data_size, chunk)
    blocks = _blocks(512) + full * _blocks(chunk) + (_blocks(rest) if rest else 0) + _blocks(len(_END_OF_TAR))
    return len(_GZIP_HEADER) + 5 * blocks + 512 + data_size + len(_END_OF_TAR) + 8


def big_archive(data_size: int, chunk: int = 1024 * 1024) -> Iterator[bytes]:
    """A gzip'd tar holding one file of ``data_size`` bytes (a multiple of 512), produced chunk by chunk."""
    if data_size % 512:
        raise ValueError("data_size must be a multiple of 512")
    block = os.urandom(chunk)
    crc = 0
    total = 0

    def pieces() -> Iterator[bytes]:
        yield _tar_header("big.bin", data_size)
        left = data_size
        while left:
            n = min(left, chunk)
            yield block[:n]
            left -= n
        yield _END_OF_TAR

    yield _GZIP_HEADER
    raw_total = 512 + data_size + len(_END_OF_TAR)
    for piece in pieces():
        crc = zlib.crc32(piece, crc)
        total += len(piece)
        yield b"".join(_stored_blocks(memoryview(piece), final=total == raw_total))
    yield struct.pack("<II", crc, total & 0xFFFFFFFF)


def notebooks_archive(student_id: str, size: int) -> bytes:
    """A gzip'd tar of notebooks of about ``size`` bytes unpacked, as nbgrader's students submit."""
    rng = random.Random(student_id)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        written, i = 0, 0
        while written < size:
            cells = [
                {
                    "cell_type": "code",
                    "source": [f"x = {rng.randint(0, 10**6)}\n", f"print(x * {i})\n"] * 20,
                    "outputs": [{"text": [str(rng.random())] * 10}],
                    "metadata": {},
                }
                for _ in range(150)
            ]
            body = json.dumps({"cells": cells, "metadata": {"student": student_id}, "nbformat": 4}, indent=1).encode()
            info = tarfile.TarInfo(f"ps1/nb{i}.ipynb")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
            written, i = written + len(body), i + 1
    return buf.getvalue()
