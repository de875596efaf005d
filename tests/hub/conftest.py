"""Fixtures for the tests under a real JupyterHub: hubs started on their own ports, stopped after the test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hubtools import Hub, require_jupyterhub, start_hub


@pytest.fixture
def hub_factory(tmp_path: Path) -> Iterator[Callable[..., Hub]]:
    """Factory: ``hub_factory(external=False)`` starts a JupyterHub with nbexchange as a service."""
    require_jupyterhub()
    hubs: list[Hub] = []

    def start(external: bool = False, broker_url: str = "") -> Hub:
        return start_hub(tmp_path / ("external" if external else "managed"), external, hubs, broker_url)

    yield start
    for hub in hubs:
        hub.stop()
