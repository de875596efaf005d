"""For auditors: verify the chain and the archives, export the log, replay it to a moment."""

from __future__ import annotations

import functools
import hashlib
import json
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO, TypeVar
from urllib.parse import quote

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from nbexchange.clock import format_iso, format_timestamp, parse_timestamp
from nbexchange.db import with_pg_options
from nbexchange.errors import ExchangeError, Invalid
from nbexchange.events.domain import (
    Actor,
    DomainEvent,
    Submitted,
    Unreleased,
    assignment_stream,
    check_stream,
    decode,
    student_stream,
)
from nbexchange.events.sql import SQLEventStore, StoredRow
from nbexchange.events.store import RecordedEvent, canonical_json, check_links
from nbexchange.projections import PROJECTIONS, Projection, checkpoints, replay, snapshot
from nbexchange.projections.assignments import Release, course_releases
from nbexchange.projections.blobs import RELEASED, owned_blob
from nbexchange.projections.collections import list_submissions
from nbexchange.projections.history import history
from nbexchange.storage import ArchiveStore

_T = TypeVar("_T")

#: Payload fields that name a stored archive (or feedback file) by its sha256.
_STORED = ("archive_sha256", "feedback_sha256")

_BACKWARDS = "recorded_at is earlier than the previous event's"

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

    Also checks that ``recorded_at`` never runs backwards, that every
    payload decodes into its domain event, and that the event at each of
    ``heads`` (recorded outside the log) still carries its hash: a log
    rewritten with recomputed hashes, or cut short, is consistent with
    itself but not with a head kept elsewhere.

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
    last: StoredRow | None = None

    def links() -> Iterator[tuple[int, str, str, bool]]:
        # One pass over the stored rows: the chain's check and these share each page read.
        nonlocal last
        for page in store.read_rows(until_position=until_position):
            for row in page:
                if last is not None and row.recorded_at < last.recorded_at:
                    faults.append(
                        {"position": row.position, "reason": "recorded_at is earlier than the previous event's"}
                    )
                if row.position in expected:
                    found[row.position] = row.hash
                try:
                    payload = orjson.loads(row.payload)
                    data = decode(row.type, row.schema, payload)
                except (KeyError, TypeError, ValueError) as e:  # orjson's JSONDecodeError is a ValueError
                    faults.append({"position": row.position, "reason": f"the payload does not decode: {e}"})
                    yield row.position, row.prev_hash, row.hash, _decodes_and_matches(row)
                else:
                    _note_archives(row.position, row.type, payload, data, named, owners, releases)
                    yield row.position, row.prev_hash, row.hash, hash_matches(row, payload)
                last = row

    chain = check_links(links())
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
            "position": last.position if last else 0,
            "hash": chain.head_hash,
            "recorded_at": format_iso(last.recorded_at) if last else None,
        },
        "head_hash": chain.head_hash,
        "heads_checked": len(expected),
        "archives": checked,
        "unnamed": sorted(sha for sha, _ in archives.blobs() if sha not in named),
        "faults": faults,
    }


def _note_archives(
    position: int,
    type_: str,
    payload: dict[str, Any],
    data: DomainEvent,
    named: dict[str, int],
    owners: dict[str, set[int]],
    releases: dict[tuple[int, str, str], list[tuple[int, str]]],
) -> None:
    """Record which archives an event names and owns, and which a purge disowned."""
    if type_ not in ("archive_unpacked", "archive_rejected"):
        for field in _STORED:
            sha = payload.get(field)
            if isinstance(sha, str):
                named.setdefault(sha, position)
    owned = owned_blob(data)
    assignment = (data.org_id, data.course_id, data.assignment_id)
    if owned is not None:
        sha, kind = owned
        owners.setdefault(sha, set()).add(position)
        if kind == RELEASED:
            releases.setdefault(assignment, []).append((position, sha))
    elif isinstance(data, Unreleased) and data.purge:
        for released_at, sha in releases.pop(assignment, []):
            owners[sha].discard(released_at)


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
        with replay(engine, projections, until_position=mark) as rebuilt:
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
    for page in store.read_rows():
        lines = []
        for row in page:
            payload = orjson.loads(row.payload)
            fields = _fast_fields(row, payload)
            if fields is not None:
                # orjson wrote these fields canonically (their hash proves it); the two
                # hashes added are hex strings, which every encoder writes alike.
                fields.update(prev_hash=row.prev_hash, hash=row.hash)
                lines.append(orjson.dumps(fields, option=orjson.OPT_SORT_KEYS).decode("utf-8"))
            else:
                lines.append(canonical_json(row.event(payload).to_json()))
        lines.append("")
        out.write("\n".join(lines))
        count += len(page)
    return count


def hash_matches(row: StoredRow, payload: dict[str, Any]) -> bool:
    """Whether the row's hash is the one its fields and ``prev_hash`` make: ``computed_hash() == hash``, faster.

    ``payload`` is the row's, decoded. orjson encodes the fields first,
    several times faster than the standard library, the actor's as its
    decoded value encodes (once per actor); those bytes hashing to the
    recorded hash proves they are the canonical encoding (barring a SHA-256
    collision). Any other outcome is decided by the canonical encoder
    itself, so the answer is always that of ``computed_hash``.
    """
    return _fast_fields(row, payload) is not None or row.event(payload).computed_hash() == row.hash


def _decodes_and_matches(row: StoredRow) -> bool:
    """:func:`hash_matches` for a row whose payload may not decode: one that does not has no hash to match."""
    try:
        payload = orjson.loads(row.payload)
    except ValueError:
        return False
    return hash_matches(row, payload)


def _fast_fields(row: StoredRow, payload: dict[str, Any]) -> dict[str, Any] | None:
    """The row's hashed fields if orjson's encoding of them hashes to ``hash``, else None.

    The actor is there as its encoded text (an ``orjson.Fragment``): add to
    the fields and encode them again with ``OPT_SORT_KEYS``.
    """
    actor = _actor_text(row.actor)
    if actor is None:
        return None
    fields = {
        "position": row.position,
        "stream": row.stream,
        "version": row.version,
        "type": row.type,
        "schema": row.schema,
        "actor": actor,
        "recorded_at": format_iso(row.recorded_at),
        "idempotency_key": row.idempotency_key,
        "payload": payload,
    }
    try:
        text = orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # beyond orjson (an integer over 64 bits): the canonical encoder decides
        return None
    digest = hashlib.sha256(row.prev_hash.encode("ascii") + b"\n" + text).hexdigest()
    return fields if digest == row.hash else None


@functools.lru_cache(maxsize=4096)
def _actor_text(stored: str) -> orjson.Fragment | None:
    """The actor's encoding as the chain hashes it (its decoded value's), once per stored text; None if none."""
    try:
        actor = Actor.from_json(orjson.loads(stored))
        return orjson.Fragment(orjson.dumps(actor.to_json(), option=orjson.OPT_SORT_KEYS))
    except (KeyError, TypeError, ValueError):
        return None


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


def write_replay(
    engine: Engine,
    out: TextIO,
    *,
    until_position: int | None = None,
    until_time: str | None = None,
    course_id: str | None = None,
    assignment_id: str | None = None,
    org_id: int = 1,
) -> None:
    """Write the exchange as it stood at a moment, as indented JSON: releases, submissions (by archive hash).

    The read models are rebuilt in a private database on disk (see
    :func:`~nbexchange.projections.replay`) and written one assignment at a
    time, so memory follows the largest assignment, not the log. The text is
    ``json.dumps(view, indent=2)`` of the whole view; replaying the same
    moment twice writes the same bytes.
    """
    moment = parse_timestamp(until_time) if until_time else None
    pages = None
    if course_id:
        # Only the course's (or the assignment's) streams: time follows its size, not the log's.
        pages = _course_pages(SQLEventStore(engine), org_id, course_id, assignment_id, until_position, moment)
    then = replay(engine, PROJECTIONS, until_position=until_position, until_time=moment, pages=pages)
    with then as private, private.connect() as conn:
        courses = [course_id] if course_id else _replayed_courses(conn, org_id)
        out.write(f'{{\n  "until_position": {json.dumps(until_position)},\n')
        out.write(f'  "until_time": {json.dumps(format_timestamp(moment) if moment else None)},\n')
        out.write('  "courses": ')
        _write_list(out, courses, 1, lambda course: _write_course(out, conn, org_id, course, assignment_id))
        out.write("\n}\n")


def _replayed_courses(conn: Connection, org_id: int) -> list[str]:
    """The organisation's courses with any event in the replayed read models, in code point order."""
    query = sa.select(history.c.course_id).where(history.c.org_id == org_id).distinct()
    return sorted(conn.scalars(query))


def _write_course(out: TextIO, conn: Connection, org_id: int, course_id: str, assignment_id: str | None) -> None:
    """One course's entry (at depth 2 of the view): its releases, each with its submissions."""
    releases = [r for r in course_releases(conn, org_id, course_id) if assignment_id in (None, r.assignment_id)]

    def write_assignment(release: Release) -> None:
        entry = _assignment_entry(release, list_submissions(conn, org_id, course_id, release.assignment_id))
        # JSON text has no raw newline inside a value: each line is indented as json.dumps nests it.
        out.write(json.dumps(entry, indent=2).replace("\n", "\n" + "  " * 4))

    out.write(f'{{\n      "course_id": {json.dumps(course_id)},\n      "assignments": ')
    _write_list(out, releases, 3, write_assignment)
    out.write("\n    }")


def _write_list(out: TextIO, items: Iterable[_T], depth: int, write_item: Callable[[_T], None]) -> None:
    """Write a list at ``depth`` of an indented JSON document as ``json.dumps(indent=2)`` does, item by item."""
    first = True
    for item in items:
        out.write("[\n" if first else ",\n")
        out.write("  " * (depth + 1))
        write_item(item)
        first = False
    out.write("[]" if first else "\n" + "  " * depth + "]")


def _assignment_entry(release: Release, submissions: list[dict[str, Any]]) -> dict[str, Any]:
    return {
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
            for s in submissions
        ],
    }
