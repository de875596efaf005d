"""The audit commands on a copy of a log: read-only databases and stores, the command line, anchored heads."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from builders import TEACHER, make_archive, release, student
from test_app import nbexchange

from nbexchange.db import make_engine, upgrade
from nbexchange.events.domain import Collected, Submitted
from nbexchange.events.sql import SQLEventStore
from nbexchange.events.store import AppendRequest, canonical_json
from nbexchange.storage import ArchiveStore

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
    store, archives = SQLEventStore(engine), ArchiveStore(root)
    released = archives.store_bytes(make_archive())
    store.append(release(sha=released.sha256))
    for name in ("s1", "zoë"):
        work = archives.store_bytes(make_archive({"nb1.ipynb": name.encode()}))
        event = Submitted(1, "phys101", "ps1", student_id=name, timestamp=DUE, archive_sha256=work.sha256,
                          archive_size=work.size)
        position = store.append(AppendRequest(event, student(name))).event.position
    store.append(AppendRequest(Collected(1, "phys101", "ps1", "zoë", position, work.sha256), TEACHER))
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


AUDITS = [("verify",), ("export",), ("replay", "--course=phys101")]


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
    shutil.rmtree(backup.root / "extracted")
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
