"""Streaming pieces the actions share: tar archives on disk, multipart bodies, progress in the log."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

CHUNK_SIZE = 1024 * 1024
MEGABYTE = 1024 * 1024


class Progress:
    """A text progress bar written to the log, every tenth of a transfer larger than a threshold."""

    def __init__(self, log, label: str, total: int, threshold: int) -> None:
        self.log = log
        self.label = label
        self.total = total
        self.enabled = total > threshold
        self.done = 0
        self._next_tenth = 1

    def advance(self, count: int) -> None:
        """Count ``count`` more bytes moved, logging the bar when another tenth is reached."""
        self.done += count
        if not self.enabled:
            return
        tenths = min(10, self.done * 10 // self.total)
        if tenths >= self._next_tenth:
            self._next_tenth = tenths + 1
            self.log.info(
                "%s [%-10s] %3d%% (%.1f of %.1f MB)",
                self.label,
                "#" * tenths,
                tenths * 10,
                self.done / MEGABYTE,
                self.total / MEGABYTE,
            )


class MultipartBody:
    """A multipart/form-data body holding text fields and one file, read from disk piece by piece.

    Its length is known up front, so requests sends a Content-Length and never
    holds the file in memory.
    """

    def __init__(
        self,
        fields: Iterable[tuple[str, str]],
        file_field: str,
        filename: str,
        path: str,
        file_type: str,
        progress: Progress | None = None,
    ) -> None:
        boundary = uuid.uuid4().hex
        self.content_type = f"multipart/form-data; boundary={boundary}"
        head = b"".join(
            _part_header(boundary, f'form-data; name="{name}"') + value.encode("utf-8") + b"\r\n"
            for name, value in fields
        )
        safe_filename = filename.replace('"', "%22")
        head += _part_header(boundary, f'form-data; name="{file_field}"; filename="{safe_filename}"', file_type)
        tail = f"\r\n--{boundary}--\r\n".encode("ascii")
        self._file = open(path, "rb")  # noqa: SIM115 - read by requests after we return; see close()
        self._length = len(head) + os.fstat(self._file.fileno()).st_size + len(tail)
        self._pieces = [io.BytesIO(head), self._file, io.BytesIO(tail)]
        self._progress = progress

    def __len__(self) -> int:
        return self._length

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes of the body (all that is left if ``size`` is negative)."""
        out = bytearray()
        while self._pieces and (size < 0 or len(out) < size):
            chunk = self._pieces[0].read(-1 if size < 0 else size - len(out))
            if chunk:
                out += chunk
            else:
                self._pieces.pop(0)
        if self._progress is not None:
            self._progress.advance(len(out))
        return bytes(out)

    def close(self) -> None:
        """Close the file the body reads from."""
        self._file.close()


def _part_header(boundary: str, disposition: str, content_type: str | None = None) -> bytes:
    lines = [f"--{boundary}", f"Content-Disposition: {disposition}"]
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


@dataclass(frozen=True)
class Upload:
    """What one upload sends: a file from disk under ``file_field``, and text fields beside it."""

    file_field: str
    path: str
    filename: str
    file_type: str = "application/gzip"
    fields: list[tuple[str, str]] = field(default_factory=list)

    def body(self, progress: Progress | None = None) -> MultipartBody:
        """A fresh body, read from the start: each attempt of a retried upload needs its own."""
        return MultipartBody(self.fields, self.file_field, self.filename, self.path, self.file_type, progress)


Ignore = Callable[[str, list], Iterable[str]]


def pack(src: str, archive: str, ignore: Ignore | None, extras: dict[str, str], log) -> list[str]:
    """Write ``src`` as a gzip'd tar at ``archive``, plus ``extras`` (name -> text); answer the files packed.

    Member names are relative to ``src`` in posix form. Files ``ignore`` names are
    left out, as ``shutil.copytree`` would leave them out; a link to a file is packed
    as the file it points to, because the service refuses links.
    """
    files: list[str] = []
    with tarfile.open(archive, "w:gz", dereference=True) as tar:
        for dirpath, dirnames, filenames in os.walk(src):
            ignored = set(ignore(dirpath, dirnames + filenames)) if ignore else set()
            relative = os.path.relpath(dirpath, src)
            prefix = "" if relative == "." else relative.replace(os.sep, "/") + "/"
            kept = []
            for name in sorted(dirnames):
                path = os.path.join(dirpath, name)
                if name in ignored:
                    continue
                if os.path.islink(path):
                    log.warning("Leaving out the linked folder '%s': the exchange accepts no links", path)
                    continue
                kept.append(name)
                tar.add(path, arcname=prefix + name, recursive=False, filter=_anonymous)
            dirnames[:] = kept
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                member = prefix + name
                if name in ignored or member in extras:
                    continue
                if not os.path.isfile(path):
                    log.warning("Leaving out '%s': it is not a regular file", path)
                    continue
                tar.add(path, arcname=member, filter=_anonymous)
                files.append(member)
        for name, text in extras.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
            files.append(name)
    return files


def _anonymous(info: tarfile.TarInfo) -> tarfile.TarInfo:
    # Local user and group ids mean nothing on the service; keep them out of the archive.
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def unpack(archive: str, dest: str) -> None:
    """Extract the gzip'd tar ``archive`` into the folder ``dest``, refusing unsafe members."""
    os.makedirs(dest, exist_ok=True)
    with tarfile.open(archive, "r:*") as tar:
        # The 'data' filter refuses absolute paths, '..', links out of dest and device files.
        tar.extractall(dest, filter="data")


def copy_missing(src: str, dest: str, ignore: Ignore | None, log) -> None:
    """Copy into ``dest`` only what it lacks from ``src``, saying what was restored."""
    names = sorted(os.listdir(src))
    if ignore:
        names = [name for name in names if name not in set(ignore(src, names))]
    for name in names:
        source = os.path.join(src, name)
        target = os.path.join(dest, name)
        shown = os.path.relpath(target, os.getcwd())
        if os.path.isdir(source):
            if not os.path.exists(target):
                log.warning("Creating missing directory '%s'", shown)
                os.mkdir(target)
            copy_missing(source, target, ignore, log)
        elif not os.path.exists(target):
            log.warning("Replacing missing file '%s'", shown)
            shutil.copy(source, target)
