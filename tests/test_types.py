"""The core is type-checked: ``events``, ``projections`` and ``workers`` pass ``mypy --strict``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(bool(os.environ.get("NBEX_TEST_DB_URL")), reason="backend-independent: checked in the SQLite pass")
def test_core_passes_mypy_strict():
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "nbexchange/events", "nbexchange/projections", "nbexchange/workers"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success" in result.stdout


def test_core_imports_no_web_or_queue_code():
    """The log and the projections load without tornado or celery."""
    code = (
        "import sys, nbexchange.events, nbexchange.events.sql, nbexchange.projections;"
        "bad = [m for m in ('tornado', 'celery', 'kombu') if m in sys.modules];"
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"core imported: {result.stdout} {result.stderr}"
