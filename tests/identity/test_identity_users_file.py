"""UsersFilePlugin: tokens and courses read from a YAML or JSON file, and the demo file."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import stat
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from tornado.httputil import HTTPServerRequest

from nbexchange.errors import Invalid
from nbexchange.identity import User, UsersFilePlugin, create_demo_users_file

#: The ``make_request`` fixture (tests/identity/conftest.py).
RequestFactory = Callable[..., HTTPServerRequest]

ADA_TOKEN = "f3a9c1d2e4b5a6978812aa0bbccddeef"
S1_TOKEN = "0123456789abcdef0123456789abcdef"

USERS_YAML = f"""\
users:
  - {{name: ada, token: "{ADA_TOKEN}", org_id: 3, full_name: Ada Lovelace,
     email: ada@example.org, lms_user_id: "42", courses: {{phys101: Instructor, chem2: student}}}}
  - {{name: s1, token: "{S1_TOKEN}", courses: {{phys101: STUDENT}}}}
"""


def write_private(path: Path, text: str, mode: int = 0o600) -> Path:
    """Write a users file as an admin should: readable by its owner only (unless ``mode`` says otherwise)."""
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.fixture
def users_path(tmp_path: Path) -> Path:
    return write_private(tmp_path / "users.yaml", USERS_YAML)


def authenticate(plugin: UsersFilePlugin, make_request: RequestFactory, **headers: str) -> User | None:
    return asyncio.run(plugin.authenticate(make_request(**headers)))


def rewrite(path: Path, text: str) -> None:
    """Replace the file's text and move its mtime on, as an editor saving later would."""
    before = path.stat().st_mtime_ns
    path.write_text(text)
    os.utime(path, ns=(before + 2_000_000_000, before + 2_000_000_000))


def test_yaml_file_gives_each_user_their_fields(users_path: Path, make_request: RequestFactory) -> None:
    plugin = UsersFilePlugin(users_file=str(users_path))
    ada = authenticate(plugin, make_request, Authorization=f"token {ADA_TOKEN}")
    assert ada == User(
        name="ada",
        org_id=3,
        courses={"phys101": "Instructor", "chem2": "Student"},
        full_name="Ada Lovelace",
        email="ada@example.org",
        lms_user_id="42",
    )


def test_missing_fields_take_their_defaults(users_path: Path, make_request: RequestFactory) -> None:
    plugin = UsersFilePlugin(users_file=str(users_path))
    s1 = authenticate(plugin, make_request, Authorization=f"Bearer {S1_TOKEN}")
    assert s1 == User(name="s1", org_id=1, courses={"phys101": "Student"})


def test_json_file_is_read_too(tmp_path: Path, make_request: RequestFactory) -> None:
    path = tmp_path / "users.json"
    entry = {"name": "bo", "token": "json-token", "lms_user_id": 7, "courses": {"bio1": "instructor"}}
    write_private(path, json.dumps({"users": [entry]}))
    bo = authenticate(UsersFilePlugin(users_file=str(path)), make_request, Authorization="token json-token")
    assert bo is not None
    assert bo.name == "bo" and bo.is_instructor("bio1") and bo.lms_user_id == "7"


def test_wrong_or_missing_token_gives_no_user(users_path: Path, make_request: RequestFactory) -> None:
    plugin = UsersFilePlugin(users_file=str(users_path))
    assert authenticate(plugin, make_request, Authorization="token not-a-token") is None
    assert authenticate(plugin, make_request, Authorization=f"token {ADA_TOKEN[:-1]}") is None
    assert authenticate(plugin, make_request, Authorization=f"Basic {ADA_TOKEN}") is None
    assert authenticate(plugin, make_request) is None


def test_users_added_and_removed_take_effect_without_a_restart(users_path: Path, make_request: RequestFactory) -> None:
    plugin = UsersFilePlugin(users_file=str(users_path))
    assert authenticate(plugin, make_request, Authorization="token new-token") is None

    rewrite(users_path, 'users:\n  - {name: s9, token: "new-token", courses: {phys101: Student}}\n')

    s9 = authenticate(plugin, make_request, Authorization="token new-token")
    assert s9 is not None and s9.name == "s9"
    assert authenticate(plugin, make_request, Authorization=f"token {ADA_TOKEN}") is None


def test_a_broken_edit_keeps_the_users_last_read(
    users_path: Path, make_request: RequestFactory, caplog: pytest.LogCaptureFixture
) -> None:
    plugin = UsersFilePlugin(users_file=str(users_path))
    rewrite(users_path, "users:\n  - {name: ada, token: [unclosed\n")

    with caplog.at_level(logging.ERROR):
        ada = authenticate(plugin, make_request, Authorization=f"token {ADA_TOKEN}")
    assert ada is not None and ada.name == "ada"
    assert str(users_path) in caplog.text

    # Once fixed, the new contents are used.
    rewrite(users_path, 'users:\n  - {name: ada2, token: "fixed", courses: {}}\n')
    assert authenticate(plugin, make_request, Authorization="token fixed") == User("ada2", 1, {})


MALFORMED = {
    "missing name": ('users:\n  - {token: "t1"}\n', ["users[0]", "'name'"]),
    "missing token": ("users:\n  - {name: bob}\n", ["users[0] ('bob')", "'token'"]),
    "token not a string": ("users:\n  - {name: bob, token: 12345}\n", ["users[0] ('bob')", "'token'", "quote"]),
    "duplicate token": (
        'users:\n  - {name: a, token: "same"}\n  - {name: b, token: "same"}\n',
        ["users[1] ('b')", "same token as users[0] ('a')"],
    ),
    "duplicate name": (
        'users:\n  - {name: a, token: "t1"}\n  - {name: a, token: "t2"}\n',
        ["users[1] ('a')", "same name as users[0] ('a')"],
    ),
    "bad role": (
        'users:\n  - {name: a, token: "t1", courses: {phys101: Teacher}}\n',
        ["users[0] ('a')", "'phys101'", "'Teacher'"],
    ),
    "course id not a string": ('users:\n  - {name: a, token: "t1", courses: {101: Student}}\n', ["101", "quote"]),
    "courses not a mapping": ('users:\n  - {name: a, token: "t1", courses: [phys101]}\n', ["'courses'"]),
    "misspelt key": ('users:\n  - {name: a, token: "t1", course: {phys101: Student}}\n', ["users[0] ('a')", "course"]),
    "org_id not an integer": ('users:\n  - {name: a, token: "t1", org_id: one}\n', ["'org_id'", "not a str"]),
    "email not a string": ('users:\n  - {name: a, token: "t1", email: [a, b]}\n', ["'email'"]),
    "entry not a mapping": ("users:\n  - ada\n", ["users[0]", "mapping"]),
    "no users list": ("people: []\n", ["'users' list"]),
    "empty file": ("", ["'users' list"]),
    "not YAML": ("users: [\n", ["neither valid YAML nor JSON"]),
}


@pytest.mark.parametrize("text, expected", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_file_fails_at_start_with_a_note_naming_file_and_entry(
    tmp_path: Path, text: str, expected: list[str]
) -> None:
    path = write_private(tmp_path / "users.yaml", text)
    with pytest.raises(Invalid) as raised:
        UsersFilePlugin(users_file=str(path))
    note = raised.value.note
    assert str(path) in note
    for part in expected:
        assert part in note


SECRET = "s3cr3t-value"
#: Users files that are wrong right next to a token: each note must place the fault without quoting it.
TOKEN_NEAR_THE_FAULT = {
    "duplicate token": f'users:\n  - {{name: a, token: "{SECRET}"}}\n  - {{name: b, token: "{SECRET}"}}\n',
    "unclosed quote": f'users:\n  - {{name: a, token: "{SECRET}}}\n',
    "junk after the quote": f'users:\n  - name: a\n    token: "{SECRET}" junk\n',
    "token as an alias": f"users:\n  - name: a\n    token: *{SECRET}\n",
    "bad escape in the token": f'users:\n  - name: a\n    token: "{SECRET}\\q"\n',
    "tab before the token": f"users:\n  - name: a\n\ttoken: {SECRET}\n",
    "token in org_id": f"users:\n  - {{name: a, token: t1, org_id: {SECRET}}}\n",
    "token in email": f"users:\n  - {{name: a, token: t1, email: [{SECRET}]}}\n",
    "token as a mapping": f"users:\n  - {{name: a, token: {{{SECRET}: 1}}}}\n",
    "token as an entry": f"users:\n  - {SECRET}\n",
}


@pytest.mark.hostile(
    "Identity and secrets",
    "a users file malformed next to a token (unclosed quote, junk after it, an alias, a bad escape, a tab, the "
    "token in another field's place, duplicated)",
    "the service refuses to start naming the file, the entry or the line and column; the token appears in no "
    "note, traceback or log line",
)
@pytest.mark.parametrize("text", TOKEN_NEAR_THE_FAULT.values(), ids=TOKEN_NEAR_THE_FAULT.keys())
def test_a_note_about_a_bad_file_never_shows_a_token(
    tmp_path: Path, make_request: RequestFactory, caplog: pytest.LogCaptureFixture, text: str
) -> None:
    path = write_private(tmp_path / "users.yaml", text)
    with pytest.raises(Invalid) as raised:
        UsersFilePlugin(users_file=str(path))
    assert str(path) in raised.value.note
    assert SECRET not in "".join(traceback.format_exception(raised.value))  # the causes too
    # The same file, arriving as an edit, is logged without the token either.
    write_private(path, USERS_YAML)
    plugin = UsersFilePlugin(users_file=str(path))
    rewrite(path, text)
    with caplog.at_level(logging.DEBUG):
        assert authenticate(plugin, make_request, Authorization=f"token {ADA_TOKEN}") is not None
    assert "Keeping the users last read" in caplog.text and SECRET not in caplog.text


def test_a_yaml_error_names_its_line(tmp_path: Path) -> None:
    path = write_private(tmp_path / "users.yaml", TOKEN_NEAR_THE_FAULT["junk after the quote"])
    with pytest.raises(Invalid) as raised:
        UsersFilePlugin(users_file=str(path))
    assert "line 3, column" in raised.value.note and "not shown" in raised.value.note


@pytest.mark.hostile(
    "Identity and secrets",
    "a users file its group or others may read or write (modes 640, 604, 620, 660, 644, 666)",
    "refused at start (and on reload the users last read are kept), naming chmod 600 and "
    "allow_readable_users_file; accepted with a warning when that setting is on",
)
@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o660, 0o644, 0o666], ids=lambda m: f"{m:o}")
def test_a_users_file_others_may_read_is_refused(
    tmp_path: Path, make_request: RequestFactory, caplog: pytest.LogCaptureFixture, mode: int
) -> None:
    path = write_private(tmp_path / "users.yaml", USERS_YAML, mode)
    with pytest.raises(Invalid) as raised:
        UsersFilePlugin(users_file=str(path))
    note = raised.value.note
    assert str(path) in note and f"mode {mode:o}" in note
    assert "chmod 600" in note and "allow_readable_users_file" in note

    with caplog.at_level(logging.WARNING):
        allowed = UsersFilePlugin(users_file=str(path), allow_readable_users_file=True)
    assert "allow_readable_users_file is set" in caplog.text
    assert authenticate(allowed, make_request, Authorization=f"token {ADA_TOKEN}") is not None

    # A private file that becomes readable by others is not reloaded: the users last read stay.
    path.chmod(0o600)
    plugin = UsersFilePlugin(users_file=str(path))
    rewrite(path, 'users:\n  - {name: eve, token: "eve-token", courses: {}}\n')
    path.chmod(mode)
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert authenticate(plugin, make_request, Authorization="token eve-token") is None
    assert authenticate(plugin, make_request, Authorization=f"token {ADA_TOKEN}") is not None
    assert "chmod 600" in caplog.text and "Keeping the users last read" in caplog.text


def test_missing_file_fails_at_start(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(Invalid) as raised:
        UsersFilePlugin(users_file=str(path))
    assert str(path) in raised.value.note


def test_unset_users_file_fails_at_start() -> None:
    with pytest.raises(Invalid) as raised:
        UsersFilePlugin()
    assert "users_file" in raised.value.note


@pytest.fixture
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    previous = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(previous)


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o277], indirect=True)
def test_demo_file_is_private_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    path = create_demo_users_file(tmp_path / "demo" / "users.yaml")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_demo_file_has_an_instructor_and_two_students_of_demo101(tmp_path: Path, make_request: RequestFactory) -> None:
    path = create_demo_users_file(tmp_path / "users.yaml")
    entries = yaml.safe_load(path.read_text())["users"]
    assert [entry["name"] for entry in entries] == ["instructor", "student1", "student2"]
    tokens = [entry["token"] for entry in entries]
    assert len(set(tokens)) == 3
    assert all(re.fullmatch(r"[0-9a-f]{32}", token) for token in tokens)

    plugin = UsersFilePlugin(users_file=str(path))
    users = [authenticate(plugin, make_request, Authorization=f"token {token}") for token in tokens]
    assert [user.courses if user else None for user in users] == [
        {"demo101": "Instructor"},
        {"demo101": "Student"},
        {"demo101": "Student"},
    ]


def test_demo_file_gets_new_tokens_each_time_it_is_made(tmp_path: Path) -> None:
    first = create_demo_users_file(tmp_path / "a.yaml").read_text()
    second = create_demo_users_file(tmp_path / "b.yaml").read_text()
    assert first != second


def test_an_existing_demo_file_is_left_as_it_is(tmp_path: Path) -> None:
    path = create_demo_users_file(tmp_path / "users.yaml")
    made = path.read_text()
    assert create_demo_users_file(path) == path
    assert path.read_text() == made

    path.write_text(USERS_YAML)  # an admin's own file, under the demo's name
    create_demo_users_file(path)
    assert path.read_text() == USERS_YAML
