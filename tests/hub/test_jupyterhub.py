"""The whole nbgrader cycle under a real JupyterHub, as a managed and as an external service.

Each user's ``nbgrader`` runs with the environment the hub's spawner gave that
user's server (its own ``JUPYTERHUB_API_TOKEN``, the hub's URLs) and a config
with the plugin's classes only: the plugin must find the service and the hub
must vouch for each user, with their courses from hub groups.
"""

from __future__ import annotations

import re

import pytest
import requests
from hubtools import COURSE, Hub, nbgrader, require_redis
from nbformat import write as write_notebook
from nbformat.v4 import new_markdown_cell, new_notebook

pytestmark = [pytest.mark.slow, pytest.mark.hub]

#: The shared Redis .ci/run starts (the suite's own broker URL is set only in its PostgreSQL pass).
BROKER_URL = "redis://127.0.0.1:6379/0"
SUBMITTED_AS = re.compile(r"Submitted as: (\S+) (\S+) (.+ UTC)$", re.MULTILINE)


def release_files(home, assignment_id):
    """An assignment in the instructor's release folder (nbgrader generate_assignment's output)."""
    folder = home / "release" / assignment_id
    folder.mkdir(parents=True)
    notebook = new_notebook(cells=[new_markdown_cell("What is 6 x 7?")])
    with open(folder / "p1.ipynb", "w") as fh:
        write_notebook(notebook, fh)


def cycle(hub: Hub, expected_service_url: str) -> None:
    """Release, list, fetch, submit, collect, release and fetch feedback; every step by its own user's server."""
    ada, s1, s2 = hub.spawn("ada", "s1", "s2")
    for env in (ada, s1, s2):
        assert not any(key.startswith("NBEX_") for key in env)

    release_files(hub.home("ada"), "ps1")
    log = nbgrader(ada, "release_assignment", "ps1")
    assert f"Released as: {COURSE} ps1" in log, log

    listed = nbgrader(s1, "list")
    assert f"{COURSE} ps1" in listed and "failed" not in listed, listed
    nbgrader(s1, "fetch_assignment", "ps1")
    work = hub.home("s1") / "ps1" / "p1.ipynb"
    work.write_text(work.read_text().replace("What is 6 x 7?", "What is 6 x 7? 42"))
    submitted = nbgrader(s1, "submit", "ps1")
    assert f"Destination: {expected_service_url}" in submitted, submitted
    stamp = SUBMITTED_AS.search(submitted)
    assert stamp, submitted

    # A student may not act as an instructor: the hub's groups decide, per course. No role override lets the
    # servers' tokens read their users' groups: JupyterHub 5 and 6 give every token its owner's groups.
    refused = nbgrader(s2, "collect", "ps1", retcode=1)
    assert "HTTP 403" in refused, refused

    collected = nbgrader(ada, "collect", "ps1")
    assert "Collecting submission: s1 ps1" in collected, collected
    got = hub.home("ada") / "submitted" / "s1" / "ps1"
    assert "42" in (got / "p1.ipynb").read_text()
    assert (got / "timestamp.txt").read_text() == stamp.group(3)

    feedback = hub.home("ada") / "feedback" / "s1" / "ps1"
    feedback.mkdir(parents=True)
    for name in ("timestamp.txt", "submission_secret.txt"):
        (feedback / name).write_text((got / name).read_text())
    (feedback / "p1.html").write_text("<html><body>Well done.</body></html>")
    nbgrader(ada, "release_feedback", "ps1")
    nbgrader(s1, "fetch_feedback", "ps1")
    fetched = hub.home("s1") / "ps1" / "feedback" / stamp.group(3) / "p1.html"
    assert fetched.read_text() == "<html><body>Well done.</body></html>"


def quiet_service_checks(hub: Hub) -> None:
    """The hub checks the service's URL every 2s here; none of those checks may have met an error."""
    text = "\n".join(log.read_text(errors="replace") for log in (hub.log, hub.root / "service.log") if log.exists())
    assert "nbexchange" in text
    assert not re.search(r"responded with error|Cannot connect to .*service nbexchange", text), text[-3000:]
    assert not re.search(r"404 GET /services/nbexchange/ ", text), text[-3000:]


def test_managed_service_and_workers_behind_the_hubs_public_url(hub_factory):
    """The production example of docs/operations.md: Redis, and the hub running the workers as a second service."""
    require_redis(BROKER_URL)
    hub = hub_factory(external=False, broker_url=BROKER_URL)
    # What the hub's periodic check fetches, through the proxy: the prefix answers.
    about = requests.get(hub.public_url + "services/nbexchange/", timeout=10)
    assert about.status_code == 200 and about.json()["name"] == "nbexchange"
    cycle(hub, f"{hub.public_url}services/nbexchange/")
    quiet_service_checks(hub)
    # With a broker the API process runs no workers: the archives were checked by the one the hub runs.
    assert re.search(r"Task nbexchange\.check_archives\[[^\]]+\] succeeded", hub.log.read_text(errors="replace"))


def test_external_service_found_through_the_hubs_record_of_it(hub_factory):
    hub = hub_factory(external=True)
    record = hub.api("GET", "/services/nbexchange").json()
    cycle(hub, record["url"] + "/services/nbexchange/")
    quiet_service_checks(hub)
