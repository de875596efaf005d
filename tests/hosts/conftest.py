"""Fixtures for the several-hosts tests: the exchange's hosts as network namespaces, deleted after each test."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from service import BASE_URL, require, write_users
from topology import (
    API_PORT,
    LB_PORT,
    Services,
    Topology,
    address,
    haproxy_stats,
    missing_tools,
    start_balancer,
    start_exchange,
    start_services,
    store_flags,
)

CLIENT = Path(__file__).with_name("client.py")
COURSE, ASSIGNMENT = "phys101", "ps1"
APIS = ["api1", "api2"]
STUDENTS = [f"s{i:03d}" for i in range(200)]


@dataclass
class Cluster:
    """The hosts, the services' URLs, every user's token, and the balancer's stats socket."""

    topo: Topology
    services: Services
    tokens: dict[str, str]
    stats_socket: Path
    flags: list[str]

    @property
    def url(self) -> str:
        """The exchange's URL as clients on the lb host reach it (through HAProxy)."""
        return f"http://{address('lb')}:{LB_PORT}{BASE_URL}"

    def config(self, name: str, **settings: Any) -> Path:
        """A client's config file: where the exchange is, the course, the instructor's token, and ``settings``."""
        path = self.topo.folder / f"client-{name}.json"
        cfg = {"url": self.url, "course_id": COURSE, "assignment_id": ASSIGNMENT, **settings}
        cfg["instructor_token"] = self.tokens["ada"]
        path.write_text(json.dumps(cfg), encoding="utf-8")
        return path

    def client(self, command: str, **settings: Any) -> dict[str, Any]:
        """Run one client command on the lb host to its end; its JSON answer."""
        done = self.topo.run("lb", [sys.executable, str(CLIENT), command, str(self.config(command, **settings))])
        assert done.returncode == 0, done.stdout + done.stderr
        return dict(json.loads(done.stdout.splitlines()[-1]))

    def burst(self, students: list[str], concurrency: int) -> subprocess.Popen[bytes]:
        """Start the burst on the lb host; it prints ``ACK`` per acknowledged submission, then its JSON answer."""
        cfg = self.config("burst", students=[(s, self.tokens[s]) for s in students], concurrency=concurrency)
        return self.topo.spawn(
            "lb",
            [sys.executable, str(CLIENT), "burst", str(cfg)],
            self.topo.folder / "burst.log",
            stdout=subprocess.PIPE,
        )

    def nbexchange(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run an ``nbexchange`` command on the worker host, on the exchange's settings."""
        flags = [f"--NbExchange.db_url={self.services.db_url}", *self.flags]
        return self.topo.run("worker", [sys.executable, "-m", "nbexchange", *args, *flags], timeout=300)

    def events(self) -> list[dict[str, Any]]:
        """Every event of the log (``nbexchange export``)."""
        done = self.nbexchange("export")
        assert done.returncode == 0, done.stderr
        return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]

    def served(self) -> dict[str, int]:
        """How many requests HAProxy sent to each API host."""
        return {host: int(haproxy_stats(self.stats_socket)[host]["stot"]) for host in APIS}

    def status(self) -> dict[str, str]:
        """Each API host's state as HAProxy's health checks see it (``UP``, ``DOWN``…)."""
        return {host: haproxy_stats(self.stats_socket)[host]["status"] for host in APIS}

    def log_text(self) -> str:
        """What every process logged, for a failing test's report."""
        return "\n".join(
            f"== {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in sorted(self.topo.folder.glob("*.log"))
        )


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Two API hosts behind HAProxy, one worker host, and PostgreSQL, Redis and S3 on a services host."""
    why = missing_tools()
    if why:
        pytest.skip(why)
    require("haproxy", "apt-get install haproxy")
    topo = Topology(tmp_path / "hosts", ["services", "lb", *APIS, "worker"])
    try:
        topo.build()
        services = start_services(topo)
        users = {"ada": {COURSE: "Instructor"}, **{s: {COURSE: "Student"} for s in STUDENTS}}
        tokens = write_users(topo.folder / "users.yaml", users)
        # Archives on the services host's S3 server, reached over the virtual network like the database.
        flags = [*store_flags(services, topo.folder / "store"), f"--NbExchange.users_file={topo.folder / 'users.yaml'}"]
        start_exchange(topo, services, flags, APIS)
        sock = start_balancer(topo, APIS)
        cluster = Cluster(topo, services, tokens, sock, flags)
        # Each API host reaches the database and the broker (a broker refusing them would go unnoticed:
        # workers also follow the log by reading it).
        ready = cluster.client("ready", urls=[f"http://{address(h)}:{API_PORT}{BASE_URL}ready" for h in APIS])
        assert ready == {"statuses": [200] * len(APIS)}, ready
        yield cluster
    finally:
        topo.close()
