"""The hostile inputs the suite tries, as ``hostile`` markers on the tests; ``docs/security.md`` is made from them.

A test (or one ``pytest.param``) that sends hostile input carries
``@pytest.mark.hostile(topic, tried, answer)``: the class of input, what is
sent, and what the service answers. Collecting the suite gathers every marker;
``python -m pytest --collect-only -q --security-doc=docs/security.md``
rewrites the page, and ``tests/test_security_doc.py`` fails when the page and
the markers disagree, so the page cannot drift from what is tested.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "security.md"

#: What precedes the generated table: the page's own prose, kept in this module.
PREAMBLE = """\
# Security: what is tried, and what the service answers

This page is generated from the test suite (`tests/hostile.py`): every row is a
hostile input that a test sends to a live service (or to the archive checker),
with the answer the test asserts. Regenerate it with

```bash
python -m pytest --collect-only -q --security-doc=docs/security.md
```

and `tests/test_security_doc.py` fails while it is out of date. The limits an
operator can set are in `docs/operations.md` ("Settings"); what each one
bounds is named in the rows below.

The "API schema" rows are property tests: schemathesis generates requests from
`nbexchange/api/openapi.yaml` and sends them to a live service with every
role's token. The suite runs a small fixed budget (6 examples per operation and
role); the longer run, for a release or after changing the API, is

```bash
NBEX_FUZZ_EXAMPLES=500 python -m pytest -p no:cacheprovider tests/api/test_schema_fuzz.py
```

(add `NBEX_TEST_DB_URL=postgresql+psycopg://…` and `NBEX_TEST_BROKER_URL=redis://…`
to run it against PostgreSQL and Redis).
"""


@dataclass(frozen=True, order=True)
class Tried:
    """One hostile input: its class, what is sent, what comes back."""

    topic: str
    tried: str
    answer: str


def cases(items: Iterable[pytest.Item]) -> list[Tried]:
    """Every ``hostile`` marker on the collected items, once each, sorted by topic."""
    found: set[Tried] = set()
    for item in items:
        for mark in item.iter_markers("hostile"):
            found.add(Tried(*mark.args, **mark.kwargs))
    return sorted(found)


def render(tried: Iterable[Tried]) -> str:
    """The page: the preamble, then one table per topic."""
    out = [PREAMBLE]
    topic = None
    for case in tried:
        if case.topic != topic:
            topic = case.topic
            out.append(f"\n## {topic}\n\n| tried | answer |\n|---|---|")
        out.append(f"| {_cell(case.tried)} | {_cell(case.answer)} |")
    return "\n".join(out) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
