"""Several hosts: two API hosts behind HAProxy, a worker host and a services host, joined by a virtual network.

The services host runs PostgreSQL, Redis and an S3 server (moto's); every
other host reaches them over the virtual network only.

Each host is a network namespace (see ``topology.py``); traffic between them
crosses veth links and a bridge, as between machines. The clients run on the
balancer's host and see one URL.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import pytest
from conftest import APIS, ASSIGNMENT, COURSE, STUDENTS, Cluster

pytestmark = [pytest.mark.slow, pytest.mark.hosts, pytest.mark.timeout(600)]


def finish(proc: Any, cluster: Cluster, cut_after: int | None = None, cut: Any = None) -> tuple[dict[str, Any], int]:
    """Read the burst's ``ACK`` lines (calling ``cut`` after ``cut_after`` of them) to its JSON answer.

    Returns the answer and how many submissions were acknowledged before the cut.
    """
    acks, acked_before_cut = 0, 0
    for raw in proc.stdout:
        line = raw.decode().strip()
        if line == "ACK":
            acks += 1
            if cut is not None and acks == cut_after:
                cut()
                acked_before_cut = acks
            continue
        if line.startswith("{"):
            proc.wait(timeout=60)
            return json.loads(line), acked_before_cut
    proc.wait(timeout=60)
    raise AssertionError(f"the burst ended with {proc.returncode} and no answer:\n{cluster.log_text()}")


def check_log(cluster: Cluster, results: list[dict[str, Any]]) -> None:
    """Every acknowledged submission is in the log exactly once, at the position it was answered with,
    and in the instructor's ``collections`` exactly once; the log verifies."""
    acknowledged = [r for r in results if r["status"] in (200, 201)]
    submitted = [e for e in cluster.events() if e["type"] == "submitted"]
    by_student = Counter(e["payload"]["student_id"] for e in submitted)
    assert {r["student"]: by_student[r["student"]] for r in acknowledged} == {r["student"]: 1 for r in acknowledged}
    positions = {e["payload"]["student_id"]: e["position"] for e in submitted}
    assert {r["student"]: r["position"] for r in acknowledged} == {
        r["student"]: positions[r["student"]] for r in acknowledged
    }
    keys = {e["payload"]["student_id"]: e["idempotency_key"] for e in submitted}
    assert all(keys[r["student"]].endswith("/" + r["key"]) for r in acknowledged)

    listing = cluster.client("collections", min_position=max(positions.values()))["value"]
    listed = Counter(item["student_id"] for item in listing)
    assert listed == Counter({r["student"]: 1 for r in acknowledged})

    # The archives are on the services host's S3 server (verify reads them there), none in the shared folder.
    assert not (cluster.topo.folder / "store" / "archives").exists()
    verified = cluster.nbexchange("verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert json.loads(verified.stdout)["ok"] is True


def test_a_burst_through_the_balancer_loses_nothing(cluster: Cluster) -> None:
    cluster.client("release")
    before = cluster.served()
    answer, _ = finish(cluster.burst(STUDENTS, concurrency=16), cluster)
    results = answer["results"]

    failed = [r for r in results if r["status"] not in (200, 201) or r["fetch_status"] != 200]
    assert not failed, f"{failed[:5]}\n{cluster.log_text()}"
    check_log(cluster, results)
    after = cluster.served()
    served = {host: after[host] - before[host] for host in APIS}
    # Round robin over two healthy hosts: each took a real share of the 400 requests.
    assert all(count >= len(STUDENTS) // 2 for count in served.values()), served


def test_a_host_cut_off_mid_burst_loses_nothing_acknowledged(cluster: Cluster) -> None:
    cluster.client("release")
    proc = cluster.burst(STUDENTS, concurrency=16)
    answer, acked_before_cut = finish(proc, cluster, cut_after=len(STUDENTS) // 4, cut=lambda: cluster.topo.cut("api1"))
    results = answer["results"]

    assert acked_before_cut == len(STUDENTS) // 4, "the burst ended before api1 was cut off"
    # Every client succeeded in the end, those whose request api1 held retrying (same key) on api2.
    failed = [r for r in results if r["status"] not in (200, 201) or r["fetch_status"] != 200]
    assert not failed, f"{failed[:5]}\n{cluster.log_text()}"
    check_log(cluster, results)
    deadline = time.monotonic() + 10
    while cluster.status()["api1"] != "DOWN" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cluster.status() == {"api1": "DOWN", "api2": "UP"}
    retried = [r for r in results if r["attempts"] > 1]
    print(f"{len(retried)} submissions were retried; course {COURSE}, assignment {ASSIGNMENT}")
