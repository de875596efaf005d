"""The exam board's report, on a history with known answers: table, CSV, HTML and JSON agree with the log."""

from __future__ import annotations

import csv
import io
import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from builders import TEACHER, release, student
from test_app import nbexchange

from nbexchange.clock import format_iso, utcnow
from nbexchange.db import make_engine, upgrade
from nbexchange.events.domain import (
    INSTRUCTOR,
    Actor,
    Collected,
    DueDateSet,
    ExtensionGranted,
    FeedbackReleased,
    Fetched,
    Submitted,
    Unreleased,
)
from nbexchange.events.sql import SQLEventStore
from nbexchange.events.store import AppendRequest, RecordedEvent
from nbexchange.report import build_report, duration

BOB = Actor(name="bob", role=INSTRUCTOR)
SKEW = 300.0


@dataclass
class History:
    """A log whose every answer is known: positions and server times of the events that decide them."""

    root: Path
    due: datetime  # the assignment's due date, in force at the end
    extension: datetime
    events: dict[str, RecordedEvent]

    @property
    def flags(self) -> tuple[str, ...]:
        return (
            f"--NbExchange.db_url=sqlite:///{self.root / 'log.sqlite'}",
            f"--NbExchange.base_storage_location={self.root}",
        )

    def run(self, *args: str) -> str:
        result = nbexchange("report", "--course=phys101", "--assignment=ps1", *args, *self.flags)
        assert result.returncode == 0, result.stderr
        return result.stdout


def build_history(root: Path) -> History:
    engine = make_engine(f"sqlite:///{root / 'log.sqlite'}")
    upgrade(engine)
    store = SQLEventStore(engine)
    events: dict[str, RecordedEvent] = {}

    def append(name: str, event, actor: Actor) -> RecordedEvent:
        events[name] = store.append(AppendRequest(event, actor)).event
        return events[name]

    def submit(name: str, who: str, skew: timedelta = timedelta(0), sha: str = "b" * 64) -> RecordedEvent:
        stamp = utcnow() + skew
        return append(name, Submitted(1, "phys101", "ps1", who, stamp, sha, 20), student(who))

    store.append(release(sha="a" * 64))
    append("unreleased", Unreleased(1, "phys101", "ps1"), TEACHER)
    store.append(release(sha="c" * 64))
    store.append(release(assignment="ps2", sha="d" * 64))  # another assignment: not in the report
    append("fetch", Fetched(1, "phys101", "ps1", "missing", 3, "c" * 64), student("missing"))
    ontime = submit("ontime", "ontime")
    first = submit("resub-1", "resub", sha="e" * 64)
    submit("resub-2", "resub", sha="f" * 64)
    submit("backdated", "backdated", skew=-timedelta(hours=2))  # the student's clock two hours behind
    time.sleep(0.01)
    due = utcnow()
    time.sleep(0.01)
    submit("late", "late")
    submit("extended", "extended")
    append("collect-1", Collected(1, "phys101", "ps1", "ontime", ontime.position, "b" * 64), TEACHER)
    append("collect-2", Collected(1, "phys101", "ps1", "ontime", ontime.position, "b" * 64), BOB)
    append("collect-resub", Collected(1, "phys101", "ps1", "resub", first.position, "e" * 64), TEACHER)
    for name, who in (("feedback-1", TEACHER), ("feedback-2", BOB)):
        feedback = FeedbackReleased(1, "phys101", "ps1", "ontime", "nb1", ontime.data.timestamp, "x", "7" * 64, 5)
        append(name, feedback, who)
    append("due", DueDateSet(1, "phys101", "ps1", due), TEACHER)
    extension = due + timedelta(days=1)
    append("extension", ExtensionGranted(1, "phys101", "ps1", "extended", extension), TEACHER)
    engine.dispose()
    return History(root, due, extension, events)


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> History:
    return build_history(tmp_path_factory.mktemp("history"))


@pytest.fixture(scope="module")
def report(history: History) -> dict:
    engine = make_engine(f"sqlite:///{history.root / 'log.sqlite'}")
    try:
        return build_report(SQLEventStore(engine), "phys101", "ps1", max_clock_skew=SKEW)
    finally:
        engine.dispose()


def by_student(report: dict) -> dict[str, dict]:
    return {row["student_id"]: row for row in report["students"]}


def late_by(history: History, name: str) -> float:
    return (history.events[name].recorded_at - history.due).total_seconds()


def test_each_student_has_the_known_answer(history, report):
    rows = by_student(report)
    assert sorted(rows) == ["backdated", "extended", "late", "missing", "ontime", "resub"]
    expected = {
        "ontime": ("on time", None, 1, False),
        "resub": ("on time", None, 2, False),
        "backdated": ("on time", None, 1, True),
        "late": ("late", late_by(history, "late"), 1, False),
        "extended": ("on time", None, 1, False),
        "missing": ("missing", None, 0, False),
    }
    answers = {k: (r["status"], r["late_by_seconds"], r["submissions"], r["skew_flagged"]) for k, r in rows.items()}
    assert answers == expected
    assert rows["late"]["late_by_seconds"] > 0
    assert rows["extended"]["due_date"] == format_iso(history.extension) and rows["extended"]["extension"] is True
    assert rows["late"]["due_date"] == format_iso(history.due) and rows["late"]["extension"] is False
    assert rows["resub"]["resubmissions"] == 1
    # What was collected is not what was last submitted.
    assert rows["resub"]["collected_position"] == history.events["resub-1"].position
    assert rows["resub"]["last_position"] == history.events["resub-2"].position
    assert rows["ontime"]["collections"] == 2 and rows["ontime"]["collected_by"] == ["ada", "bob"]
    assert rows["ontime"]["feedback_releases"] == 2 and rows["ontime"]["feedback_released_by"] == ["ada", "bob"]
    skew = rows["backdated"]["clock_skew_seconds"]
    assert -7300 < skew < -7100  # two hours behind, give or take the time to commit
    assert report["summary"] == {
        "students": 6,
        "on time": 4,
        "late": 1,
        "missing": 1,
        "no due date": 0,
        "skew_flagged": 1,
        "collected_not_last": 1,
    }


def test_the_report_names_the_log_it_was_made_from_and_its_history(history, report):
    last = history.events["extension"]
    assert report["log"] == {
        "position": last.position,
        "hash": last.hash,
        "recorded_at": format_iso(last.recorded_at),
    }
    assert [h["type"] for h in report["history"]] == ["released", "unreleased", "released", "due_date_set"]
    assert report["due_date"] == format_iso(history.due) and report["due_date_source"] == "log"


def test_as_of_reports_the_log_as_it_stood(history):
    moment = history.events["late"].recorded_at
    text = history.run("--format=csv", f"--as-of={format_iso(moment)}")
    students = {r["student_id"] for r in csv.DictReader(io.StringIO(text))}
    assert students == {"backdated", "late", "missing", "ontime", "resub"}
    engine = make_engine(f"sqlite:///{history.root / 'log.sqlite'}")
    try:
        then = build_report(SQLEventStore(engine), "phys101", "ps1", as_of=moment)
    finally:
        engine.dispose()
    assert then["log"]["position"] == history.events["late"].position
    assert then["due_date"] is None  # not yet set then: no judgement
    assert {r["student_id"]: r["status"] for r in then["students"]} == {
        "backdated": "no due date",
        "late": "no due date",
        "missing": "missing",
        "ontime": "no due date",
        "resub": "no due date",
    }


def test_a_deadline_given_replaces_the_logs_but_not_extensions(history):
    deadline = history.due + timedelta(hours=1)
    table = history.run(f"--deadline={format_iso(deadline)}", "--format=csv")
    rows = {r["student_id"]: r for r in csv.DictReader(io.StringIO(table))}
    assert rows["late"]["status"] == "on time"
    assert rows["extended"]["due_date"] == format_iso(history.extension)


def test_csv_has_one_row_per_student_with_the_known_answers(history, report):
    text = history.run("--format=csv")
    rows = {r["student_id"]: r for r in csv.DictReader(io.StringIO(text))}
    assert {k: r["status"] for k, r in rows.items()} == {k: r["status"] for k, r in by_student(report).items()}
    assert float(rows["late"]["late_by_seconds"]) == late_by(history, "late")
    assert rows["ontime"]["collected_by"] == "ada bob" and rows["ontime"]["feedback_releases"] == "2"
    assert rows["backdated"]["skew_flagged"] == "True" and rows["missing"]["submissions"] == "0"
    assert {r["log_hash"] for r in rows.values()} == {report["log"]["hash"]}


def test_the_table_reads_as_the_report(history, report):
    text = history.run()
    assert f"up to position {report['log']['position']}, head hash {report['log']['hash']}" in text
    lines = {line.split()[0]: line for line in text.splitlines()[6:]}
    assert " late " in lines["late"] and duration(late_by(history, "late")) in lines["late"]
    assert " missing" in lines["missing"] and " on time " in lines["extended"]
    assert "ada, bob" in lines["ontime"]


def test_the_html_page_is_self_contained_with_a_plot_and_the_same_every_time(history, report, tmp_path):
    out = tmp_path / "report.html"
    history.run("--format=html", f"--output={out}")
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page
    # Nothing fetched from elsewhere: no link, no remote source.
    assert not re.search(r'(src|href)="(https?:)?//', page) and "<link" not in page
    assert report["log"]["hash"] in page
    for name, status in (("late", "late"), ("missing", "missing"), ("resub", "on-time")):
        assert f'<tr class="{status}"><td>{name}</td>' in page
    again = history.run("--format=html")
    assert again == page


def test_a_report_of_an_assignment_never_released_exits_1(history):
    result = nbexchange("report", "--course=phys101", "--assignment=nope", *history.flags)
    assert result.returncode == 1 and "never released" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("--assignment=ps1",),
        ("--course=phys101",),
        ("--course=phys101", "--assignment=ps1", "--format=pdf"),
        ("--course=phys101", "--assignment=ps1", "--deadline=soon"),
        ("--course=phys101", "--assignment=ps1", "--as-of=2026-02-30"),
    ],
)
def test_a_report_asked_for_wrongly_exits_2(history, args):
    result = nbexchange("report", *args, *history.flags)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
