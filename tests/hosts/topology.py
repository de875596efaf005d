"""Several hosts on one machine: Linux network namespaces joined by a bridge, each running what a real host runs.

One namespace holds a bridge; every other one (``services``, ``lb``,
``api1``, ``api2``…, ``worker``) is a host with one veth link to it and an
address on a private subnet that exists only inside these namespaces. Nothing
is ever created in the machine's own namespace, and nothing listens there:

- ``services``: a PostgreSQL cluster of its own (``initdb`` in a temporary
  folder), ``redis-server`` (nothing persisted) and moto's S3 server (where
  asked: otherwise the hosts share a local store folder);
- ``apiN``: ``nbexchange`` (the API, no embedded worker) on the production settings;
- ``worker``: ``nbexchange worker``;
- ``lb``: HAProxy in front of the API hosts, health-checking each; the clients run here too.

Every name carries a prefix, this process's pid and a count, so parallel
runs never meet. :meth:`Topology.close` kills every process it started (by its own pid)
and deletes every namespace, whatever happened before. Needs root and ``ip``.
The namespaces share the machine's file system, so every host sees the same
folders: a local archive store is then shared as a network file system would
be; with S3 the archives are only on the services host's S3 server.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: The private subnet inside the namespaces (never routed anywhere else).
SUBNET = "10.213.0"
#: Each host's last address byte.
ADDRESSES = {"services": 2, "lb": 10, "worker": 20}
API_BYTE = 11  # api1 is .11, api2 .12, …
PG_PORT, REDIS_PORT, S3_PORT, API_PORT, LB_PORT = 5432, 6379, 5000, 9000, 8000
BASE_URL = "/services/nbexchange/"
AS_POSTGRES = ["setpriv", "--reuid=postgres", "--regid=postgres", "--clear-groups"]


def missing_tools() -> str:
    """Why this machine cannot build the topology (empty if it can): root and ``ip`` are needed."""
    if os.geteuid() != 0:
        return "several hosts need root (network namespaces)"
    if shutil.which("ip") is None:
        return "several hosts need the ip command (iproute2)"
    return ""


def address(host: str) -> str:
    """A host's address on the private link."""
    if host.startswith("api"):
        return f"{SUBNET}.{API_BYTE + int(host[3:]) - 1}"
    return f"{SUBNET}.{ADDRESSES[host]}"


#: Topologies made by this process: with its pid, each one's unique name prefix.
_BUILT = itertools.count()


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclass
class Topology:
    """Namespaces for ``hosts``, joined by one bridge; the processes started in them, stopped by :meth:`close`."""

    folder: Path
    hosts: list[str]
    prefix: str = field(default_factory=lambda: f"nbx{os.getpid()}-{next(_BUILT)}")
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    made: list[str] = field(default_factory=list)
    #: What to undo once the processes have stopped (temporary folders), last first.
    cleanup: list[Callable[[], None]] = field(default_factory=list)

    def ns(self, host: str) -> str:
        """The namespace of ``host``."""
        return f"{self.prefix}-{host}"

    def build(self) -> None:
        """Make the namespaces, the bridge and one link per host, each with its address; loopback up everywhere."""
        self.folder.mkdir(parents=True, exist_ok=True)
        bridge = self.ns("net")
        for ns in [bridge, *map(self.ns, self.hosts)]:
            _ip("netns", "add", ns)
            self.made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", bridge, "link", "add", "br0", "type", "bridge")
        _ip("-n", bridge, "link", "set", "br0", "up")
        for host in self.hosts:
            # Both ends are made inside the namespaces: no name ever appears in the machine's own.
            _ip(
                "-n", bridge, "link", "add", self.link(host), *f"type veth peer name eth0 netns {self.ns(host)}".split()
            )
            _ip("-n", bridge, "link", "set", self.link(host), "master", "br0", "up")
            _ip("-n", self.ns(host), "addr", "add", f"{address(host)}/24", "dev", "eth0")
            _ip("-n", self.ns(host), "link", "set", "eth0", "up")

    @staticmethod
    def link(host: str) -> str:
        """The bridge's end of ``host``'s link (in the bridge's namespace)."""
        return f"v-{host}"

    def cut(self, host: str) -> None:
        """Take ``host``'s link down: it can reach nobody, nobody can reach it; its processes keep running."""
        _ip("-n", self.ns("net"), "link", "set", self.link(host), "down")

    def command(self, host: str, args: list[str], user: str = "") -> list[str]:
        """``args`` run inside ``host``'s namespace (as ``user``, if given); ``ip netns exec`` execs: same pid."""
        as_user = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"] if user else []
        return ["ip", "netns", "exec", self.ns(host), *as_user, *args]

    def spawn(
        self, host: str, args: list[str], log: Path, user: str = "", env: dict[str, str] | None = None, **kwargs: Any
    ) -> subprocess.Popen[bytes]:
        """Start ``args`` on ``host``, logging to ``log``; :meth:`close` stops it."""
        out = open(log, "ab")  # noqa: SIM115 - handed to the child for its lifetime
        kwargs.setdefault("stdout", out)
        proc = subprocess.Popen(self.command(host, args, user), stderr=out, env=env or clean_env(), **kwargs)
        out.close()
        self.procs.append(proc)
        return proc

    def run(
        self, host: str, args: list[str], timeout: float = 120, env: dict[str, str] | None = None, user: str = ""
    ) -> subprocess.CompletedProcess[str]:
        """Run ``args`` on ``host`` to its end."""
        return subprocess.run(
            self.command(host, args, user), capture_output=True, text=True, timeout=timeout, env=env or clean_env()
        )

    def wait_port(self, host: str, port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
        """Wait until something listens on ``host``'s ``port`` (asked from inside ``host``); fail if ``proc`` died."""
        probe = f"import socket; socket.create_connection(({address(host)!r}, {port}), timeout=1).close()"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
            if self.run(host, [sys.executable, "-c", probe], timeout=10).returncode == 0:
                return
            time.sleep(0.3)
        raise RuntimeError(f"nothing listened on {host}:{port} within {timeout} s")

    def close(self) -> None:
        """Stop every process started here (SIGTERM, then SIGKILL) and delete every namespace."""
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.procs.clear()
        for ns in reversed(self.made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self.made.clear()
        while self.cleanup:
            self.cleanup.pop()()


#: moto accepts any credentials; the AWS SDK only needs some to sign with.
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
S3_BUCKET = "nbexchange"


def clean_env() -> dict[str, str]:
    """This process's environment without the JupyterHub and nbexchange settings nobody chose here.

    With the S3 credentials moto's server takes: the only S3 server any host here talks to.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTERHUB_", "NBEX_", "AWS_"))}
    env["PYTHONUNBUFFERED"] = "1"
    return {**env, **S3_CREDENTIALS}


# -- the services host ---------------------------------------------------------------------


@dataclass
class Services:
    """PostgreSQL, Redis (and S3) on the services host, as URLs the other hosts use."""

    db_url: str
    broker_url: str
    s3_url: str = ""


def start_services(topo: Topology, s3: bool = True) -> Services:
    """Start PostgreSQL (a fresh cluster, trust for the private subnet only), Redis and, if asked, moto's S3 server."""
    host = address("services")
    pg = Path(tempfile.mkdtemp(prefix="nbex-hosts-pg-"))
    topo.cleanup.append(lambda: shutil.rmtree(pg, ignore_errors=True))
    shutil.chown(pg, "postgres", "postgres")  # PostgreSQL refuses to run as root
    initdb = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))), None)
    postgres = initdb.parent / "postgres" if initdb else None
    if initdb is None or postgres is None:
        raise RuntimeError("PostgreSQL's initdb is not installed under /usr/lib/postgresql")
    done = subprocess.run(
        [
            *AS_POSTGRES,
            str(initdb),
            "-D",
            str(pg / "data"),
            *["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"],
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=pg,
    )
    if done.returncode != 0:
        raise RuntimeError(f"initdb failed: {done.stderr}")
    with open(pg / "data" / "pg_hba.conf", "a", encoding="utf-8") as hba:
        hba.write(f"host all all {SUBNET}.0/24 trust\n")
    settings = {
        "listen_addresses": host,
        "port": str(PG_PORT),
        "unix_socket_directories": str(pg),
        "fsync": "off",
        "full_page_writes": "off",
        "max_connections": "300",
    }
    args = [str(postgres), "-D", str(pg / "data"), *[a for k, v in settings.items() for a in ("-c", f"{k}={v}")]]
    proc = topo.spawn("services", args, topo.folder / "postgres.log", user="postgres", cwd=pg)
    topo.wait_port("services", PG_PORT, proc)
    proc = topo.spawn(
        "services",
        # Nothing persisted; protected mode off: it answers the other hosts, on a link only they share.
        ["redis-server", "--bind", host, "--port", str(REDIS_PORT), "--protected-mode", "no", "--save", ""]
        + ["--appendonly", "no", "--dir", str(topo.folder)],
        topo.folder / "redis.log",
    )
    topo.wait_port("services", REDIS_PORT, proc)
    s3_url = ""
    if s3:
        proc = topo.spawn(
            "services", [sys.executable, "-m", "moto.server", "-H", host, "-p", str(S3_PORT)], topo.folder / "s3.log"
        )
        topo.wait_port("services", S3_PORT, proc)
        s3_url = f"http://{host}:{S3_PORT}"
        # The bucket is made once, as an operator would, before any host starts.
        make = f"import boto3; boto3.client('s3', endpoint_url={s3_url!r}).create_bucket(Bucket={S3_BUCKET!r})"
        done = topo.run("services", [sys.executable, "-c", make])
        if done.returncode != 0:
            raise RuntimeError(f"the bucket was not made: {done.stderr}")
    return Services(
        f"postgresql+psycopg://postgres@{host}:{PG_PORT}/postgres", f"redis://{host}:{REDIS_PORT}/0", s3_url
    )


# -- the exchange's hosts ------------------------------------------------------------------


def store_flags(services: Services, folder: Path) -> list[str]:
    """Where every host keeps archives: the services host's S3 server if it runs one, else ``folder``.

    ``folder`` is also the store's working folder (uploads in progress) on
    each host; the namespaces share it, which real hosts need not do with S3.
    """
    flags = [f"--NbExchange.base_storage_location={folder}"]
    if services.s3_url:
        flags += [
            "--NbExchange.blob_store=s3",
            f"--NbExchange.s3_endpoint_url={services.s3_url}",
            f"--NbExchange.s3_bucket={S3_BUCKET}",
            "--NbExchange.s3_prefix=exchange/",
            "--NbExchange.s3_addressing_style=path",
        ]
    return flags


def start_exchange(topo: Topology, services: Services, flags: list[str], apis: list[str]) -> None:
    """Migrate once, then start ``nbexchange`` on each API host and ``nbexchange worker`` on the worker host."""
    common = [f"--NbExchange.db_url={services.db_url}", f"--NbExchange.broker_url={services.broker_url}", *flags]
    done = topo.run("worker", [sys.executable, "-m", "nbexchange", "upgrade-db", *common])
    if done.returncode != 0:
        raise RuntimeError(f"upgrade-db failed: {done.stdout}{done.stderr}")
    common.append("--NbExchange.upgrade_db=False")
    for host in apis:
        proc = topo.spawn(
            host,
            [sys.executable, "-m", "nbexchange", f"--ip={address(host)}", f"--port={API_PORT}", *common],
            topo.folder / f"{host}.log",
        )
        topo.wait_port(host, API_PORT, proc)
    topo.spawn("worker", [sys.executable, "-m", "nbexchange", "worker", *common], topo.folder / "worker.log")


def haproxy_config(apis: list[str], stats_socket: Path, server_timeout: float) -> str:
    """HAProxy in front of ``apis``: round robin, health checks on ``health``, retries elsewhere on a failed connect."""
    servers = "\n".join(
        f"    server {host} {address(host)}:{API_PORT} check inter 300ms fall 2 rise 2" for host in apis
    )
    return f"""\
global
    maxconn 2000
    stats socket {stats_socket} mode 600 level admin

defaults
    mode http
    timeout connect 1s
    timeout client 120s
    timeout server {round(server_timeout * 1000)}ms
    timeout queue 60s
    # A connection that fails (a host cut off) is tried again, on another host.
    retries 3
    option redispatch 1

frontend exchange
    bind {address("lb")}:{LB_PORT}
    bind 127.0.0.1:{LB_PORT}
    default_backend apis

backend apis
    balance roundrobin
    option httpchk GET {BASE_URL}health
    http-check expect status 200
{servers}
"""


def start_balancer(topo: Topology, apis: list[str], server_timeout: float = 15.0) -> Path:
    """Start HAProxy on the lb host (a config file of its own); returns its stats socket's path."""
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        raise RuntimeError("haproxy is not installed")
    sock = topo.folder / "haproxy.sock"
    cfg = topo.folder / "haproxy.cfg"
    cfg.write_text(haproxy_config(apis, sock, server_timeout), encoding="utf-8")
    proc = topo.spawn("lb", [haproxy, "-db", "-f", str(cfg)], topo.folder / "haproxy.log")
    topo.wait_port("lb", LB_PORT, proc)
    return sock


def haproxy_stats(sock: Path) -> dict[str, dict[str, str]]:
    """``show stat`` from HAProxy's socket: each backend server's counters, by name."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(sock))
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    lines = data.decode().splitlines()
    header = lines[0].lstrip("# ").split(",")
    rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
    return {row["svname"]: row for row in rows if row.get("pxname") == "apis"}
