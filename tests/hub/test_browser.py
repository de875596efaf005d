"""Students and teachers use JupyterLab: the cycle in a real browser, under a real JupyterHub.

Chromium from the system's packages (never a downloaded one), headless, driven by
Playwright. A student logs into the hub, opens JupyterLab's Assignments tab
(nbgrader's lab extension, which calls the plugin inside the student's server),
fetches, edits and submits; the instructor collects from nbgrader's formgrader.
Each step leaves a screenshot under the test's tmp folder, and in
``$NBEX_ARTIFACTS`` when CI sets it.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hubtools import COURSE, PASSWORD, Hub, missing, nbgrader, require
from nbformat import write as write_notebook
from nbformat.v4 import new_code_cell, new_notebook

pytestmark = [pytest.mark.slow, pytest.mark.hub]

#: Generous: JupyterLab's first load in a cold server on a busy two-core machine.
LOAD_TIMEOUT = 120_000


class Screenshots:
    """Numbered screenshots of each step, in the test's tmp folder and in ``$NBEX_ARTIFACTS`` if set."""

    def __init__(self, folder: Path) -> None:
        self.folders = [folder]
        if os.environ.get("NBEX_ARTIFACTS"):
            self.folders.append(Path(os.environ["NBEX_ARTIFACTS"]) / "browser")
        for each in self.folders:
            each.mkdir(parents=True, exist_ok=True)
        self.taken: list[Path] = []

    def take(self, page: Any, name: str) -> Path:
        path = self.folders[0] / f"{len(self.taken) + 1:02d}-{name}.png"
        page.screenshot(path=str(path))
        for other in self.folders[1:]:
            shutil.copy(path, other / path.name)
        self.taken.append(path)
        return path


@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless Chromium from the system's packages."""
    require("chromium", "apt-get install -y chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed (pip install -e '.[test]')")
    with sync_playwright() as playwright:
        # Chromium's sandbox needs user namespaces a root CI container does not give.
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        chromium = playwright.chromium.launch(executable_path=shutil.which("chromium"), headless=True, args=args)
        yield chromium
        chromium.close()


def log_in(browser: Any, hub: Hub, name: str) -> Any:
    """A page in a browser of ``name``'s own, logged into the hub through its login form."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    context.set_default_timeout(60_000)
    page = context.new_page()
    page.goto(hub.public_url + "hub/login")
    page.fill("#username_input", name)
    page.fill("#password_input", PASSWORD)
    page.click("#login_submit")
    page.wait_for_load_state()
    return page


def source_assignment(hub: Hub) -> None:
    """The instructor's ps1, generated and released with nbgrader's command line in the instructor's server."""
    folder = hub.home("ada") / "source" / "ps1"
    folder.mkdir(parents=True)
    notebook = new_notebook(cells=[new_code_cell("answer = None  # your answer here")])
    notebook.metadata.kernelspec = {"name": "python3", "display_name": "Python 3", "language": "python"}
    with open(folder / "p1.ipynb", "w") as fh:
        write_notebook(notebook, fh)
    ada = hub.servers["ada"]
    nbgrader(ada, "generate_assignment", "ps1")
    nbgrader(ada, "release_assignment", "ps1")


def wait_for_file(path: Path, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.25)
    raise AssertionError(f"{path} did not come to hold {text!r} within {timeout}s")


def test_a_student_fetches_edits_and_submits_in_jupyterlab_and_the_instructor_collects(hub_factory, browser, tmp_path):
    hub = hub_factory()
    for name in ("ada", "s1"):
        # As an institution's image would: no "official Jupyter news?" prompt over the students' work.
        settings = hub.home(name) / ".jupyter/lab/user-settings/@jupyterlab/apputils-extension"
        settings.mkdir(parents=True)
        (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    hub.spawn("ada", "s1")
    source_assignment(hub)
    shots = Screenshots(tmp_path / "screenshots")

    # The student: JupyterLab, nbgrader's Assignments tab, listing through the plugin in the student's server.
    page = log_in(browser, hub, "s1")
    page.goto(hub.public_url + "user/s1/lab")
    page.wait_for_selector("#jp-main-dock-panel", timeout=LOAD_TIMEOUT)
    page.get_by_text("Nbgrader", exact=True).click()
    page.get_by_text("Assignment List", exact=True).click()
    released = page.locator("#released_assignments_list .list_item", has_text="ps1")
    released.wait_for()
    assert COURSE in released.inner_text()
    shots.take(page, "student-assignments-released")

    released.get_by_role("button", name="Fetch").click()
    fetched = page.locator("#fetched_assignments_list .list_item", has_text="ps1").first
    fetched.wait_for()
    assert (hub.home("s1") / "ps1" / "p1.ipynb").is_file()
    shots.take(page, "student-fetched")

    # Edit: open the notebook from the list, change the answer, save.
    fetched.locator("a.assignment-notebooks-link").click()
    page.locator(f"#nbgrader-{COURSE}-ps1").get_by_role("link", name="p1").click()
    editor = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell .cm-content").first
    editor.wait_for(timeout=LOAD_TIMEOUT)
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.type("answer = 42")
    page.keyboard.press("Control+S")
    wait_for_file(hub.home("s1") / "ps1" / "p1.ipynb", "answer = 42")
    shots.take(page, "student-edited")

    # Submit from the Assignments tab.
    page.locator(".lm-TabBar-tab", has_text="Assignments").click()
    page.locator("#fetched_assignments_list .list_item", has_text="ps1").first.get_by_role(
        "button", name="Submit"
    ).click()
    submitted = page.locator("#submitted_assignments_list .list_item", has_text="ps1").first
    submitted.wait_for()
    submitted_as = submitted.inner_text()
    assert "UTC" in submitted_as
    shots.take(page, "student-submitted")
    page.context.close()

    # The instructor: nbgrader's formgrader, Collect.
    page = log_in(browser, hub, "ada")
    page.goto(hub.public_url + "user/ada/formgrader")
    row = page.locator("tr", has_text="ps1").filter(has=page.locator("td.collect a"))
    row.wait_for(timeout=LOAD_TIMEOUT)
    shots.take(page, "instructor-formgrader")
    row.locator("td.collect a").click()
    page.get_by_text("Successfully collected submissions of 'ps1'.").wait_for()
    page.wait_for_function("getComputedStyle(document.querySelector('.modal')).opacity === '1'")
    shots.take(page, "instructor-collected")
    collected = hub.home("ada") / "submitted" / "s1" / "ps1"
    assert "answer = 42" in (collected / "p1.ipynb").read_text()
    assert (collected / "timestamp.txt").read_text().strip() in submitted_as

    assert [path.name for path in shots.taken] == [
        "01-student-assignments-released.png",
        "02-student-fetched.png",
        "03-student-edited.png",
        "04-student-submitted.png",
        "05-instructor-formgrader.png",
        "06-instructor-collected.png",
    ]
