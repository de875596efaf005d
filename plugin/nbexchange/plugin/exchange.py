"""The base of every action: the service's settings, the one HTTP helper, and what the actions share."""

from __future__ import annotations

import contextlib
import difflib
import glob
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from textwrap import dedent
from urllib.parse import quote, urlsplit

import requests
from jupyter_core.paths import jupyter_data_dir
from nbgrader.coursedir import CourseDirectory
from nbgrader.exchange.abc import Exchange as ABCExchange
from nbgrader.exchange.abc import ExchangeError
from nbgrader.utils import get_username, ignore_patterns
from traitlets import Bool, Float, Integer, Unicode, default

from .transfer import CHUNK_SIZE, Progress, pack, unpack

#: nbgrader's timestamp format; the service takes and gives every time in it, in UTC.
TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S.%f %Z"
SERVICE_NAME = "nbexchange"
FALLBACK_SERVICE_URL = f"http://127.0.0.1:9000/services/{SERVICE_NAME}/"
#: Seconds to wait for JupyterHub's answer when asking it where the service is.
HUB_TIMEOUT = 10.0
#: What to tell a user whose exchange cannot be reached.
TRY_LATER = "Try again in a few minutes; if it keeps failing, tell your instructor."
#: Answers worth another try: the service (or the proxy before it) is briefly unavailable, or a load
#: balancer's API host did not answer (502, 504: it may have vanished mid-request; the retry, with the
#: same Idempotency-Key, gets the first answer if the write was committed, on whichever host takes it).
RETRY_STATUSES = frozenset({502, 503, 504})
#: Where the API token comes from, named whenever the token is missing or refused.
TOKEN_SETTINGS = (
    "c.Exchange.api_token, or the environment variable NBEX_API_TOKEN (JUPYTERHUB_API_TOKEN under JupyterHub)"
)
RETRY_ERRORS = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


class Exchange(ABCExchange):
    """The nbgrader exchange that keeps everything in an nbexchange service, reached over HTTP."""

    service_url = Unicode(
        help=dedent(
            """
            The nbexchange service's base URL, ending in '/services/nbexchange/'.
            Defaults to $NBEX_SERVICE_URL. Under JupyterHub ($JUPYTERHUB_API_URL set),
            to the hub's public URL ($JUPYTERHUB_PUBLIC_HUB_URL, set when the hub has
            JupyterHub.public_url) plus the service's prefix, else to the address in
            the hub's record of the service (GET $JUPYTERHUB_API_URL/services/<name>,
            which the server's token may read only if granted read:services).
            Elsewhere, to http://127.0.0.1:9000/services/nbexchange/.
            """
        ).strip()
    ).tag(config=True)

    @default("service_url")
    def _service_url_default(self):
        if os.environ.get("NBEX_SERVICE_URL"):
            return os.environ["NBEX_SERVICE_URL"]
        if not os.environ.get("JUPYTERHUB_API_URL"):
            return FALLBACK_SERVICE_URL
        url, self._service_url_problem = hub_service_url(
            os.environ["JUPYTERHUB_API_URL"],
            os.environ.get("JUPYTERHUB_BASE_URL", "/"),
            os.environ.get("JUPYTERHUB_PUBLIC_HUB_URL", ""),
            self.service_name,
            os.environ.get("JUPYTERHUB_API_TOKEN", ""),
        )
        if url:
            self.log.debug("The exchange is at %s, as JupyterHub says.", url)
        return url

    service_name = Unicode(
        SERVICE_NAME, help="The exchange's name among JupyterHub's services, used to find its address."
    ).tag(config=True)

    api_token = Unicode(
        help="The token sent as 'Authorization: token ...'. Defaults to $NBEX_API_TOKEN, else $JUPYTERHUB_API_TOKEN."
    ).tag(config=True)

    @default("api_token")
    def _api_token_default(self):
        return os.environ.get("NBEX_API_TOKEN") or os.environ.get("JUPYTERHUB_API_TOKEN", "")

    connect_timeout = Float(10.0, help="Seconds to wait for a connection to the service.").tag(config=True)

    read_timeout = Float(
        300.0, help="Seconds to wait for the service's answer; an upload is answered once stored durably."
    ).tag(config=True)

    max_retries = Integer(
        5,
        help="How many times to retry a request the service could not take (no connection, 503; a load "
        "balancer's 502 or 504).",
    ).tag(config=True)

    retry_backoff = Float(
        0.5, help="Seconds before the first retry, doubled for each next one unless the service sends Retry-After."
    ).tag(config=True)

    max_retry_wait = Float(30.0, help="The longest wait between two tries, Retry-After included.").tag(config=True)

    progress_threshold = Integer(
        4 * 1024 * 1024, help="Archives larger than this many bytes show a progress bar in the log."
    ).tag(config=True)

    cache = Unicode(
        "",
        help=dedent(
            """
            Local cache for submissions and for the service's last position seen.
            Defaults to $JUPYTER_DATA_DIR/nbgrader_cache.
            """
        ).strip(),
    ).tag(config=True)

    @default("cache")
    def _cache_default(self):
        return os.path.join(jupyter_data_dir(), "nbgrader_cache")

    path_includes_course = Bool(
        False,
        help=dedent(
            """
            Whether the path for fetching/submitting assignments should be
            prefixed with the course name. If this is `False`, then the path
            will be something like `./ps1`. If this is `True`, then the path
            will be something like `./course123/ps1`.
            """
        ).strip(),
    ).tag(config=True)

    _session = None
    _position = None
    _service_url_problem = ""

    # -- the command's frame ---------------------------------------------------------------

    def start(self):
        """Run the action; nbgrader's server extension may build us without a course directory."""
        if self.coursedir is None:
            self.coursedir = CourseDirectory(parent=self)
        if not self.api_token:
            self.fail(f"No API token for the exchange: set {TOKEN_SETTINGS}.")
        if not self.service_url:
            self.fail(self._service_url_problem or "The exchange's address is unknown: set NBEX_SERVICE_URL.")
        return super().start()

    def set_timestamp(self):
        """Take the current time in UTC and nbgrader's format: the service records every time that way."""
        self.timestamp = datetime.now(timezone.utc).strftime(TIMESTAMP_FORMAT)

    def init_src(self):
        pass

    def init_dest(self):
        pass

    def copy_files(self):
        pass

    def require_course(self):
        """Fail as nbgrader does when no course id is given."""
        if self.coursedir.course_id == "":
            self.fail("No course id specified. Re-run with --course flag.")

    def require_plain_student_id(self):
        """Fail as nbgrader does on a student id given on the command line that is a pattern."""
        student_id = self.coursedir.student_id
        if student_id != "*" and ("*" in student_id or "+" in student_id):
            self.fail(f"The student ID should contain no '*' nor '+'; got {student_id}")

    def student_name(self):
        """This user's name as nbgrader writes it in cached submissions."""
        student_id = self.coursedir.student_id
        if student_id and student_id != "*":
            return student_id
        return os.environ.get("JUPYTERHUB_USER") or get_username()

    def gradebook_duedate(self):
        """The assignment's due date in nbgrader's gradebook (naive, in UTC, as nbgrader keeps it), or None."""
        # nbgrader's gradebook (and its SQLAlchemy), imported only when a due date matters.
        from nbgrader.api import Gradebook, MissingEntry
        from sqlalchemy.engine import make_url

        url = make_url(self.coursedir.db_url)
        if url.get_backend_name() == "sqlite" and not os.path.isfile(url.database or ""):
            return None  # no gradebook: opening one would create it
        with Gradebook(self.coursedir.db_url, self.coursedir.course_id) as gb:
            try:
                return gb.find_assignment(self.coursedir.assignment_id).duedate
            except MissingEntry:
                return None

    def assignment_root(self, course_id, assignment_id):
        """Where an assignment lives locally, relative to ``assignment_dir``."""
        if self.path_includes_course:
            return os.path.join(course_id, assignment_id)
        return assignment_id

    def not_found(self, path, pattern):
        """Fail on a missing folder, suggesting the closest one that matches ``pattern``."""
        msg = f"Assignment not found at: {path}"
        self.log.fatal(msg)
        close = difflib.get_close_matches(path, glob.glob(pattern), n=1, cutoff=0.0)
        if close:
            self.log.error("Did you mean: %s", close[0])
        raise ExchangeError(msg)

    # -- the service ------------------------------------------------------------------------

    def api_request(self, method, route, action, params=None, upload=None, download=None, write=None):
        """Call the service and answer its JSON; with ``download`` (a path), stream the answer there.

        Writes (every method but GET, and the GETs that append an event, marked ``write``)
        carry one Idempotency-Key across their retries and remember the position they were
        committed at; every GET asks for at least the last such position. Any failure ends
        in ``self.fail`` with ``action`` and the service's note.
        """
        url = self.service_url.rstrip("/") + "/" + route
        params = {key: value for key, value in (params or {}).items() if value is not None}
        headers = {"Authorization": f"token {self.api_token}", "Accept": "application/json"}
        write = method != "GET" if write is None else write
        if write:
            headers["Idempotency-Key"] = str(uuid.uuid4())
        if method == "GET" and self.last_position():
            params["min_position"] = self.last_position()
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            try:
                result = self._attempt(method, url, params, headers, upload, download, action, last)
            except RETRY_ERRORS as e:
                if last:
                    self.fail(
                        f"{action} failed: the exchange at {self.service_url} cannot be reached ({_reason(e)}). "
                        + TRY_LATER
                    )
                wait = self._backoff(attempt)
                self.log.warning(
                    "%s: the exchange cannot be reached (%s); trying again in %.1fs", action, _reason(e), wait
                )
            else:
                if not isinstance(result, _Retry):
                    break
                wait = min(self.max_retry_wait, result.after or self._backoff(attempt))
                self.log.warning("%s: the exchange is busy (%s); trying again in %.1fs", action, result.note, wait)
            time.sleep(wait)
        if write and isinstance(result, dict) and isinstance(result.get("position"), int):
            self.remember_position(result["position"])
        return result

    def _attempt(self, method, url, params, headers, upload, download, action, last):
        """One try: the answer, a ``_Retry`` when another try is worth it, or ``self.fail``."""
        body = None
        headers = dict(headers)
        if upload is not None:
            size = os.path.getsize(upload.path)
            body = upload.body(Progress(self.log, f"Uploading {upload.filename}", size, self.progress_threshold))
            headers["Content-Type"] = body.content_type
        try:
            self.log.debug("%s %s %s", method, url, params)
            with self.session.request(
                method,
                url,
                params=params,
                headers=headers,
                data=body,
                stream=True,
                # The exchange never redirects: a redirect means the address is not the exchange's.
                allow_redirects=False,
                timeout=(self.connect_timeout, self.read_timeout),
            ) as response:
                if response.status_code in RETRY_STATUSES and not last:
                    return _Retry(_note(response), _retry_after(response))
                if response.status_code == 401:
                    self.fail(f"{action} failed: {_note(response)} The token comes from {TOKEN_SETTINGS}.")
                if response.status_code >= 400:
                    self.fail(f"{action} failed: {_note(response)}")
                if download is not None:
                    self._save(response, download)
                    # A download that appends an event (fetched, collected) says where in a header.
                    position = response.headers.get("X-Nbexchange-Position", "")
                    return {"success": True, "position": int(position) if position.isdigit() else None}
                return self._json(response, action)
        finally:
            if body is not None:
                body.close()

    def _save(self, response, path):
        total = int(response.headers.get("Content-Length") or 0)
        progress = Progress(self.log, f"Downloading {os.path.basename(path)}", total, self.progress_threshold)
        with open(path, "wb") as out:
            for chunk in response.iter_content(CHUNK_SIZE):
                out.write(chunk)
                progress.advance(len(chunk))

    def _json(self, response, action):
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if not isinstance(answer, dict) or "success" not in answer:
            self.fail(f"{action} failed: {_not_the_exchange(response)}")
        if not answer.get("success"):
            self.fail(f"{action} failed: {answer.get('note') or 'the exchange did not say it succeeded'}")
        return answer

    def _backoff(self, attempt):
        return min(self.max_retry_wait, self.retry_backoff * 2**attempt)

    @property
    def session(self):
        """One HTTP session per action, so its connection is reused across requests."""
        if self._session is None:
            self._session = requests.Session()
        return self._session

    # -- read-your-writes -------------------------------------------------------------------

    def _position_file(self):
        # Each CLI call is a new process, so the last write's position lives on disk,
        # one file per service and user (the token tells two users of one account apart).
        user = os.environ.get("JUPYTERHUB_USER") or get_username()
        key = hashlib.sha256("\0".join([self.service_url, user, self.api_token]).encode()).hexdigest()[:24]
        return os.path.join(self.cache, "nbexchange", f"position-{key}.json")

    def last_position(self):
        """The log position of this user's last write to this service, or 0."""
        if self._position is None:
            try:
                with open(self._position_file()) as fh:
                    self._position = int(json.load(fh)["position"])
            except (OSError, ValueError, KeyError, TypeError):
                self._position = 0
        return self._position

    def remember_position(self, position):
        """Record a write's position, so that later reads (in any process) see that write."""
        if position <= self.last_position():
            return
        self._position = position
        path = self._position_file()
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".position-")
            with os.fdopen(fd, "w") as fh:
                json.dump({"service_url": self.service_url, "position": position}, fh)
            os.replace(tmp, path)
        except OSError as e:
            # Losing the position only means a later read may not yet show this write.
            self.log.warning("Could not record the exchange's position in %s: %s", path, e)

    # -- what several actions ask of the service --------------------------------------------

    def service_items(self, course_id):
        """The course's ``assignments`` items as this user sees them, rejected archives left out."""
        answer = self.api_request(
            "GET", "assignments", f"Listing the assignments of {course_id}", {"course_id": course_id}
        )
        return self.without_rejected(answer.get("value", []))

    def released_item(self, course_id, assignment_id):
        """The latest release of an assignment, or None if it is not released."""
        releases = [
            item
            for item in self.service_items(course_id)
            if item.get("status") == "released" and item.get("assignment_id") == assignment_id
        ]
        return max(releases, key=lambda item: item.get("timestamp") or "", default=None)

    def without_rejected(self, items):
        """``items`` less those whose archive the service rejected, each warned about with its reason."""
        kept = []
        for item in items:
            archive = item.get("archive") or {}
            if archive.get("state") == "rejected":
                self.log.warning(
                    "Skipping %s %s%s%s: the exchange rejected its archive: %s",
                    item.get("course_id"),
                    item.get("assignment_id"),
                    f" of {item['student_id']}" if item.get("student_id") else "",
                    f" ({item['timestamp']})" if item.get("timestamp") else "",
                    archive.get("reason") or "no reason given",
                )
                continue
            kept.append(item)
        return kept

    def user_courses(self):
        """The courses to look at: the configured one, else every course the service knows this user in."""
        if self.coursedir.course_id:
            return [self.coursedir.course_id]
        answer = self.api_request("GET", "history", "Listing your courses")
        value = answer.get("value", [])
        if isinstance(value, dict):
            return sorted(value)
        return sorted({item["course_id"] for item in value if isinstance(item, dict) and item.get("course_id")})

    # -- archives ---------------------------------------------------------------------------

    def ignore(self):
        """The course directory's ignore, include and max_file_size rules, as a copytree ignore."""
        return ignore_patterns(
            exclude=self.coursedir.ignore,
            include=self.coursedir.include,
            max_file_size=self.coursedir.max_file_size,
            log=self.log,
        )

    @contextlib.contextmanager
    def packed(self, src, extras=None):
        """Pack ``src`` into a temporary gzip'd tar, as nbgrader's copy rules allow; yield (path, files)."""
        size = _folder_size(src)
        limit = 1000 * self.coursedir.max_dir_size
        if size > limit:
            self.fail(f"Directory size is too big. Size is {size}, maximum size is {limit}")
        with tempfile.TemporaryDirectory(prefix="nbexchange-") as tmp:
            archive = os.path.join(tmp, os.path.basename(os.path.abspath(src)) + ".tar.gz")
            files = pack(src, archive, self.ignore(), extras or {}, self.log)
            yield archive, files

    @contextlib.contextmanager
    def downloaded(self, route, params, action):
        """Download an archive from the service and yield the temporary folder it unpacked to."""
        with tempfile.TemporaryDirectory(prefix="nbexchange-") as tmp:
            archive = os.path.join(tmp, f"{params.get('assignment_id', 'archive')}.tar.gz")
            self.api_request("GET", route, action, params, download=archive, write=True)
            folder = os.path.join(tmp, "unpacked")
            try:
                unpack(archive, folder)
            except Exception as e:  # tarfile and its filters raise many kinds; all mean a bad archive
                self.fail(f"{action} failed: the archive from the exchange cannot be unpacked safely: {e}")
            yield folder


class _Retry:
    """An answer that asks for another try, with the service's note and its Retry-After in seconds."""

    def __init__(self, note, after):
        self.note = note
        self.after = after


def _note(response):
    """The service's note on a failed answer; any other answer (a proxy's or hub's page) named by URL and status."""
    try:
        answer = response.json()
    except ValueError:
        answer = None
    note = answer.get("note") if isinstance(answer, dict) else None
    if not isinstance(note, str) or not note:
        return _not_the_exchange(response)
    return f"{note} (HTTP {response.status_code})"


def _not_the_exchange(response):
    """One line for an answer that is not the exchange's JSON: never the page itself, which users cannot act on."""
    url = response.url.split("?", 1)[0]
    kind = (response.headers.get("Content-Type") or "").split(";", 1)[0].strip() or "no content type"
    moved = f", redirecting to {response.headers['Location']}" if response.headers.get("Location") else ""
    return (
        f"{url} answered HTTP {response.status_code} {response.reason or ''}".rstrip()
        + f" ({kind}{moved}), which is not the exchange's answer: is the exchange's address right? "
        "Set NBEX_SERVICE_URL or c.Exchange.service_url."
    )


def _reason(error):
    """Why a connection failed, in a few words ("Connection refused"), not urllib3's nested repr."""
    if isinstance(error, requests.Timeout):
        return "no answer in time"
    seen = set()
    pending = [error]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and isinstance(current.strerror, str) and current.strerror:
            return current.strerror
        # requests wraps urllib3's MaxRetryError, which holds the connection error as ``reason``.
        pending.extend(
            cause
            for cause in (current.__cause__, current.__context__, getattr(current, "reason", None), *current.args)
            if isinstance(cause, BaseException)
        )
    return type(error).__name__


#: Addresses the hub gave, by what was asked: a notebook server's extension builds an exchange per request.
#: Only answers are kept, so a hub that was briefly down is asked again.
_HUB_ANSWERS: dict[tuple[str, ...], str] = {}


def hub_service_url(hub_api_url, hub_base_url, public_hub_url, service_name, token):
    """Where a hub service answers, as JupyterHub knows it: ``(url, "")``, or ``("", why it is unknown)``.

    The hub's public URL (through its proxy, the way users reach every service) comes first;
    else the hub's record of the service, which names the address the proxy forwards to.
    """
    key = (hub_api_url, hub_base_url, public_hub_url, service_name, hashlib.sha256(token.encode()).hexdigest())
    if key not in _HUB_ANSWERS:
        url, problem = _ask_hub(hub_api_url, hub_base_url, public_hub_url, service_name, token)
        if not url:
            return "", problem
        _HUB_ANSWERS[key] = url
    return _HUB_ANSWERS[key], ""


def _ask_hub(hub_api_url, hub_base_url, public_hub_url, service_name, token):
    """``hub_service_url``'s answer, found afresh."""
    prefix = "/".join(["", *filter(None, hub_base_url.split("/")), "services", quote(service_name, safe=""), ""])
    public = urlsplit(public_hub_url)
    if public.scheme in ("http", "https") and public.netloc:
        return f"{public.scheme}://{public.netloc}{prefix}", ""
    record_url = f"{hub_api_url.rstrip('/')}/services/{quote(service_name, safe='')}"
    advice = (
        "set NBEX_SERVICE_URL (e.g. in c.Spawner.environment), set JupyterHub.public_url, "
        f"or grant the user and server roles read:services!service={service_name} (see nbexchange's "
        "docs/operations.md, 'How the plugin finds the exchange')."
    )
    try:
        response = requests.get(
            record_url, headers={"Authorization": f"token {token}"}, timeout=HUB_TIMEOUT, allow_redirects=False
        )
    except requests.RequestException as e:
        return "", f"JupyterHub at {hub_api_url} cannot be reached to find the exchange ({_reason(e)}). " + TRY_LATER
    try:
        model = response.json()
    except ValueError:
        model = None
    if response.status_code == 200 and isinstance(model, dict):
        url, path = model.get("url"), model.get("prefix")
        if isinstance(url, str) and url and isinstance(path, str) and path:
            return url.rstrip("/") + "/" + path.lstrip("/"), ""
    return "", (
        f"The exchange's address is unknown: the hub has no public URL and {record_url} answered "
        f"HTTP {response.status_code} without the service's address. Ask the hub's administrators to " + advice
    )


def _retry_after(response):
    """Retry-After in seconds (either form HTTP allows), or None."""
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, (parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds())
    except (TypeError, ValueError):
        return None


def _folder_size(root):
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                total += os.path.getsize(path)
    return total


def copy_tree(src, dest, ignore=None):
    """Copy a folder to ``dest`` (which must not exist), creating its parents."""
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    shutil.copytree(src, dest, ignore=ignore)
