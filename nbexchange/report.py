"""For exam boards: one assignment's record, student by student, from the log alone.

Every figure comes from the events of the assignment's own stream (releases,
withdrawals, due dates) and of its students' streams (fetches, submissions,
extensions, collections, feedback), read in log order up to one position; the
report names that position and its hash, so two runs at the same position
give the same report, and anyone holding the log can check it.
"""

from __future__ import annotations

import csv
import html
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from nbexchange.clock import format_iso
from nbexchange.errors import NotFound
from nbexchange.events.domain import (
    Collected,
    DueDateSet,
    ExtensionGranted,
    FeedbackFetched,
    FeedbackReleased,
    Fetched,
    Released,
    Submitted,
    Unreleased,
    assignment_stream,
    student_stream,
)
from nbexchange.events.sql import SQLEventStore
from nbexchange.events.store import RecordedEvent

ON_TIME, LATE, MISSING, NO_DUE_DATE = "on time", "late", "missing", "no due date"

#: Events read per page: the report holds one assignment's students, never the log.
PAGE = 2000


@dataclass
class _Submission:
    position: int
    timestamp: datetime  # the client's
    recorded_at: datetime  # the server's
    archive_sha256: str


@dataclass
class _Student:
    student_id: str
    full_name: str | None = None
    fetched: int = 0
    extension: datetime | None = None
    submissions: list[_Submission] = field(default_factory=list)
    collections: list[tuple[int, str, datetime, int]] = field(default_factory=list)  # position, by, at, submission
    feedback: list[tuple[int, str, datetime, str]] = field(default_factory=list)  # position, by, at, notebook
    feedback_fetched: int = 0


def log_position(store: SQLEventStore, as_of: datetime | None) -> RecordedEvent | None:
    """The last event of the log, or the last recorded at or before ``as_of`` (None: no such event).

    ``recorded_at`` never runs backwards along the log, so the moment is
    found by bisection: a few reads, whatever the log's length.
    """
    low, high = 0, store.head()  # the answer is in [low, high]; 0 is "before the first event"
    if as_of is None:
        return store.get(high) if high else None
    while low < high:
        middle = (low + high + 1) // 2
        if store.get(middle).recorded_at <= as_of:
            low = middle
        else:
            high = middle - 1
    return store.get(low) if low else None


def _assignment_events(
    store: SQLEventStore, org_id: int, course_id: str, assignment_id: str, until: int
) -> Iterator[RecordedEvent]:
    stream = assignment_stream(org_id, course_id, assignment_id)
    prefix = student_stream(org_id, course_id, assignment_id, "")
    after = 0
    while True:
        page = store.read_streams([stream], [prefix], after=after, limit=PAGE)
        for event in page:
            if event.position > until:
                return
            yield event
        if len(page) < PAGE:
            return
        after = page[-1].position


def build_report(
    store: SQLEventStore,
    course_id: str,
    assignment_id: str,
    *,
    org_id: int = 1,
    deadline: datetime | None = None,
    as_of: datetime | None = None,
    max_clock_skew: float = 300.0,
) -> dict[str, Any]:
    """The assignment's record per student, as JSON-ready data.

    The due date is ``deadline`` if given, else the one in force in the log
    (the last release's or ``due_date_set``'s); a student's extension
    replaces it for them either way. A student is on time if their last
    submission was recorded (server time) by their due date. Students the log
    knows of (who fetched, submitted or were granted an extension) are
    listed; ``missing`` ones have not submitted. ``NotFound`` if the
    assignment was never released by then.
    """
    head = log_position(store, as_of)
    until = head.position if head else 0
    students: dict[str, _Student] = {}
    history: list[dict[str, Any]] = []
    due_date: datetime | None = None
    for event in _assignment_events(store, org_id, course_id, assignment_id, until):
        data = event.data
        if isinstance(data, (Released, Unreleased, DueDateSet)):
            # A release without a due date keeps the one before; a change sets (or removes) it.
            if (isinstance(data, Released) and data.due_date is not None) or isinstance(data, DueDateSet):
                due_date = data.due_date
            history.append(
                {
                    "position": event.position,
                    "type": event.type,
                    "by": event.actor.name,
                    "at": format_iso(event.recorded_at),
                    "due_date": _iso(due_date),
                }
            )
            continue
        student_id = getattr(data, "student_id", None)
        if student_id is None:
            continue
        student = students.setdefault(student_id, _Student(student_id))
        if isinstance(data, Submitted):
            student.full_name = event.actor.full_name or student.full_name
            student.submissions.append(
                _Submission(event.position, data.timestamp, event.recorded_at, data.archive_sha256)
            )
        elif isinstance(data, Fetched):
            student.fetched += 1
        elif isinstance(data, ExtensionGranted):
            student.extension = data.due_date
        elif isinstance(data, Collected):
            student.collections.append((event.position, event.actor.name, event.recorded_at, data.submission_position))
        elif isinstance(data, FeedbackReleased):
            student.feedback.append((event.position, event.actor.name, event.recorded_at, data.notebook_id))
        elif isinstance(data, FeedbackFetched):
            student.feedback_fetched += 1
    if not history:
        raise NotFound(f"Assignment {assignment_id!r} was never released in course {course_id!r} by then.")
    assignment_due = deadline if deadline is not None else due_date
    rows = [_student_row(s, assignment_due, max_clock_skew) for _, s in sorted(students.items())]
    return {
        "org_id": org_id,
        "course_id": course_id,
        "assignment_id": assignment_id,
        "log": {
            "position": until,
            "hash": head.hash if head else None,
            "recorded_at": _iso(head.recorded_at if head else None),
        },
        "as_of": _iso(as_of),
        "due_date": _iso(assignment_due),
        "due_date_source": "--deadline" if deadline is not None else "log" if due_date is not None else None,
        "max_clock_skew": max_clock_skew,
        "history": history,
        "summary": {
            "students": len(rows),
            **{status: sum(r["status"] == status for r in rows) for status in (ON_TIME, LATE, MISSING, NO_DUE_DATE)},
            "skew_flagged": sum(r["skew_flagged"] for r in rows),
            "collected_not_last": sum(r["collected_position"] not in (None, r["last_position"]) for r in rows),
        },
        "students": rows,
    }


def _student_row(student: _Student, assignment_due: datetime | None, max_clock_skew: float) -> dict[str, Any]:
    due = student.extension or assignment_due
    subs = student.submissions
    last = subs[-1] if subs else None
    if last is None:
        status, late_by = MISSING, None
    elif due is None:
        status, late_by = NO_DUE_DATE, None
    else:
        late_by = (last.recorded_at - due).total_seconds()
        status = LATE if late_by > 0 else ON_TIME
    collected = student.collections[-1] if student.collections else None
    return {
        "student_id": student.student_id,
        "full_name": student.full_name,
        "due_date": _iso(due),
        "extension": student.extension is not None,
        "status": status,
        "late_by_seconds": late_by if status == LATE else None,
        "submissions": len(subs),
        "resubmissions": max(len(subs) - 1, 0),
        "last_position": last.position if last else None,
        "last_recorded_at": _iso(last.recorded_at if last else None),
        "last_timestamp": _iso(last.timestamp if last else None),
        "clock_skew_seconds": (last.timestamp - last.recorded_at).total_seconds() if last else None,
        "skew_flagged": any(abs((s.timestamp - s.recorded_at).total_seconds()) > max_clock_skew for s in subs),
        "collected_position": collected[3] if collected else None,
        "collections": len(student.collections),
        "collected_by": sorted({c[1] for c in student.collections}),
        "feedback_releases": len(student.feedback),
        "feedback_released_by": sorted({f[1] for f in student.feedback}),
        "feedback_fetched": student.feedback_fetched,
        "fetched": student.fetched,
        "submission_list": [
            {
                "position": s.position,
                "timestamp": format_iso(s.timestamp),
                "recorded_at": format_iso(s.recorded_at),
                "archive_sha256": s.archive_sha256,
                "late": due is not None and s.recorded_at > due,
            }
            for s in subs
        ],
    }


def _iso(moment: datetime | None) -> str | None:
    return format_iso(moment) if moment is not None else None


# -- renderings ---------------------------------------------------------------------------------------

#: The columns of the table and the CSV: heading, and the row's value for each.
COLUMNS = (
    ("student", "student_id"),
    ("name", "full_name"),
    ("status", "status"),
    ("late by", "late_by_seconds"),
    ("due", "due_date"),
    ("extension", "extension"),
    ("submissions", "submissions"),
    ("resubmissions", "resubmissions"),
    ("last submitted (server)", "last_recorded_at"),
    ("client timestamp", "last_timestamp"),
    ("client - server (s)", "clock_skew_seconds"),
    ("skew over limit", "skew_flagged"),
    ("last submission", "last_position"),
    ("collected submission", "collected_position"),
    ("collections", "collections"),
    ("collected by", "collected_by"),
    ("feedback releases", "feedback_releases"),
    ("feedback by", "feedback_released_by"),
)


def duration(seconds: float) -> str:
    """``seconds`` as people read a lateness: ``2 d 03:04:05``, ``0:12:30``."""
    whole = int(round(seconds))
    days, rest = divmod(whole, 86400)
    text = f"{rest // 3600}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days} d {text}" if days else text


def _cell(key: str, value: Any) -> str:
    """A value as the table and the HTML page show it."""
    if value is None:
        return ""
    if key == "late_by_seconds":
        return duration(value)
    if key == "clock_skew_seconds":
        return f"{value:+.0f}"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, list):
        return ", ".join(value)
    if isinstance(value, str) and key.endswith(("_at", "_date", "_timestamp")):
        return value[:19].replace("T", " ")  # to the second, UTC
    return str(value)


def _heading(report: dict[str, Any]) -> list[str]:
    log = report["log"]
    due = report["due_date"]
    return [
        f"Course {report['course_id']}, assignment {report['assignment_id']} (organisation {report['org_id']})",
        f"Made from the log up to position {log['position']}, head hash {log['hash']}"
        + (f", as of {report['as_of']}" if report["as_of"] else ""),
        f"Due date: {due + ' (' + report['due_date_source'] + ')' if due else 'none recorded'}; "
        f"clock skew flagged over {report['max_clock_skew']:.0f} s; times in UTC",
        "Summary: " + ", ".join(f"{k} {v}" for k, v in report["summary"].items()),
    ]


def render_table(report: dict[str, Any]) -> str:
    """A plain-text table for a terminal."""
    rows = [[heading for heading, _ in COLUMNS]]
    rows += [[_cell(key, student[key]) for _, key in COLUMNS] for student in report["students"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(_heading(report) + [""] + lines) + "\n"


def render_csv(report: dict[str, Any]) -> str:
    """One row per student; times ISO 8601, durations in seconds; lists joined with spaces."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([key for _, key in COLUMNS] + ["log_position", "log_hash"])
    for student in report["students"]:
        values = [student[key] for _, key in COLUMNS]
        writer.writerow(
            [" ".join(v) if isinstance(v, list) else "" if v is None else v for v in values]
            + [report["log"]["position"], report["log"]["hash"]]
        )
    return out.getvalue()


def render_html(report: dict[str, Any]) -> str:
    """A self-contained page: the heading, the plot of submissions against the due date, the table."""
    escape = html.escape
    head = "".join(f"<p>{escape(line)}</p>" for line in _heading(report))
    header_cells = "".join(f"<th>{escape(heading)}</th>" for heading, _ in COLUMNS)
    body = "".join(
        f'<tr class="{escape(s["status"].replace(" ", "-"))}">'
        + "".join(f"<td>{escape(_cell(key, s[key]))}</td>" for _, key in COLUMNS)
        + "</tr>"
        for s in report["students"]
    )
    title = escape(f"{report['course_id']} {report['assignment_id']}: submissions")
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:90%}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}tr.late{background:#fde2e2}"
        "tr.missing{background:#eee}</style></head><body>"
        f"<h1>{title}</h1>{head}<figure>{plot_svg(report)}</figure>"
        f"<table><thead><tr>{header_cells}</tr></thead><tbody>{body}</tbody></table></body></html>\n"
    )


def plot_svg(report: dict[str, Any]) -> str:
    """Submissions over time (server time; each student's last one marked on time or late) against the due date."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import dates

    # matplotlib's own date numbers (its axes take no datetimes in its type stubs); typed here, as it is not there.
    date2num: Callable[[datetime], float] = dates.date2num
    times = sorted(
        (date2num(datetime.fromisoformat(s["recorded_at"])), s["late"])
        for student in report["students"]
        for s in student["submission_list"]
    )
    with matplotlib.rc_context({"svg.hashsalt": "nbexchange", "svg.fonttype": "none"}):
        figure, axes = plt.subplots(figsize=(9, 3.5))
        try:
            if times:
                counts = range(1, len(times) + 1)
                axes.step([t for t, _ in times], counts, where="post", color="#555", label="submissions")
                late = [(t, n) for n, (t, is_late) in enumerate(times, start=1) if is_late]
                if late:
                    xs, ys = [t for t, _ in late], [n for _, n in late]
                    axes.scatter(xs, ys, color="#c00", s=12, zorder=3, label="late")
            if report["due_date"]:
                due = date2num(datetime.fromisoformat(report["due_date"]))
                axes.axvline(due, color="#c00", linestyle="--", label="due")
            axes.xaxis_date()
            axes.set_xlabel("server time (UTC)")
            axes.set_ylabel("submissions so far")
            axes.legend(loc="upper left")
            figure.autofmt_xdate()
            out = io.StringIO()
            figure.savefig(out, format="svg", metadata={"Date": None}, bbox_inches="tight")
        finally:
            plt.close(figure)
    svg = out.getvalue()
    return svg[svg.index("<svg") :]  # inline: without the XML prolog


RENDERERS = {"table": render_table, "csv": render_csv, "html": render_html}
