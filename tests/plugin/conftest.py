"""Fixtures for the plugin's tests: people with homes and nbgrader configs of their own, and a live service."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

PLUGIN_DIR = Path(__file__).resolve().parents[2] / "plugin"
# The plugin is a distribution of its own; test the working tree's copy, installed or not.
if str(PLUGIN_DIR) not in sys.path:
    sys.path.insert(0, str(PLUGIN_DIR))

from nbformat import write as write_notebook  # noqa: E402
from nbformat.v4 import new_notebook  # noqa: E402
from nbgrader.tests import create_grade_cell, create_solution_cell, run_nbgrader  # noqa: E402
from service import PLUGIN_FACTORY_CONFIG  # noqa: E402
from traitlets.config.loader import PyFileConfigLoader  # noqa: E402

USERS = {
    "instructor": {"course101": "Instructor", "course102": "Instructor"},
    "student1": {"course101": "Student", "course102": "Student"},
    "student2": {"course101": "Student"},
}

CONFIG = (
    "c = get_config()\n"
    + PLUGIN_FACTORY_CONFIG.replace("{", "{{").replace("}", "}}")
    + """\
c.Exchange.service_url = {service_url!r}
c.Exchange.api_token = {token!r}
c.Exchange.cache = {cache!r}
c.Exchange.retry_backoff = 0.1
c.CourseDirectory.course_id = {course_id!r}
c.CourseDirectory.root = {root!r}
"""
)

#: The service's prefix, as the scripted stand-in serves it.
BASE = "/services/nbexchange/"

SUBMITTED_AS = re.compile(r"Submitted as: (\S+) (\S+) (.+ UTC)$", re.MULTILINE)


@contextlib.contextmanager
def working_directory(path):
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def settle(service_url, timeout=15.0):
    """Wait until the service's read models have caught up with its log.

    One user sees another's writes only once the projections have applied them.
    People act seconds apart; tests act milliseconds apart, so when the turn passes
    to another person the test waits. A person's own writes are never waited for
    here: the plugin's min_position must make them visible.
    """
    deadline = time.monotonic() + timeout
    answer = None
    while time.monotonic() < deadline:
        try:
            answer = requests.get(service_url + "ready", timeout=5).json()
        except requests.RequestException:
            return  # a stopped service: the command itself will say so
        if answer.get("projection_lag") == 0:
            return
        time.sleep(0.02)
    raise AssertionError(f"The service at {service_url} did not catch up within {timeout}s: {answer}")


def make_notebook(path, answer="return 42"):
    """An nbgrader source notebook: one solution cell and one graded test cell."""
    notebook = new_notebook()
    notebook.metadata.kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.cells.append(
        create_solution_cell(
            f"def answer():\n    ### BEGIN SOLUTION\n    {answer}\n    ### END SOLUTION", "code", "sol"
        )
    )
    notebook.cells.append(create_grade_cell("assert answer() == 42", "code", "test", 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        write_notebook(notebook, fh)


class Person:
    """One user of the exchange: a home that is their working directory and course root, with its own config."""

    def __init__(self, name, token, service_url, home, turn, course_id="course101"):
        self.name = name
        self.turn = turn
        self.home = home
        self.service_url = service_url
        self.cache = home / ".cache" / "nbgrader_cache"
        self.home.mkdir(parents=True, exist_ok=True)
        self.base_config = CONFIG.format(
            service_url=service_url, token=token, cache=str(self.cache), course_id=course_id, root=str(home)
        )
        self.configure()

    def configure(self, *lines):
        """Write this person's nbgrader_config.py: the exchange settings plus ``lines``."""
        (self.home / "nbgrader_config.py").write_text(self.base_config + "".join(f"{line}\n" for line in lines))

    def config(self):
        """This person's nbgrader config, loaded as nbgrader's server extension loads it."""
        return PyFileConfigLoader("nbgrader_config.py", path=str(self.home)).load_config()

    def inside(self):
        """A context in which this person's home is the working directory."""
        return working_directory(self.home)

    def env(self):
        env = {key: value for key, value in os.environ.items() if not key.startswith(("NBEX_", "JUPYTERHUB_"))}
        env.update(
            HOME=str(self.home),
            JUPYTER_CONFIG_DIR=str(self.home / ".jupyter"),
            JUPYTER_DATA_DIR=str(self.home / ".local" / "share" / "jupyter"),
            PYTHONPATH=os.pathsep.join(filter(None, [str(PLUGIN_DIR), os.environ.get("PYTHONPATH")])),
        )
        return env

    def settle(self):
        """Wait until everyone's writes so far are visible to this person."""
        settle(self.service_url)

    def take_turn(self):
        """Settle if someone else acted last: their writes should be visible to this person."""
        if self.turn.last not in (None, self.name):
            self.settle()
        self.turn.last = self.name

    def nbgrader(self, *args, retcode=0):
        """Run an nbgrader command in this process (as nbgrader's own tests do); answer its log."""
        self.take_turn()
        with self.inside():
            return run_nbgrader(list(args), retcode=retcode, env=self.env())

    def nbgrader_process(self, *args, retcode=0):
        """Run the real ``nbgrader`` command in a process of its own; answer its output."""
        self.take_turn()
        done = subprocess.run(
            ["nbgrader", *args], cwd=self.home, env=self.env(), capture_output=True, text=True, timeout=180
        )
        output = done.stdout + done.stderr
        assert done.returncode == retcode, output
        return output

    # -- an instructor's steps --------------------------------------------------------------

    def create_assignment(self, assignment_id, notebooks=("p1",), files=None, generate=False):
        """Write an assignment's notebooks and other ``files`` into its release folder.

        With ``generate``, write them as the source folder and run ``generate_assignment``
        (seconds: it sets up the gradebook); the exchange only ever reads the release folder.
        """
        folder = self.home / ("source" if generate else "release") / assignment_id
        for notebook_id in notebooks:
            make_notebook(folder / f"{notebook_id}.ipynb")
        for name, text in (files or {}).items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
        if generate:
            self.nbgrader("generate_assignment", assignment_id, "--force")

    def release(self, assignment_id, *args, notebooks=("p1",), files=None):
        """Create and release an assignment; answer the release's log."""
        self.create_assignment(assignment_id, notebooks, files)
        return self.nbgrader("release_assignment", assignment_id, *args)

    def write_feedback(self, student_id, assignment_id, html, notebook_id="p1"):
        """Feedback for a collected submission, laid out as ``generate_feedback`` lays it out."""
        submitted = self.home / "submitted" / student_id / assignment_id
        feedback = self.home / "feedback" / student_id / assignment_id
        feedback.mkdir(parents=True, exist_ok=True)
        for name in ("timestamp.txt", "submission_secret.txt"):
            shutil.copy(submitted / name, feedback / name)
        (feedback / f"{notebook_id}.html").write_text(html)

    # -- a student's steps ------------------------------------------------------------------

    def submit(self, assignment_id, *args):
        """Submit and answer the timestamp the submission was made at."""
        log = self.nbgrader("submit", assignment_id, *args)
        return submitted_timestamp(log)


def submitted_timestamp(log):
    """The timestamp in a ``Submitted as: <course> <assignment> <timestamp>`` line."""
    match = SUBMITTED_AS.search(log)
    assert match, log
    return match.group(3)


@pytest.fixture
def classroom(exchange_service, tmp_path):
    """A live service with an instructor of course101 and course102, student1 in both, student2 in course101."""
    service = exchange_service(users=USERS)
    turn = SimpleNamespace(last=None)
    people = {name: Person(name, service.tokens[name], service.url, tmp_path / name, turn) for name in USERS}
    return SimpleNamespace(service=service, **people)


class Script(BaseHTTPRequestHandler):
    """Answers each request with the next scripted (status, headers, body) and records what it got."""

    def do_GET(self):
        self._answer()

    def do_POST(self):
        self._answer()

    def _answer(self):
        server = self.server
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        url = urlsplit(self.path)
        server.seen.append(
            {
                "method": self.command,
                "path": url.path,
                "route": url.path[len(BASE) :],
                "query": {key: values[0] for key, values in parse_qs(url.query).items()},
                "headers": dict(self.headers),
                "body": body,
                "at": time.monotonic(),
            }
        )
        status, headers, payload = server.answers.pop(0)
        if isinstance(payload, (dict, list)):
            payload = json.dumps(payload).encode()
            headers = {"Content-Type": "application/json", **headers}
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Script)
    server.seen, server.answers = [], []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}{BASE}"
    yield server
    server.shutdown()
    server.server_close()
