"""For auditors: verify the chain and the archives, export the log, replay it to a moment."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy.engine import Engine

from nbexchange.clock import format_timestamp, parse_timestamp
from nbexchange.events.domain import Unreleased
from nbexchange.events.sql import SQLEventStore
from nbexchange.projections import PROJECTIONS, replay
from nbexchange.projections.assignments import course_releases
from nbexchange.projections.blobs import RELEASED, owned_blob
from nbexchange.projections.collections import list_submissions
from nbexchange.projections.history import history
from nbexchange.storage import ArchiveStore

#: Payload fields that name a stored archive (or feedback file) by its sha256.
_STORED = ("archive_sha256", "feedback_sha256")


def verify(store: SQLEventStore, storage: Path) -> dict[str, Any]:
    """Recompute every hash of the chain, and the sha256 of every archive an event names.

    A missing archive is a fault unless no event owns it any more: the
    releases that owned it were purged (``unreleased`` with ``purge``) and
    no submission or feedback is of the same bytes. Stored blobs that no
    event names are listed (``unnamed``): a refused upload's, or a crash's,
    which the blob collector removes after its grace. Nothing is written.
    """
    chain = store.verify()
    archives = ArchiveStore(storage, create=False)
    named: dict[str, int] = {}
    owners: dict[str, set[int]] = {}
    releases: dict[tuple[int, str, str], list[tuple[int, str]]] = {}
    faults = [{"position": f.position, "reason": f.reason} for f in chain.faults]
    for event in store.read():
        for field in _STORED:
            sha = event.payload.get(field)
            if isinstance(sha, str) and event.type not in ("archive_unpacked", "archive_rejected"):
                named.setdefault(sha, event.position)
        try:
            data, owned = event.data, owned_blob(event)
        except (KeyError, TypeError, ValueError) as e:
            faults.append({"position": event.position, "reason": f"the payload does not decode: {e}"})
            continue
        assignment = (data.org_id, data.course_id, data.assignment_id)
        if owned is not None:
            sha, kind = owned
            owners.setdefault(sha, set()).add(event.position)
            if kind == RELEASED:
                releases.setdefault(assignment, []).append((event.position, sha))
        elif isinstance(data, Unreleased) and data.purge:
            for position, sha in releases.pop(assignment, []):
                owners[sha].discard(position)
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
    return {
        "ok": not faults,
        "events": chain.checked,
        "head_hash": chain.head_hash,
        "archives": checked,
        "unnamed": sorted(sha for sha, _ in archives.blobs() if sha not in named),
        "faults": faults,
    }


def export(store: SQLEventStore, out: TextIO) -> int:
    """Write every event, hashes included, one JSON object per line; returns the count."""
    count = 0
    for event in store.read():
        out.write(json.dumps(event.to_json(), sort_keys=True) + "\n")
        count += 1
    return count


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
    then = replay(engine, PROJECTIONS, until_position=until_position, until_time=moment)
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
