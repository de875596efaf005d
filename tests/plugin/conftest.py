"""Fixtures for the plugin's tests: people with homes and nbgrader configs of their own, and a live service."""

from __future__ import annotations

import sys
from pathlib import Path

PLUGIN_DIR = Path(__file__).resolve().parents[2] / "plugin"
# The plugin is a distribution of its own; test the working tree's copy, installed or not.
if str(PLUGIN_DIR) not in sys.path:
    sys.path.insert(0, str(PLUGIN_DIR))
