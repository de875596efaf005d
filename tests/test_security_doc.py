"""docs/security.md is the rendering of every hostile marker in the suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hostile import DOC


def test_security_doc_matches_the_tests(tmp_path: Path) -> None:
    # The whole suite is collected afresh: this run may be a subset of it.
    made = tmp_path / "security.md"
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", f"--security-doc={made}"],
        cwd=DOC.parent.parent,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert collected.returncode == 0, collected.stdout + collected.stderr
    page = DOC.read_text(encoding="utf-8") if DOC.exists() else ""
    assert "\n## " in made.read_text(encoding="utf-8"), "no test carries a hostile marker"
    assert page == made.read_text(encoding="utf-8"), (
        "docs/security.md is out of date: python -m pytest --collect-only -q --security-doc=docs/security.md"
    )
