"""Small builders of domain events for tests."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from nbexchange.events.domain import (
    INSTRUCTOR,
    STUDENT,
    Actor,
    Released,
    Submitted,
)
from nbexchange.events.store import AppendRequest

T0 = datetime(2026, 1, 31, 23, 0, tzinfo=timezone.utc)
TEACHER = Actor(name="ada", role=INSTRUCTOR, full_name="Ada Lovelace", email="ada@example.org")


def student(name: str) -> Actor:
    """A student actor with a profile."""
    return Actor(
        name=name,
        role=STUDENT,
        full_name=name.title(),
        email=f"{name}@example.org",
        lms_user_id=name[::-1],
    )


def release(
    course: str = "phys101",
    assignment: str = "ps1",
    sha: str = "a" * 64,
    expected: int | None = None,
    key: str | None = None,
    org: int = 1,
) -> AppendRequest:
    """An instructor's release of ``assignment``."""
    return AppendRequest(
        Released(
            org,
            course,
            assignment,
            notebooks=("nb1", "nb2"),
            archive_sha256=sha,
            archive_size=10,
        ),
        TEACHER,
        expected_version=expected,
        idempotency_key=key,
    )


def submit(
    name: str,
    course: str = "phys101",
    assignment: str = "ps1",
    minutes: int = 0,
    sha: str = "b" * 64,
    key: str | None = None,
    org: int = 1,
) -> AppendRequest:
    """A student's submission, ``minutes`` after T0."""
    return AppendRequest(
        Submitted(
            org,
            course,
            assignment,
            student_id=name,
            timestamp=T0 + timedelta(minutes=minutes),
            archive_sha256=sha,
            archive_size=20,
        ),
        student(name),
        idempotency_key=key,
    )


#: pax headers whose numbers tarfile cannot read (it raises ValueError for these, not a TarError).
UNREADABLE_PAX = {
    "GNU.sparse.size": {
        "GNU.sparse.major": "0",
        "GNU.sparse.minor": "1",
        "GNU.sparse.map": "0,10",
        "GNU.sparse.size": "5\x01608",
    },
    "GNU.sparse.map": {"GNU.sparse.major": "0", "GNU.sparse.minor": "1", "GNU.sparse.map": "0,x"},
    "GNU.sparse.realsize": {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.realsize": "ten"},
    "a 1.0 sparse map in the data": {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.realsize": "10"},
}


def make_archive(files: dict[str, bytes] | None = None, pax_headers: dict[str, str] | None = None) -> bytes:
    """A gzip'd tar holding ``files`` (relative name -> bytes), as the plugin sends; each file with ``pax_headers``."""
    import gzip
    import io
    import tarfile

    files = files if files is not None else {"nb1.ipynb": b'{"cells": []}', "data/x.csv": b"1,2\n"}
    buf = io.BytesIO()
    # mtime=0: the same files always make the same bytes, so tests can compare them.
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.pax_headers = pax_headers or {}
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def make_symlink_archive() -> bytes:
    """A gzip'd tar with a symbolic link: unsafe."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("evil")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    return buf.getvalue()


def fix_checksum(tar: bytearray, block: int) -> None:
    """Make the checksum of the tar header at byte ``block`` right again after a change to its fields
    (the sum of the header's bytes, its own eight counted as spaces), so that tarfile parses on."""
    header = tar[block : block + 512]
    tar[block + 148 : block + 156] = b"%06o\0 " % (sum(header[:148]) + 8 * ord(" ") + sum(header[156:]))
