"""The audit commands on a copy of a log: read-only databases and stores, the command line, anchored heads."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from builders import TEACHER, make_archive, release, student
from hypothesis import given, settings
from hypothesis import strategies as st
from test_app import nbexchange

from nbexchange.clock import format_iso
from nbexchange.db import make_engine, upgrade
from nbexchange.events.domain import Collected, Submitted
from nbexchange.events.sql import SQLEventStore
from nbexchange.events.store import GENESIS, AppendRequest, RecordedEvent, canonical_json, chain_hash
from nbexchange.projections import catch_up_all
from nbexchange.storage import LocalArchiveStore

DUE = datetime(2026, 1, 31, 23, 59, tzinfo=timezone.utc)


@dataclass
class Backup:
    """A SQLite log and its store, as restored from a backup."""

    root: Path

    @property
    def db(self) -> Path:
        return self.root / "nbexchange.sqlite"

    @property
    def flags(self) -> tuple[str, ...]:
        return (f"--NbExchange.db_url=sqlite:///{self.db}", f"--NbExchange.base_storage_location={self.root}")

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return nbexchange(*args, *self.flags)


def make_log(root: Path) -> Backup:
    """A small log with stored archives, one student with a non-ASCII name, closed cleanly (no ``-wal``)."""
    backup = Backup(root)
    engine = make_engine(f"sqlite:///{backup.db}")
    upgrade(engine)
    store, archives = SQLEventStore(engine), LocalArchiveStore(root)
    released = archives.store_bytes(make_archive())
    store.append(release(sha=released.sha256))
    for name in ("s1", "zoë"):
        work = archives.store_bytes(make_archive({"nb1.ipynb": name.encode()}))
        event = Submitted(1, "phys101", "ps1", student_id=name, timestamp=DUE, archive_sha256=work.sha256,
                          archive_size=work.size)
        position = store.append(AppendRequest(event, student(name))).event.position
    store.append(AppendRequest(Collected(1, "phys101", "ps1", "zoë", position, work.sha256), TEACHER))
    catch_up_all(engine)
    engine.dispose()
    return backup


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Backup:
    return make_log(tmp_path_factory.mktemp("log"))


@pytest.fixture
def backup(original: Backup, tmp_path: Path) -> Backup:
    """A fresh copy of the log, for a test that changes it."""
    shutil.copytree(original.root, tmp_path / "copy")
    return Backup(tmp_path / "copy")


def tree(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every file and folder under ``root`` with its mode, size and mtime (ns)."""
    out = {}
    for path in [root, *root.rglob("*")]:
        info = path.stat()
        out[str(path.relative_to(root))] = (info.st_mode, info.st_size, info.st_mtime_ns)
    return out


def set_immutable(root: Path, on: bool) -> None:
    """``chattr ±i`` every file and folder: refused to root too, unlike permission bits."""
    paths = [str(p) for p in [root, *root.rglob("*")]]
    subprocess.run(["chattr", "+i" if on else "-i", *paths], check=True, capture_output=True)


def chattr_works(tmp: Path) -> bool:
    probe = tmp / "probe"
    probe.write_text("x")
    try:
        set_immutable(probe, True)
    except (OSError, subprocess.CalledProcessError):
        return False
    set_immutable(probe, False)
    return True


AUDITS = [("verify",), ("export",), ("replay", "--course=phys101"), ("report", "--course=phys101", "--assignment=ps1")]


# -- safe on a backup ----------------------------------------------------------------------


@pytest.mark.parametrize("args", AUDITS, ids=lambda a: a[0])
def test_audit_commands_change_nothing_in_the_folder_they_read(backup, args):
    """No ``-wal``/``-shm``, no store folders, no changed byte or mtime: the tree is the same after."""
    before = tree(backup.root)
    result = backup.run(*args)
    assert result.returncode == 0, result.stderr
    assert tree(backup.root) == before


@pytest.mark.parametrize("args", AUDITS, ids=lambda a: a[0])
def test_audit_commands_work_on_a_read_only_copy(backup, args, tmp_path):
    """Files and folders immutable (``chattr +i``), which root cannot write either: the commands still answer."""
    if not chattr_works(tmp_path):
        pytest.skip("this filesystem has no immutable attribute")
    fresh = backup.run(*args)
    shutil.rmtree(backup.root / "tmp")  # as a backup of the archives alone would be
    set_immutable(backup.root, True)
    try:
        result = backup.run(*args)
    finally:
        set_immutable(backup.root, False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == fresh.stdout


def test_audit_commands_read_a_live_database_beside_its_writer(backup):
    """A running service keeps its ``-wal``: the audit reads through it, committed events included."""
    engine = make_engine(f"sqlite:///{backup.db}")
    store = SQLEventStore(engine)
    try:
        with engine.connect():
            head = store.append(release(assignment="ps2", sha="c" * 64)).event.position
            assert backup.db.with_name("nbexchange.sqlite-wal").exists()
            result = backup.run("export")
    finally:
        engine.dispose()
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["position"] == head


def test_rebuild_refuses_a_missing_database(tmp_path):
    missing = tmp_path / "typo.sqlite"
    result = nbexchange("rebuild", f"--NbExchange.db_url=sqlite:///{missing}")
    assert result.returncode == 1 and "no nbexchange log" in result.stderr, result.stderr
    assert not missing.exists()


def test_a_command_without_a_database_setting_says_which_it_reads(tmp_path):
    result = nbexchange("verify", env={"NBEX_BASE_STORE": str(tmp_path)})
    assert result.returncode == 1
    assert f"No db_url set: using sqlite:///{tmp_path / 'nbexchange.sqlite'}" in result.stderr


# -- the command line ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "own", "not_own"),
    [
        ("verify", ["--expect-head", "--anchors", "--projections", "--until-position"], ["--course", "--output"]),
        ("export", ["--output"], ["--until-time", "--port"]),
        ("replay", ["--until-time", "--course", "--org"], ["--anchors", "--output"]),
        ("serve", ["--port", "--ip"], ["--until-time"]),
    ],
)
def test_each_command_help_lists_its_own_options(command, own, not_own):
    result = nbexchange(command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"nbexchange {command}: ")
    for option in own:
        assert f"  {option}" in result.stdout, option
    for option in not_own:
        assert f"  {option}" not in result.stdout, option


def test_version_prints_the_package_version():
    from importlib.metadata import version

    result = nbexchange("--version")
    assert result.returncode == 0 and result.stdout.strip() == version("nbexchange")


NONSENSE = [
    pytest.param(("replay", "--until-position=-3"), "--until-position must be a position", id="negative-position"),
    pytest.param(("replay", "--until-position=abc"), "expected an int", id="text-position"),
    pytest.param(("replay", "--until-time=yesterday"), "is not a time", id="unparseable-time"),
    pytest.param(("replay", "--until-time=2026-13-45 25:00:00"), "is not a time", id="impossible-time"),
    pytest.param(("verify", "--until-position=-1"), "--until-position must be a position", id="verify-negative"),
    pytest.param(("verify", "--expect-head=12"), "must be POSITION:HASH", id="head-without-hash"),
    pytest.param(("verify", "--expect-head=0:" + "a" * 64), "must be POSITION:HASH", id="head-at-zero"),
    pytest.param(("verify", "--expect-head=3:" + "g" * 64), "must be POSITION:HASH", id="head-not-hex"),
    pytest.param(("frobnicate",), "Unknown command 'frobnicate'", id="unknown-command"),
    pytest.param(("verify", "everything"), "Unexpected arguments after 'verify': everything", id="extra-argument"),
]


@pytest.mark.parametrize(("args", "note"), NONSENSE)
def test_nonsense_arguments_get_a_one_line_error_and_exit_2(original, args, note):
    result = original.run(*args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert note in line and "Traceback" not in line


def test_export_lines_are_the_canonical_json_the_chain_hashes(original):
    """Non-ASCII as UTF-8, as the hash input has it: a verifier may hash a line's fields as written."""
    result = original.run("export")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any("zoë" in line for line in lines) and not any("\\u00eb" in line for line in lines)
    for line in lines:
        assert canonical_json(json.loads(line)) == line


# -- verification anchored outside the database ------------------------------------------------------


def verified(backup: Backup, *args: str) -> tuple[int, dict[str, Any]]:
    result = backup.run("verify", *args)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


def rewrite(backup: Backup, position: int, change: Callable[[dict[str, Any]], None]) -> None:
    """Change the event at ``position`` as a forger would: every later hash recomputed so the chain holds."""
    engine = sa.create_engine(f"sqlite:///{backup.db}")
    events = list(SQLEventStore(engine).read())
    prev = events[position - 2].hash if position > 1 else GENESIS
    with engine.begin() as conn:
        for event in events[position - 1 :]:
            fields = event.hashed_fields()
            if event.position == position:
                change(fields)
            digest = chain_hash(prev, fields)
            conn.execute(
                sa.text(
                    "UPDATE events SET payload = :payload, recorded_at = :recorded_at, prev_hash = :prev, hash = :hash"
                    " WHERE position = :position"
                ),
                {
                    "payload": json.dumps(fields["payload"]),
                    "recorded_at": fields["recorded_at"].replace("T", " ").replace("+00:00", ""),
                    "prev": prev,
                    "hash": digest,
                    "position": event.position,
                },
            )
            prev = digest
    engine.dispose()


def truncate(backup: Backup, keep: int) -> None:
    engine = sa.create_engine(f"sqlite:///{backup.db}")
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM events WHERE position > :keep"), {"keep": keep})
    engine.dispose()


def test_verify_reports_the_head_it_checked(original):
    status, report = verified(original)
    assert status == 0, report
    assert report["head"]["position"] == report["events"] == 4
    assert report["head"]["hash"] == report["head_hash"] and report["head"]["recorded_at"]
    head = f"{report['head']['position']}:{report['head']['hash']}"
    assert verified(original, f"--expect-head={head}") == (0, {**report, "heads_checked": 1})


def test_truncated_log_verifies_alone_but_not_against_its_recorded_head(backup):
    _, before = verified(backup)
    truncate(backup, 2)
    status, report = verified(backup)
    assert status == 0 and report["events"] == 2  # consistent with itself: why a head is kept elsewhere
    status, report = verified(backup, f"--expect-head=4:{before['head_hash']}")
    assert status == 1
    assert report["faults"] == [
        {"position": 4, "reason": "the log no longer reaches this position, recorded in --expect-head"}
    ]


def test_rewritten_log_with_recomputed_hashes_is_caught_by_an_anchor(backup, tmp_path):
    _, before = verified(backup)
    anchors = tmp_path / "anchors.jsonl"
    anchors.write_text(json.dumps(before["head"]) + "\n")

    def backdate(fields: dict[str, Any]) -> None:
        fields["payload"]["timestamp"] = "2026-01-30T09:00:00.000000+00:00"  # "I submitted a day early"

    rewrite(backup, 2, backdate)
    status, report = verified(backup)
    assert status == 0  # the chain holds: every later hash was recomputed
    status, report = verified(backup, f"--anchors={anchors}")
    assert status == 1 and report["heads_checked"] == 1
    assert report["faults"] == [
        {"position": 4, "reason": "hash differs from the head recorded in anchors.jsonl line 1 (rewritten)"}
    ]


def test_verify_up_to_a_position_checks_an_older_anchor_of_a_log_that_grew(backup, tmp_path):
    _, at_2 = verified(backup, "--until-position=2")
    assert at_2["events"] == 2 and at_2["head"]["position"] == 2
    _, whole = verified(backup)
    anchors = tmp_path / "anchors.jsonl"
    anchors.write_text(json.dumps(at_2["head"]) + "\n\n" + json.dumps(whole["head"]) + "\n")
    status, report = verified(backup, f"--anchors={anchors}")
    assert status == 0 and report["heads_checked"] == 2, report
    # Cut at 2, only the anchor within the cut is checked.
    status, report = verified(backup, f"--anchors={anchors}", "--until-position=2")
    assert status == 0 and report["heads_checked"] == 1, report


@pytest.mark.hostile(
    "audit",
    "an anchor file with a line that is not an anchor, or that does not exist",
    "verify exits 2 naming the line; it never checks half an anchor file",
)
@pytest.mark.parametrize("content", ['{"position": 4}\n', "4:abc\n", None])
def test_an_unreadable_anchor_file_is_an_error_not_a_pass(original, tmp_path, content):
    anchors = tmp_path / "anchors.jsonl"
    if content is not None:
        anchors.write_text(content)
    result = original.run("verify", f"--anchors={anchors}")
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert "Cannot read the anchors" in line


def test_verify_finds_recorded_at_running_backwards(backup):
    def earlier(fields: dict[str, Any]) -> None:
        fields["recorded_at"] = "2020-01-01T00:00:00.000000+00:00"

    rewrite(backup, 3, earlier)
    status, report = verified(backup)
    assert status == 1
    assert report["faults"] == [{"position": 3, "reason": "recorded_at is earlier than the previous event's"}]


def test_verify_projections_finds_a_changed_read_model_row(backup):
    status, report = verified(backup, "--projections")
    assert status == 0 and report["projections"] == {"ok": True, "differences": []}
    engine = sa.create_engine(f"sqlite:///{backup.db}")
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE proj_submissions SET student_id = 's9' WHERE student_id = 's1'"))
    engine.dispose()
    assert verified(backup)[0] == 0  # the log is intact
    status, report = verified(backup, "--projections")
    assert status == 1 and report["ok"] is False
    differences = report["projections"]["differences"]
    tables = {(d["projection"], d["table"], d["only_live"], d["only_rebuilt"]) for d in differences}
    assert ("collections", "proj_submissions", 1, 1) in tables
    (diff,) = [d for d in differences if d["table"] == "proj_submissions"]
    assert "s9" in diff["live_rows"][0] and "s1" in diff["rebuilt_rows"][0]


# -- getting the bytes ---------------------------------------------------------------------------


def test_extract_writes_a_submissions_archive_and_its_sha256_appending_nothing(backup, tmp_path):
    before = tree(backup.root)
    out = tmp_path / "zoe.tar.gz"
    result = backup.run("extract", "--submission=3", f"--output={out}")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    sha = answer["archive_sha256"]
    assert answer["position"] == 3 and out.read_bytes() == LocalArchiveStore(backup.root).open(sha).read()
    assert (tmp_path / "zoe.tar.gz.sha256").read_text() == f"{sha}  zoe.tar.gz\n"
    assert tree(backup.root) == before  # no collected event, nothing in the store


@pytest.mark.parametrize(
    ("position", "note"),
    [(1, "is 'released', not a submission"), (4, "is 'collected', not a submission"), (99, "no event at position 99")],
)
def test_extract_refuses_what_is_not_a_submission(original, tmp_path, position, note):
    out = tmp_path / "out.tar.gz"
    result = original.run("extract", f"--submission={position}", f"--output={out}")
    assert result.returncode == 1 and note in result.stderr, result.stderr
    assert not out.exists()


def test_extract_never_overwrites_and_never_writes_changed_bytes(backup, tmp_path):
    out = tmp_path / "out.tar.gz"
    out.write_bytes(b"evidence")
    result = backup.run("extract", "--submission=2", f"--output={out}")
    assert result.returncode == 1 and "exists already" in result.stderr
    assert out.read_bytes() == b"evidence"

    engine = make_engine(f"sqlite:///{backup.db}")
    sha = SQLEventStore(engine).get(2).payload["archive_sha256"]
    engine.dispose()
    path = LocalArchiveStore(backup.root).path(sha)
    path.write_bytes(path.read_bytes() + b"\0")
    changed = tmp_path / "changed.tar.gz"
    result = backup.run("extract", "--submission=2", f"--output={changed}")
    assert result.returncode == 1 and "does not match its sha256" in result.stderr
    assert not changed.exists()


@pytest.mark.parametrize("args", [("--submission=2",), ("--output=x.tar.gz",), ("--submission=-2", "--output=x")])
def test_extract_asked_for_wrongly_exits_2(original, args):
    result = original.run("extract", *args)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_the_audit_engine_cannot_write_on_either_backend(engine, db_url):
    """SQLite ``mode=ro``, PostgreSQL read-only transactions: a write is refused by the database itself."""
    from nbexchange.audit import open_read_only

    SQLEventStore(engine).append(release())
    reader = open_read_only(db_url)
    try:
        assert SQLEventStore(reader).head() == 1
        with pytest.raises(sa.exc.DBAPIError, match="(?i)read-?only"), reader.begin() as conn:
            conn.execute(sa.text("DELETE FROM events"))
    finally:
        reader.dispose()
    assert SQLEventStore(engine).head() == 1


def test_a_course_replay_reads_only_its_streams_and_agrees_with_the_whole_log(engine):
    """Replaying one course (or assignment) reads its streams alone: the same answer as the whole log's."""
    from builders import submit

    from nbexchange.audit import replay_view

    store = SQLEventStore(engine)
    for course, assignment in (("phys101", "ps1"), ("phys101", "ps2"), ("chem202", "ps1")):
        store.append(release(course=course, assignment=assignment, sha="a" * 64))
        for minute, name in enumerate(("s1", "s2")):
            store.append(submit(name, course=course, assignment=assignment, minutes=minute))
    middle = 7
    for until in (None, middle):
        whole = replay_view(engine, until_position=until)
        courses = {entry["course_id"]: entry for entry in whole["courses"]}
        assert replay_view(engine, until_position=until, course_id="phys101")["courses"] == [courses["phys101"]]
        (ps1,) = replay_view(engine, until_position=until, course_id="phys101", assignment_id="ps1")["courses"]
        assert ps1["assignments"] == [a for a in courses["phys101"]["assignments"] if a["assignment_id"] == "ps1"]
    moment = format_iso(store.get(middle).recorded_at)
    by_time = replay_view(engine, until_time=moment, course_id="phys101")
    assert by_time["courses"] == replay_view(engine, until_position=middle, course_id="phys101")["courses"]


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(payload=st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=4), tamper=st.booleans())
def test_the_fast_hash_check_always_agrees_with_the_canonical_one(payload, tamper):
    """orjson first, the canonical encoder whenever orjson's bytes do not give the hash: never another answer."""
    from nbexchange.audit import _fast_fields, hash_matches

    event = RecordedEvent(1, "s", 1, "t", 1, TEACHER, DUE, None, payload, GENESIS, "")
    event = dataclasses.replace(event, hash=event.computed_hash() if not tamper else "0" * 64)
    assert hash_matches(event) == (event.computed_hash() == event.hash)
    fast = _fast_fields(event)
    assert fast is None or fast == canonical_json(event.hashed_fields())


def test_the_anchorer_appends_and_posts_each_new_head_once(engine, tmp_path):
    """A new head goes to the file (appended) and the URL (POSTed JSON); an unmoved head is not sent again."""
    import http.server
    import threading

    from nbexchange.anchors import Anchorer

    received: list[dict[str, Any]] = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (the standard library's name)
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(201)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    path = tmp_path / "anchors.jsonl"
    path.write_text('{"position": 0, "hash": "kept as it was"}\n')
    store = SQLEventStore(engine)
    anchorer = Anchorer(store, 3600, str(path), f"http://127.0.0.1:{server.server_port}/anchors")
    try:
        assert anchorer.anchor() is None  # an empty log has no head to anchor
        first = store.append(release()).event
        assert anchorer.anchor()["hash"] == first.hash
        assert anchorer.anchor() is None
        second = store.append(release(assignment="ps2")).event
        anchorer.anchor()
    finally:
        server.shutdown()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0] == {"position": 0, "hash": "kept as it was"}  # appended to, never rewritten
    assert [(a["position"], a["hash"]) for a in lines[1:]] == [(1, first.hash), (2, second.hash)]
    assert received == lines[1:]
