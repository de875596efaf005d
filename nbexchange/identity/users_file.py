"""Users and their API tokens listed in a YAML or JSON file, for exchanges run without JupyterHub."""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from tornado.httputil import HTTPServerRequest
from traitlets import Bool, Unicode

from nbexchange.errors import Invalid
from nbexchange.identity.base import (
    INSTRUCTOR,
    STUDENT,
    User,
    UserPlugin,
    normalise_role,
    token_digest,
    token_from_request,
)

#: The keys a user entry may have; anything else is most likely a typo that would
#: silently drop a setting, so it is refused.
ENTRY_KEYS = frozenset({"name", "token", "org_id", "full_name", "email", "lms_user_id", "courses"})
DEFAULT_ORG_ID = 1

DEMO_COURSE = "demo101"
DEMO_HEADER = """\
# Demo users for nbexchange: one instructor and two students of course demo101.
# Send a token as 'Authorization: token <token>'. Edit freely: the exchange
# re-reads this file when it changes. Keep it private (mode 0600).
"""

#: What ``os.stat`` says about a file that tells us it changed.
Signature = tuple[int, int, int]


def _signature(path: Path) -> Signature:
    # mtime alone can miss a rewrite within the filesystem's timestamp
    # granularity; size and inode catch most of those, and a rename-into-place.
    info = path.stat()
    return (info.st_mtime_ns, info.st_size, info.st_ino)


def _optional_text(entry: Mapping[str, Any], key: str, where: str, *, numbers_too: bool = False) -> str | None:
    value = entry.get(key)
    if value is None or isinstance(value, str):
        return value
    # LMS ids are often numeric, and YAML turns an unquoted 42 into an int.
    if numbers_too and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise Invalid(f"{where}: '{key}' must be a string, not {_kind(value)}.")


def _parse_courses(value: object, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise Invalid(f"{where}: 'courses' must map course ids to roles, e.g. {{phys101: Student}}.")
    courses = {}
    for course_id, role in value.items():
        if not isinstance(course_id, str) or not course_id:
            raise Invalid(f"{where}: course id {course_id!r} must be a non-empty string (quote it).")
        try:
            courses[course_id] = normalise_role(role)
        except Invalid as e:
            raise Invalid(f"{where}: course {course_id!r}: {e.note}") from e
    return courses


def _parse_entry(entry: object, where: str) -> tuple[str, User]:
    """One entry's token and user; ``where`` names the entry in any ``Invalid`` note."""
    if not isinstance(entry, Mapping):
        raise Invalid(f"{where}: each user must be a mapping with at least 'name' and 'token'.")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise Invalid(f"{where}: 'name' is missing or not a non-empty string.")
    where = f"{where} ({name!r})"
    unknown = set(entry) - ENTRY_KEYS
    if unknown:
        raise Invalid(f"{where}: unknown keys {sorted(map(str, unknown))}; allowed: {sorted(ENTRY_KEYS)}.")
    token = entry.get("token")
    if not isinstance(token, str) or not token:
        # Never echo the value: it may be a real secret that YAML mangled.
        raise Invalid(f"{where}: 'token' is missing or not a string (quote it in YAML).")
    org_id = entry.get("org_id", DEFAULT_ORG_ID)
    if not isinstance(org_id, int) or isinstance(org_id, bool):
        raise Invalid(f"{where}: 'org_id' must be an integer, not {_kind(org_id)}.")
    user = User(
        name=name,
        org_id=org_id,
        courses=_parse_courses(entry.get("courses"), where),
        full_name=_optional_text(entry, "full_name", where),
        email=_optional_text(entry, "email", where),
        lms_user_id=_optional_text(entry, "lms_user_id", where, numbers_too=True),
    )
    return token, user


def _kind(value: object) -> str:
    """What a misplaced value is, without the value: it may be a token in the wrong place."""
    return f"a {type(value).__name__}"


def _yaml_problem(error: yaml.YAMLError) -> str:
    # Only the position: PyYAML's message quotes the offending line, and even its
    # short "problem" can quote the file (an alias name, an escape character).
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}"
        return f"the error is at {where} (its text is not shown: it may hold a token)"
    return "it could not be parsed"


def load_users(path: Path) -> dict[str, User]:
    """The users listed in a users file, keyed by ``token_digest`` of their token.

    Raises ``Invalid``, naming the file and the entry, if the file cannot be read or
    an entry is malformed, or two entries share a token or a name.
    """
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise Invalid(f"Cannot read the users file {path}: {e}") from e
    except yaml.YAMLError as e:
        # ``from None``: a traceback of the cause would print PyYAML's quote of the line.
        raise Invalid(f"The users file {path} is neither valid YAML nor JSON: {_yaml_problem(e)}.") from None
    if not isinstance(document, Mapping) or not isinstance(document.get("users"), list):
        raise Invalid(f"The users file {path} must be a mapping with a 'users' list.")

    users: dict[str, User] = {}
    first_seen: dict[str, str] = {}  # token digest or name -> the entry that had it first
    for index, entry in enumerate(document["users"]):
        where = f"Users file {path}, users[{index}]"
        token, user = _parse_entry(entry, where)
        digest = token_digest(token)
        for key, what in ((digest, "token"), ("name:" + user.name, "name")):
            if key in first_seen:
                raise Invalid(f"{where} ({user.name!r}): same {what} as {first_seen[key]}.")
            first_seen[key] = f"users[{index}] ({user.name!r})"
        users[digest] = user
    return users


class UsersFilePlugin(UserPlugin):
    """Authenticates API tokens against a users file, re-read whenever the file changes.

    The file is read when the plugin is made, so a missing or malformed file stops the
    service at start-up with a note naming the file and the entry.
    """

    users_file = Unicode(
        "",
        help="""Path to the YAML or JSON file listing users, their API tokens and courses.

        Each entry of its ``users`` list has ``name``, ``token``, ``courses``
        ({course_id: Instructor|Student}) and optionally ``org_id`` (default 1),
        ``full_name``, ``email`` and ``lms_user_id``. The file is re-read when it
        changes. It must be readable by the service's user only (mode 0600): one
        readable by its group or others is refused (see allow_readable_users_file).
        """,
    ).tag(config=True)

    allow_readable_users_file = Bool(
        False,
        help="""Accept a users file that its group or others may read or write (a warning is logged instead).

        The file holds every user's API token, so by default the service refuses to
        start with one (``chmod 600`` it), and keeps the users last read if it
        changes to such a mode. Set this only where the group is the service's own,
        e.g. a secret mounted by an orchestrator with a fixed group.
        """,
    ).tag(config=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not self.users_file:
            raise Invalid("UsersFilePlugin.users_file is not set: give the path of the users file.")
        self._path = Path(self.users_file)
        # The signature is taken before reading, so a change made while
        # reading is seen by the next request rather than missed.
        try:
            self._signature: Signature | None = _signature(self._path)
        except OSError as e:
            raise Invalid(f"Cannot read the users file {self._path}: {e}") from e
        self._check_private()
        self._users = load_users(self._path)

    async def authenticate(self, request: HTTPServerRequest) -> User | None:
        """The user whose token the request carries, or None."""
        token = token_from_request(request)
        if token is None:
            return None
        self._reload_if_changed()
        return self._users.get(token_digest(token))

    def _reload_if_changed(self) -> None:
        try:
            signature: Signature | None = _signature(self._path)
        except OSError:
            signature = None  # gone or unreadable: load_users says why, once
        if signature == self._signature:
            return
        # Remember the new signature even if the file is bad, so that a broken
        # file is reported once rather than re-parsed on every request.
        self._signature = signature
        try:
            self._check_private()
            self._users = load_users(self._path)
        except Invalid as e:
            # An admin's half-saved edit must not lock every user out mid-term.
            self.log.error("%s Keeping the users last read.", e.note)
            return
        self.log.info("Reloaded %d users from %s.", len(self._users), self._path)

    def _check_private(self) -> None:
        """``Invalid`` if others than the service's user may read or write the file (unless allowed)."""
        try:
            mode = stat.S_IMODE(self._path.stat().st_mode)
        except OSError:
            return  # load_users says why
        if not mode & 0o077:
            return
        exposed = f"The users file {self._path} holds API tokens but its group or others may read or write it"
        if not self.allow_readable_users_file:
            raise Invalid(
                f"{exposed} (mode {mode:o}): chmod 600 it, or set UsersFilePlugin.allow_readable_users_file = True."
            )
        self.log.warning("%s (mode %o); accepted because allow_readable_users_file is set.", exposed, mode)


def create_demo_users_file(path: Path) -> Path:
    """Write a users file with an instructor and two students of ``demo101``, unless ``path`` exists.

    The file is created readable by its owner only, with fresh random tokens.
    Returns ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    users = [
        {"name": "instructor", "token": secrets.token_hex(16), "courses": {DEMO_COURSE: INSTRUCTOR}},
        {"name": "student1", "token": secrets.token_hex(16), "courses": {DEMO_COURSE: STUDENT}},
        {"name": "student2", "token": secrets.token_hex(16), "courses": {DEMO_COURSE: STUDENT}},
    ]
    try:
        # O_EXCL: an existing file is kept, even one created a moment ago by another process.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path
    # The umask can only take bits away; set the mode exactly so the owner can edit it.
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(DEMO_HEADER)
        yaml.safe_dump({"users": users}, out, sort_keys=False)
    return path
