"""The log's head on a route and in the metrics, and anchors appended outside the exchange."""

from __future__ import annotations

import json
import subprocess
import sys

import requests
from httpclient import get, ok, refused, release, submit, until

USERS = {"ada": {"phys101": "Instructor"}, "s1": {"phys101": "Student"}}


def test_the_service_publishes_its_head_and_anchors_it_where_verify_checks_it(exchange_service, tmp_path):
    anchors = tmp_path / "anchors.jsonl"
    svc = exchange_service(USERS, extra=["--NbExchange.anchor_interval=0.2", f"--NbExchange.anchor_file={anchors}"])
    empty = ok(get(svc, "head", None))
    assert (empty["position"], empty["hash"], empty["recorded_at"]) == (0, None, None)
    ok(release(svc, "ada", "ps1"), 201)
    position = ok(submit(svc, "s1", "ps1"), 201)["position"]

    head = until(lambda: (h := ok(get(svc, "head", None)))["position"] >= position and h, 20, svc.log_text)
    assert len(head["hash"]) == 64 and head["recorded_at"].endswith("+00:00")
    metrics = requests.get(svc.url + "metrics", timeout=30).text
    assert "nbexchange_log_head_position" in metrics and "nbexchange_log_head_info{" in metrics

    def anchored() -> list[dict]:
        lines = anchors.read_text().splitlines() if anchors.exists() else []
        return [json.loads(line) for line in lines]

    until(lambda: any(a["position"] >= position for a in anchored()), 20, svc.log_text)
    svc.stop()
    lines = anchored()
    assert [a["position"] for a in lines] == sorted({a["position"] for a in lines})  # each head once, in order
    assert any(a["hash"] == head["hash"] and a["position"] == head["position"] for a in lines) or (
        lines[-1]["position"] > head["position"]  # a worker's check came after
    )
    result = subprocess.run(
        [sys.executable, "-m", "nbexchange", "verify", f"--anchors={anchors}", *svc.flags],
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report["heads_checked"] == len(lines), report


def test_head_needs_a_user_when_the_metrics_do(exchange_service):
    svc = exchange_service(USERS, extra=["--NbExchange.metrics_require_auth=True"])
    refused(get(svc, "head", None), 401)
    assert ok(get(svc, "head", "s1"))["position"] == 0
