"""For auditors: verify the chain and the archives, export the log, replay it to a moment."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from nbexchange.clock import format_iso, format_timestamp, parse_timestamp
from nbexchange.db import with_pg_options
from nbexchange.errors import ExchangeError, Invalid
from nbexchange.events.domain import Submitted, Unreleased, assignment_stream, check_stream, student_stream
from nbexchange.events.sql import SQLEventStore
from nbexchange.events.store import RecordedEvent, canonical_json, verify_chain
from nbexchange.projections import PROJECTIONS, Projection, checkpoints, replay, snapshot
from nbexchange.projections.assignments import course_releases
from nbexchange.projections.blobs import RELEASED, owned_blob
from nbexchange.projections.collections import list_submissions
from nbexchange.projections.history import history
from nbexchange.storage import ArchiveStore

#: Payload fields that name a stored archive (or feedback file) by its sha256.
_STORED = ("archive_sha256", "feedback_sha256")

#: The SQLite file header's "write version" byte: 2 in WAL mode.
_WAL_HEADER_OFFSET, _WAL = 18, 2


def open_read_only(url: str) -> Engine:
    """An engine that can only read the database at ``url``, and changes nothing beside it.

    PostgreSQL: every transaction is ``READ ONLY``. SQLite: the file is opened
    with ``mode=ro`` and no PRAGMA is set (setting the journal mode is a
    write, refused on a read-only copy). A WAL database whose ``-wal`` file is
    absent is closed (the service keeps that file while it runs), and a
    read-only connection would create ``-wal`` and ``-shm`` files beside it,
    which a read-only folder refuses: it is opened ``immutable`` instead,
    touching nothing. The caller checks the file exists (connecting does not create it).
    """
    sa_url = sa.make_url(url)
    if sa_url.get_backend_name() != "sqlite":
        return sa.create_engine(with_pg_options(sa_url, "default_transaction_read_only=on"))
    path = Path(sa_url.database or "")
    uri = f"file:{quote(str(path.resolve()))}?mode=ro"
    if _sqlite_wal_mode(path) and not path.with_name(path.name + "-wal").exists():
        uri += "&immutable=1"

    def connect() -> sqlite3.Connection:
        return sqlite3.connect(uri, uri=True, check_same_thread=False)

    return sa.create_engine("sqlite://", creator=connect)


def _sqlite_wal_mode(path: Path) -> bool:
    with path.open("rb") as db:
        header = db.read(_WAL_HEADER_OFFSET + 1)
    return len(header) > _WAL_HEADER_OFFSET and header[_WAL_HEADER_OFFSET] == _WAL


@dataclass(frozen=True)
class Head:
    """A head of the log recorded outside it: the hash of the event at ``position``."""

    position: int
    hash: str
    source: str = "--expect-head"

    @classmethod
    def parse(cls, text: str) -> Head:
        """``POSITION:HASH``, as ``verify`` prints and ``--expect-head`` takes."""
        position, _, digest = text.partition(":")
        return cls(int(position), digest)


def read_anchors(path: Path) -> list[Head]:
    """The heads recorded in an anchor file: one JSON object per line with ``position`` and ``hash``.

    A line that is not such an object is an error (``ValueError``): an
    anchor file an auditor relies on must not be half read.
    """
    heads = []
    with path.open(encoding="utf-8") as anchors:
        for number, line in enumerate(anchors, start=1):
            if not line.strip():
                continue
            try:
                anchor = json.loads(line)
                heads.append(Head(int(anchor["position"]), str(anchor["hash"]), f"{path.name} line {number}"))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path} line {number} is not an anchor (JSON with position and hash): {e}") from e
    return heads


def verify(
    store: SQLEventStore,
    archives: ArchiveStore,
    *,
    until_position: int | None = None,
    heads: Sequence[Head] = (),
) -> dict[str, Any]:
    """Recompute every hash of the chain, and the sha256 of every archive an event names.

    Also checks that ``recorded_at`` never runs backwards, and that the
    event at each of ``heads`` (recorded outside the log) still carries its
    hash: a log rewritten with recomputed hashes, or cut short, is consistent
    with itself but not with a head kept elsewhere.

    A missing archive is a fault unless no event owns it any more: the
    releases that owned it were purged (``unreleased`` with ``purge``) and
    no submission or feedback is of the same bytes. Stored blobs that no
    event names are listed (``unnamed``): a refused upload's, or a crash's,
    which the blob collector removes after its grace. Nothing is written:
    ``archives`` is opened with ``create=False``.
    """
    named: dict[str, int] = {}
    owners: dict[str, set[int]] = {}
    releases: dict[tuple[int, str, str], list[tuple[int, str]]] = {}
    faults: list[dict[str, Any]] = []
    # A head past --until-position is outside what was asked to be checked.
    expected = {head.position: head for head in heads if until_position is None or head.position <= until_position}
    found: dict[int, str] = {}
    previous: RecordedEvent | None = None

    def audited() -> Iterator[RecordedEvent]:
        # One pass over the log: the chain's check and these share each page read.
        nonlocal previous
        for event in store.read(until_position=until_position):
            if previous is not None and event.recorded_at < previous.recorded_at:
                reason = "recorded_at is earlier than the previous event's"
                faults.append({"position": event.position, "reason": reason})
            if event.position in expected:
                found[event.position] = event.hash
            _note_archives(event, named, owners, releases, faults)
            previous = event
            yield event

    chain = verify_chain(audited(), hash_matches)
    faults[:0] = [{"position": f.position, "reason": f.reason} for f in chain.faults]
    for position, head in sorted(expected.items()):
        if position not in found:
            faults.append(
                {"position": position, "reason": f"the log no longer reaches this position, recorded in {head.source}"}
            )
        elif found[position] != head.hash:
            faults.append(
                {"position": position, "reason": f"hash differs from the head recorded in {head.source} (rewritten)"}
            )
    checked = 0
    for sha, position in sorted(named.items(), key=lambda kv: kv[1]):
        if not archives.exists(sha):
            if owners.get(sha):
                first = min(owners[sha])
                faults.append({"position": first, "reason": f"archive {sha} is missing from storage"})
            continue
        checked += 1
        if not archives.verify(sha):
            faults.append({"position": position, "reason": f"archive {sha} does not match its sha256 (changed)"})
    faults.sort(key=lambda fault: fault["position"])
    return {
        "ok": not faults,
        "events": chain.checked,
        "head": {
            "position": previous.position if previous else 0,
            "hash": chain.head_hash,
            "recorded_at": format_iso(previous.recorded_at) if previous else None,
        },
        "head_hash": chain.head_hash,
        "heads_checked": len(expected),
        "archives": checked,
        "unnamed": sorted(sha for sha, _ in archives.blobs() if sha not in named),
        "faults": faults,
    }


def _note_archives(
    event: RecordedEvent,
    named: dict[str, int],
    owners: dict[str, set[int]],
    releases: dict[tuple[int, str, str], list[tuple[int, str]]],
    faults: list[dict[str, Any]],
) -> None:
    """Record which archives ``event`` names and owns, and which a purge disowned."""
    for field in _STORED:
        sha = event.payload.get(field)
        if isinstance(sha, str) and event.type not in ("archive_unpacked", "archive_rejected"):
            named.setdefault(sha, event.position)
    try:
        data, owned = event.data, owned_blob(event)
    except (KeyError, TypeError, ValueError) as e:
        faults.append({"position": event.position, "reason": f"the payload does not decode: {e}"})
        return
    assignment = (data.org_id, data.course_id, data.assignment_id)
    if owned is not None:
        sha, kind = owned
        owners.setdefault(sha, set()).add(event.position)
        if kind == RELEASED:
            releases.setdefault(assignment, []).append((event.position, sha))
    elif isinstance(data, Unreleased) and data.purge:
        for position, sha in releases.pop(assignment, []):
            owners[sha].discard(position)


def verify_projections(engine: Engine, *, limit: int = 20) -> dict[str, Any]:
    """Compare the live read models with ones rebuilt from the log, in a private database.

    Each projection is rebuilt up to its own checkpoint (a live one may lag
    the head). Returns, per table, rows only the live database has and rows
    only the rebuild has (at most ``limit`` of each, and their counts).
    """
    marks = checkpoints(engine)
    differences: list[dict[str, Any]] = []
    by_mark: dict[int, list[Projection]] = {}
    for projection in PROJECTIONS:
        by_mark.setdefault(marks.get(projection.name, 0), []).append(projection)
    for mark, projections in sorted(by_mark.items()):
        rebuilt = replay(engine, projections, until_position=mark)
        try:
            for projection in projections:
                live, fresh = snapshot(engine, projection), snapshot(rebuilt, projection)
                for table, rows in live.items():
                    # By repr: a row may hold a JSON column's dict, which does not hash.
                    live_keys, fresh_keys = {repr(r) for r in rows}, {repr(r) for r in fresh[table]}
                    only_live = [r for r in rows if repr(r) not in fresh_keys]
                    only_rebuilt = [r for r in fresh[table] if repr(r) not in live_keys]
                    if only_live or only_rebuilt:
                        differences.append(
                            {
                                "projection": projection.name,
                                "table": table,
                                "checkpoint": mark,
                                "only_live": len(only_live),
                                "only_rebuilt": len(only_rebuilt),
                                "live_rows": [_row(r) for r in only_live[:limit]],
                                "rebuilt_rows": [_row(r) for r in only_rebuilt[:limit]],
                            }
                        )
        finally:
            rebuilt.dispose()
    return {"ok": not differences, "differences": differences}


def _row(row: tuple[Any, ...]) -> list[Any]:
    return [format_iso(v) if isinstance(v, datetime) else v for v in row]


def extract(store: SQLEventStore, archives: ArchiveStore, position: int, output: Path) -> str:
    """Write the archive of the submission at ``position`` to ``output`` and ``output.sha256``; returns its sha256.

    Appends nothing (unlike a collection) and writes nothing in the store.
    Refuses an existing ``output`` (evidence is not overwritten), and removes
    what it wrote if the stored bytes no longer match their sha256.
    """
    event = store.get(position)
    if event.type != Submitted.TYPE:
        raise Invalid(f"The event at position {position} is {event.type!r}, not a submission.")
    sha = str(event.payload["archive_sha256"])
    digest = hashlib.sha256()
    try:
        with archives.open(sha) as stored, output.open("xb") as out:
            while chunk := stored.read(1024 * 1024):
                digest.update(chunk)
                out.write(chunk)
    except FileExistsError:
        raise Invalid(f"{output} exists already; choose another --output.") from None
    if digest.hexdigest() != sha:
        output.unlink()
        raise ExchangeError(f"The stored archive {sha} does not match its sha256 (changed); nothing written.")
    output.with_name(output.name + ".sha256").write_text(f"{sha}  {output.name}\n", encoding="utf-8")
    return sha


def export(store: SQLEventStore, out: TextIO) -> int:
    """Write every event, hashes included, one canonical JSON object per line; returns the count.

    Canonical as the chain hashes it (sorted keys, no spaces, non-ASCII kept
    as UTF-8), so a verifier may hash what it reads without re-encoding.
    """
    count = 0
    for event in store.read():
        if _fast_fields(event) is not None:
            # orjson wrote these fields canonically (their hash proves it); the two
            # hashes added are hex strings, which every encoder writes alike.
            out.write(orjson.dumps(event.to_json(), option=orjson.OPT_SORT_KEYS).decode("utf-8") + "\n")
        else:
            out.write(canonical_json(event.to_json()) + "\n")
        count += 1
    return count


def hash_matches(event: RecordedEvent) -> bool:
    """Whether the event's hash is the one its fields and ``prev_hash`` make: ``computed_hash() == hash``, faster.

    orjson encodes the fields first, several times faster than the standard
    library; its bytes hashing to the recorded hash proves they are the
    canonical encoding (barring a SHA-256 collision). Any other outcome is
    decided by the canonical encoder itself, so the answer is always that of
    ``computed_hash``.
    """
    return _fast_fields(event) is not None or event.computed_hash() == event.hash


def _fast_fields(event: RecordedEvent) -> str | None:
    """The canonical encoding of the event's hashed fields if orjson's encoding hashes to ``hash``, else None."""
    try:
        text = orjson.dumps(event.hashed_fields(), option=orjson.OPT_SORT_KEYS)
    except TypeError:  # beyond orjson (an integer over 64 bits): the canonical encoder decides
        return None
    digest = hashlib.sha256(event.prev_hash.encode("ascii") + b"\n" + text).hexdigest()
    return text.decode("utf-8") if digest == event.hash else None


def _course_pages(
    store: SQLEventStore,
    org_id: int,
    course_id: str,
    assignment_id: str | None,
    until_position: int | None,
    until_time: datetime | None,
    page: int = 5000,
) -> Iterator[list[RecordedEvent]]:
    """The events of one course's (or assignment's) streams, in log order, cut at the moment, page by page."""
    if assignment_id:
        streams = [assignment_stream(org_id, course_id, assignment_id)]
        checks = check_stream(org_id, course_id, assignment_id, 0)[: -len("0")]
        prefixes = [student_stream(org_id, course_id, assignment_id, ""), checks]
    else:
        streams = []
        prefixes = [f"{kind}/{org_id}/{course_id}/" for kind in ("assignment", "student", "check")]
    after = 0
    while True:
        events = store.read_streams(streams, prefixes, after=after, limit=page)
        kept = [
            e
            for e in events
            if (until_position is None or e.position <= until_position)
            and (until_time is None or e.recorded_at <= until_time)
        ]
        if kept:
            yield kept
        if len(kept) < len(events) or len(events) < page:
            return  # the moment is passed (positions and recorded_at only grow) or the log ends
        after = events[-1].position


def replay_view(
    engine: Engine,
    *,
    until_position: int | None = None,
    until_time: str | None = None,
    course_id: str | None = None,
    assignment_id: str | None = None,
    org_id: int = 1,
) -> dict[str, Any]:
    """The exchange as it stood at a moment: releases, submissions (by archive hash), feedback.

    Built in a private in-memory database; replaying the same moment twice
    gives the same answer.
    """
    moment = parse_timestamp(until_time) if until_time else None
    pages = None
    if course_id:
        # Only the course's (or the assignment's) streams: memory and time follow its size, not the log's.
        pages = _course_pages(SQLEventStore(engine), org_id, course_id, assignment_id, until_position, moment)
    then = replay(engine, PROJECTIONS, until_position=until_position, until_time=moment, pages=pages)
    with then.connect() as conn:
        courses = [course_id] if course_id else sorted({r.course_id for r in conn.execute(history.select())})
        view: dict[str, Any] = {
            "until_position": until_position,
            "until_time": format_timestamp(moment) if moment else None,
            "courses": [],
        }
        for course in courses:
            entry: dict[str, Any] = {"course_id": course, "assignments": []}
            for release in course_releases(conn, org_id, course):
                if assignment_id and release.assignment_id != assignment_id:
                    continue
                subs = list_submissions(conn, org_id, course, release.assignment_id)
                entry["assignments"].append(
                    {
                        "assignment_id": release.assignment_id,
                        "released_at": format_timestamp(release.released_at),
                        "archive_sha256": release.archive_sha256,
                        "submissions": [
                            {
                                "student_id": s["student_id"],
                                "timestamp": format_timestamp(s["timestamp"]),
                                "recorded_at": format_timestamp(s["recorded_at"]),
                                "position": s["position"],
                                "archive_sha256": s["archive_sha256"],
                                "archive_state": s["archive_state"],
                                "collected": s["collected_count"],
                                "latest": s["latest"],
                            }
                            for s in subs
                        ],
                    }
                )
            view["courses"].append(entry)
    then.dispose()
    return view
