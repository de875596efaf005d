"""Process-wide tuning: the garbage collector's settings every long-running process starts with."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import gc, json
made_before = [object() for _ in range(3)]
from nbexchange.tuning import tune_gc
tune_gc()
print(json.dumps({"threshold": gc.get_threshold(), "frozen": gc.get_freeze_count(), "young": gc.get_count()[0]}))
"""


def test_tune_gc_freezes_what_exists_and_collects_the_young_generation_less_often():
    # In a process of its own: the settings are process-wide.
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    state = json.loads(out)
    assert state["threshold"] == [50_000, 10, 10]
    assert state["frozen"] > 1000  # the modules and objects made before the call
    assert state["young"] < 100  # collected just before freezing
