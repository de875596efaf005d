"""Failures end the command non-zero with the service's note; the plugin needs none of the server's dependencies."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

PLUGIN_DIR = Path(__file__).resolve().parents[2] / "plugin"


def test_a_bad_token_or_a_stopped_service_fails_with_the_reason(classroom):
    classroom.instructor.release("ps1")
    student = classroom.student1
    student.nbgrader("fetch_assignment", "ps1")
    student.configure("c.Exchange.api_token = 'not-a-token'")
    log = student.nbgrader("list", retcode=1)
    assert "Listing the assignments of course101 failed: " in log
    assert "The API token sent was not accepted" in log and "(HTTP 401)" in log
    assert "c.Exchange.api_token" in log and "NBEX_API_TOKEN" in log  # where to fix it
    assert "not-a-token" not in log
    assert "nbgrader list failed" in log

    student.configure("c.Exchange.api_token = ''")
    log = student.nbgrader("fetch_assignment", "ps1", retcode=1)
    assert "No API token for the exchange" in log and "NBEX_API_TOKEN" in log

    student.configure("c.Exchange.max_retries = 2")
    classroom.service.stop()
    log = student.nbgrader("fetch_assignment", "ps1", "--Exchange.path_includes_course=True", retcode=1)
    assert log.count("the exchange cannot be reached (Connection refused)") == 2
    assert "Fetching course101 ps1 failed: the exchange at " in log
    assert not (student.home / "course101" / "ps1").exists()
    log = student.nbgrader_process("list", retcode=1)
    assert "cannot be reached" in log

    # What a student reads when submitting to an exchange that is down: that nothing was
    # submitted and what to do, on one line, in the real command's output.
    log = student.nbgrader_process("submit", "ps1", retcode=1)
    (final,) = [line for line in log.splitlines() if "CRITICAL" in line]
    assert final.endswith(
        "course101 ps1 was NOT submitted. Listing the assignments of course101 failed: the exchange at "
        f"{classroom.service.url} cannot be reached (Connection refused). "
        "Try again in a few minutes; if it keeps failing, tell your instructor."
    )
    assert "Traceback" not in log and "HTTPConnection" not in log and "Max retries" not in log
    assert not (student.cache / "course101").exists()


BLOCKED_IMPORT_CHECK = textwrap.dedent(
    """
    import sys

    SERVER_ONLY = {"celery", "kombu", "redis", "sqlalchemy"}

    def importer():
        # The first frame outside importlib is the module whose import statement runs.
        frame = sys._getframe(2)
        while frame is not None and frame.f_code.co_filename.startswith("<frozen importlib"):
            frame = frame.f_back
        return frame.f_globals.get("__name__", "") if frame is not None else ""

    class RefuseServerDependencies:
        def find_spec(self, name, path=None, target=None):
            top = name.partition(".")[0]
            by = importer()
            # nbgrader's own gradebook needs SQLAlchemy; the plugin and the rest may not.
            if top in SERVER_ONLY and not (top == "sqlalchemy" and not by.startswith("nbexchange")):
                raise ImportError(f"{name} is a server dependency (imported by {by})")
            if SERVER_ABSENT and top == "nbexchange" and name not in ("nbexchange", "nbexchange.plugin"):
                if not name.startswith("nbexchange.plugin."):
                    raise ImportError(f"{name} belongs to the server, which is not installed here")
            return None

    sys.meta_path.insert(0, RefuseServerDependencies())

    import nbexchange.plugin
    from nbgrader.exchange import ExchangeFactory
    from traitlets.config import Config

    CLASSES = {
        "collect": "ExchangeCollect",
        "exchange": "Exchange",
        "fetch_assignment": "ExchangeFetchAssignment",
        "fetch_feedback": "ExchangeFetchFeedback",
        "list": "ExchangeList",
        "release_assignment": "ExchangeReleaseAssignment",
        "release_feedback": "ExchangeReleaseFeedback",
        "submit": "ExchangeSubmit",
    }
    config = Config()
    for action, name in CLASSES.items():
        setattr(config.ExchangeFactory, action, f"nbexchange.plugin.{name}")
    factory = ExchangeFactory(config=config)
    assert isinstance(factory.Submit(), nbexchange.plugin.ExchangeSubmit)
    assert isinstance(factory.List(), nbexchange.plugin.ExchangeList)

    loaded = sorted(name for name in sys.modules if name.partition(".")[0] in {"celery", "kombu", "redis"})
    assert not loaded, loaded
    for module_name, module in list(sys.modules.items()):
        if module_name.startswith("nbexchange.plugin"):
            for value in vars(module).values():
                home = getattr(value, "__module__", None) or getattr(value, "__name__", "")
                assert not str(home).startswith("sqlalchemy"), (module_name, value)
    server_modules = [
        name for name in sys.modules
        if name.partition(".")[0] == "nbexchange" and name != "nbexchange" and not name.startswith("nbexchange.plugin")
    ]
    assert not server_modules, server_modules
    print("imported", nbexchange.plugin.__file__)
    """
)


def run_import_check(server_absent):
    code = f"SERVER_ABSENT = {server_absent}\n{BLOCKED_IMPORT_CHECK}"
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": str(PLUGIN_DIR), "PATH": "/usr/bin:/bin", "HOME": "/tmp"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"imported {PLUGIN_DIR}" in done.stdout


def test_the_plugin_imports_without_the_servers_dependencies():
    run_import_check(server_absent=False)


def test_the_plugin_imports_without_the_server_package():
    run_import_check(server_absent=True)
