"""Deadline night: N students fetch and submit at once; how fast, how late, how much, against a bare baseline.

Usage (see ``bench/README.md``, section "Deadline night")::

    python bench/deadline.py                                  # N=2000, S=1 MB, C=64: baseline, embedded, production
    python bench/deadline.py --students 500 --size 256KB --modes embedded
    python bench/deadline.py --students 1000 --size 256KB --modes production,production-amqp   # Redis vs RabbitMQ
    python bench/deadline.py --scenario bigupload             # 2 GB upload: server RSS; oversized one: 413 unread
    python bench/deadline.py --scenario list                  # 10,000 submissions listed: collections latency
    python bench/deadline.py --students 10000 --until-idle --pin --profile cpu --plot bench/images/burst.png
    python bench/deadline.py --students 1000 --size 256KB --modes embedded --blob-stores local,s3
                                                              # the same burst, archives on disk vs in S3 (moto)

Not part of the test suite. Each mode starts its own servers in a fresh
folder (and, in production modes, a fresh PostgreSQL schema and a queue on
Redis, or on RabbitMQ in ``production-amqp``),
runs the load generator (``bench/loadgen.py``) as its own process, reads the
servers' /proc, stops everything it started, and prints a Markdown table.
Raw results go to ``bench/results/`` (git-ignored). Only 127.0.0.1 is used.
With ``--blob-stores s3`` a mode also runs with its archives in an S3
store: moto's S3 server (from the test extra), started for that mode on
loopback and measured as one of its processes (mode ``embedded+s3``…).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from cost import (
    LOADGEN,
    PG_BACKENDS_OF,
    PG_BACKGROUND,
    PG_OTHERS,
    PG_OURS,
    PY_SPY,
    REDIS,
    LogProbe,
    Watch,
    is_baseline,
    phase_cost,
    plot,
    settled,
    timeline,
    wait_until_idle,
)
from harness import (
    BASE_URL,
    BENCH,
    Servers,
    cpu_by_pid,
    descendants,
    free_port,
    fsync_probe,
    machine,
    machine_busy_seconds,
    pct,
    pids_named,
    reset_peak,
    sample,
    spawn,
    stop,
    stop_all,
    wait_http,
    write_users,
)
from http11 import multipart
from payloads import archive, notebook
from stages import ACCEPT, COMMIT, DISPATCH, PROBES, breakdown

COURSE, ASSIGNMENT = "phys101", "ps1"
PG_URL = os.environ.get("NBEX_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("NBEX_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("NBEX_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
#: The production modes, and the broker each runs on.
BROKERS = {"production": REDIS_URL, "production-amqp": AMQP_URL}
RESULTS = BENCH / "results"
#: PostgreSQL's and the brokers' processes: shared with whoever else uses them on this machine.
SHARED = "postgres+broker (shared)"
#: Every core's busy time, whoever used it.
MACHINE = "machine (all processes)"
#: Production mode's check_defer_max (the embedded default is the same, 20 s: nbexchange/app.py).
CHECK_DEFER_MAX = 20


def size_arg(text: str) -> int:
    """``1MB``, ``256KB``, ``2GB`` (powers of 1024) or a number of bytes."""
    units = {"KB": 1024, "MB": 1024**2, "GB": 1024**3, "K": 1024, "M": 1024**2, "G": 1024**3, "B": 1}
    text = text.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda u: -len(u[0])):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--scenario", choices=("deadline", "bigupload", "list"), default="deadline")
    p.add_argument(
        "--modes",
        default="embedded,production",
        help="embedded, production (Redis), production-amqp (RabbitMQ); comma-separated",
    )
    p.add_argument(
        "--blob-stores",
        default="local",
        help="local, s3 (comma-separated): each mode runs on each archive store; s3 starts moto's S3 server",
    )
    p.add_argument("--students", type=int, default=2000, help="N: students who fetch and submit")
    p.add_argument("--size", type=size_arg, default=1024**2, help="S: bytes per submitted archive (e.g. 1MB)")
    p.add_argument("--concurrency", type=int, default=64, help="C: the load generator's connections")
    p.add_argument("--window", type=float, default=5.0, help="seconds over which arrivals come, bunched at the end")
    p.add_argument(
        "--api-processes",
        type=int,
        default=None,
        help="production mode: API processes (SO_REUSEPORT); default one per core the servers may use, as "
        "docs/operations.md sizes them (2 on this machine, 1 with --pin)",
    )
    p.add_argument("--workers", type=int, default=1, help="production mode: `nbexchange worker` processes")
    p.add_argument("--worker-concurrency", type=int, default=2, help="threads per worker (both modes)")
    p.add_argument("--no-baseline", action="store_true", help="skip the bare-tornado baseline (ratios need it)")
    p.add_argument("--storage", type=Path, default=None, help="where the servers keep files (default: under /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the storage folders and logs")
    p.add_argument("--lag-timeout", type=float, default=120.0, help="longest wait for projections after the uploads")
    p.add_argument("--big-size", type=size_arg, default=2 * 1024**3, help="bigupload: bytes of the big upload")
    p.add_argument("--list-submissions", type=int, default=10_000, help="list: submissions to seed")
    p.add_argument("--list-size", type=size_arg, default=4096, help="list: bytes per seeded archive")
    p.add_argument(
        "--list-requests",
        type=int,
        default=1000,
        help="list: timed collections GETs (the p99 of 100 would be their slowest; earlier passes used 100)",
    )
    p.add_argument("--extra", action="append", default=[], help="one more flag for every nbexchange process")
    p.add_argument(
        "--fsync-delay",
        type=float,
        default=0.0,
        metavar="MS",
        help="a slow disk: every fsync and fdatasync of the servers under test (baseline included) returns MS "
        "milliseconds later (strace fault injection); PostgreSQL, shared, is not slowed",
    )
    p.add_argument("--label", default="", help="a word for the results file name (e.g. tmpfs)")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=180.0,
        help="before each mode, wait up to this many seconds for the shared machine to be idle (< 0.3 cores busy "
        "for 3 s); 0: don't wait",
    )
    p.add_argument(
        "--profile",
        choices=("", "cpu", "gil", "all", "native"),
        default="",
        help="record each server process with py-spy during the uploads (with --until-idle: until idle; "
        "collapsed stacks in bench/results/): cpu = on-CPU samples, gil = only the thread holding the GIL, "
        "all = idle threads too, native = on-CPU samples with C frames (pauses the process at each sample: on this "
        "2-core machine it fell minutes behind and slowed the server sevenfold; see bench/README.md)",
    )
    p.add_argument(
        "--until-idle",
        action="store_true",
        help="deadline: after the last accept, watch until every archive has its check outcome, the projections "
        "and the sweep reached the log's head and the servers' CPU is quiet; report CPU per accepted submission "
        "by phase and process, a per-second timeline, and (with --profile) a breakdown by stage",
    )
    p.add_argument(
        "--no-keys",
        action="store_true",
        help="deadline: send no Idempotency-Key with the fetches and submissions (nbgrader's plugin sends one with "
        "each; the passes before the eleventh measured without)",
    )
    p.add_argument("--idle-timeout", type=float, default=1800.0, help="--until-idle: the longest wait for idle")
    p.add_argument(
        "--pin",
        action="store_true",
        help="the load generator (and this script, and py-spy) on the last core, the servers on the others "
        "(taskset); the shared PostgreSQL and Redis are not pinned",
    )
    p.add_argument("--plot", type=Path, default=None, help="--until-idle: write the timeline's plot (PNG) here")
    p.add_argument(
        "--count-statements",
        action="store_true",
        help="deadline: count the SQL statements each nbexchange process sends (bench/statements/sitecustomize.py "
        "wraps psycopg's cursor), per accepted submission, by statement and by the code that sent it",
    )
    args = p.parse_args(argv)
    args.server_cpus = None
    args.modes = [m for m in args.modes.split(",") if m]
    if args.fsync_delay and args.profile:
        p.error("--profile and --fsync-delay cannot be combined: py-spy cannot attach to a process strace traces")
    for mode in args.modes:
        if mode != "embedded" and mode not in BROKERS:
            p.error(f"unknown mode {mode!r}")
    if args.plot and not args.until_idle:
        p.error("--plot needs --until-idle (the timeline is made there)")
    if args.profile and shutil.which("py-spy") is None:
        p.error("--profile needs py-spy on the PATH (pip install py-spy); found none")
    args.blob_stores = [b for b in args.blob_stores.split(",") if b]
    for store in args.blob_stores:
        if store not in ("local", "s3"):
            p.error(f"unknown blob store {store!r}")
    # ``embedded+s3``: the mode with its archives in the S3 store.
    args.modes = [mode if store == "local" else f"{mode}+{store}" for mode in args.modes for store in args.blob_stores]
    return args


# -- talking to a service (setup only; the load itself is the load generator's) -------


def call(
    port: int,
    method: str,
    route: str,
    token: str,
    params: dict[str, str],
    body: list[bytes] | None = None,
    content_type: str = "",
) -> tuple[int, dict[str, Any]]:
    url = f"http://127.0.0.1:{port}{BASE_URL}{route}?{urlencode(params)}"
    data = b"".join(body) if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Authorization": f"token {token}"})
    if content_type:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def release(port: int, token: str) -> int:
    """Release the assignment and wait until students can see it; returns its position."""
    content_type, body = multipart("assignment", "release.tar.gz", release_archive(), {"notebooks": ["nb1"]})
    status, answer = call(
        port, "POST", "assignment", token, {"course_id": COURSE, "assignment_id": ASSIGNMENT}, body, content_type
    )
    if status not in (200, 201):
        raise RuntimeError(f"release failed: {status} {answer}")
    position = int(answer["position"])
    status, answer = call(port, "GET", "assignments", token, {"course_id": COURSE, "min_position": str(position)})
    if status != 200:
        raise RuntimeError(f"the release did not become visible: {status} {answer}")
    return position


def release_archive() -> bytes:
    return archive([("nb1.ipynb", notebook("release"))])


def read_position(port: int, token: str) -> int:
    status, answer = call(
        port,
        "GET",
        "collections",
        token,
        {"course_id": COURSE, "assignment_id": ASSIGNMENT, "user_id": "bench-position-probe"},
    )
    if status != 200:
        raise RuntimeError(f"collections answered {status}: {answer}")
    return int(answer["position"])


def wait_quiet(port: int, token: str, at_least: int, timeout: float, steady: float = 3.0) -> float:
    """Wait until the read position is at least ``at_least`` and has not moved for ``steady`` s."""
    started = time.monotonic()
    last, since = -1, time.monotonic()
    while time.monotonic() - started < timeout:
        position = read_position(port, token)
        if position != last:
            last, since = position, time.monotonic()
        elif position >= at_least and time.monotonic() - since >= steady:
            return time.monotonic() - started
        time.sleep(0.2)
    raise RuntimeError(f"the exchange did not settle within {timeout} s (position {last}, wanted {at_least})")


def wait_checked(port: int, token: str, timeout: float) -> float:
    """Wait until every listed submission's archive is checked (unpacked or rejected); seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        status, answer = call(port, "GET", "collections", token, {"course_id": COURSE, "assignment_id": ASSIGNMENT})
        items = answer.get("value", []) if status == 200 else []
        if items and all(item["archive"]["state"] != "pending" for item in items):
            return time.monotonic() - started
        time.sleep(0.5)
    raise RuntimeError(f"the archives were not checked within {timeout} s")


# -- starting the servers under test ---------------------------------------------------------


def start_baseline(root: Path, args: argparse.Namespace) -> Servers:
    port = free_port()
    (root / "release.tar.gz").write_bytes(release_archive())
    servers = Servers("baseline", port)
    servers.procs["baseline"] = spawn(
        [
            sys.executable,
            str(BENCH / "baseline.py"),
            f"--port={port}",
            f"--folder={root / 'uploads'}",
            f"--fetch-file={root / 'release.tar.gz'}",
        ],
        root / "baseline.log",
        fsync_delay_ms=args.fsync_delay,
        cpus=args.server_cpus,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}{BASE_URL}health", list(servers.procs.values()))
    except BaseException:
        servers.stop()
        raise
    return servers


def start_s3(root: Path, servers: Servers) -> list[str]:
    """moto's S3 server on a free loopback port, as one of ``servers``; the flags that keep archives there."""
    port = free_port()
    # moto takes any credentials; the AWS SDK in the servers under test only needs some to sign with.
    os.environ.update(
        {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    )
    servers.procs["s3 (moto)"] = spawn(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], root / "s3.log"
    )
    wait_http(f"http://127.0.0.1:{port}/moto-api/", [servers.procs["s3 (moto)"]])
    return [
        "--NbExchange.blob_store=s3",
        f"--NbExchange.s3_endpoint_url=http://127.0.0.1:{port}",
        "--NbExchange.s3_bucket=bench",
        "--NbExchange.s3_create_bucket=True",
    ]


def start_exchange(mode: str, root: Path, users: Path, args: argparse.Namespace) -> Servers:
    """Embedded: one process (SQLite, in-process broker and worker); production: PostgreSQL, Redis, APIs, workers.

    ``…+s3``: the archives in an S3 store (moto's server, started here and counted as one of the mode's processes).
    """
    port = free_port()
    servers = Servers(mode, port)
    mode, _, blob_store = mode.partition("+")
    flags = [
        f"--NbExchange.base_storage_location={root / 'store'}",
        f"--NbExchange.users_file={users}",
        f"--NbExchange.worker_concurrency={args.worker_concurrency}",
        *args.extra,
    ]
    try:
        if blob_store == "s3":
            flags += start_s3(root, servers)
        if mode == "embedded":
            servers.db_url = f"sqlite:///{root / 'store' / 'nbexchange.sqlite'}"
            flags.append(f"--NbExchange.db_url={servers.db_url}")
            api = spawn(
                _nbexchange("--ip=127.0.0.1", f"--port={port}", *flags),
                root / "api-0.log",
                args.fsync_delay,
                args.server_cpus,
            )
            servers.procs["api-0"] = api
            wait_http(f"http://127.0.0.1:{port}{BASE_URL}health", [api])
            return servers
        schema = f"bench_{uuid.uuid4().hex[:10]}"
        _sql(f"CREATE SCHEMA {schema}")
        servers.cleanup.append(lambda: _sql(f"DROP SCHEMA {schema} CASCADE"))
        queue = f"nbx-bench-{uuid.uuid4().hex[:8]}"
        broker = BROKERS[mode]
        servers.cleanup.append(lambda: _forget_queue(broker, queue))
        # The application_name tells our PostgreSQL backends from everyone else's, and each process's
        # from the others' ("<queue>.api-0"): CPU by process, and by whose statements a backend ran.
        servers.app_name = queue
        servers.db_url = f"{PG_URL}?options=-csearch_path%3D{schema}"

        def db_flag(role: str) -> str:
            return f"--NbExchange.db_url={servers.db_url}&application_name={queue}.{role}"

        flags += [
            # The workers share this machine's cores with the APIs, as in docker-compose.yml.
            f"--NbExchange.check_defer_max={CHECK_DEFER_MAX}",
            f"--NbExchange.broker_url={broker}",
            f"--NbExchange.queue_name={queue}",
        ]
        for i in range(args.api_processes):
            # Only the first process migrates, so two never race to create the schema.
            migrate = [] if i == 0 else ["--NbExchange.upgrade_db=False"]
            proc = spawn(
                _nbexchange(
                    "--ip=127.0.0.1",
                    f"--port={port}",
                    "--NbExchange.reuse_port=True",
                    *migrate,
                    *flags,
                    db_flag(f"api-{i}"),
                ),
                root / f"api-{i}.log",
                args.fsync_delay,
                args.server_cpus,
            )
            servers.procs[f"api-{i}"] = proc
            # Every API process listens before the load generator opens its keep-alive connections: one that
            # binds later gets none of them (SO_REUSEPORT spreads only new connections) and sits idle.
            _wait_log(root / f"api-{i}.log", "nbexchange listening on", proc)
        for i in range(args.workers):
            log = root / f"worker-{i}.log"
            servers.procs[f"worker-{i}"] = spawn(
                _nbexchange("worker", "--NbExchange.upgrade_db=False", *flags, db_flag(f"worker-{i}")),
                log,
                args.fsync_delay,
                args.server_cpus,
            )
            _wait_log(log, " ready", servers.procs[f"worker-{i}"])
        wait_http(f"http://127.0.0.1:{port}{BASE_URL}health", list(servers.procs.values()))
        return servers
    except BaseException:
        servers.stop()
        raise


def _nbexchange(*args: str) -> list[str]:
    return [sys.executable, "-m", "nbexchange", *args]


def _wait_log(log: Path, text: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}; see {log}")
        if log.exists() and text in log.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{log} did not say {text!r} within {timeout} s")


def _sql(statement: str) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(statement)
    finally:
        engine.dispose()


def _forget_queue(broker: str, queue: str) -> None:
    if broker.startswith("amqp"):
        from kombu import Connection

        with Connection(broker) as conn:
            conn.default_channel.queue_delete(queue)
            conn.default_channel.exchange_delete(queue)
        return
    import redis

    client = redis.Redis.from_url(broker)
    keys = [k for k in client.scan_iter(match=f"*{queue}*", count=1000)]
    if keys:
        client.delete(*keys)
    client.close()


def target(scenario: str, port: int, **settings: Any) -> dict[str, Any]:
    """A load generator's config: the scenario, where the exchange is, and the scenario's settings."""
    return {
        "scenario": scenario,
        "port": port,
        "base_url": BASE_URL,
        "course_id": COURSE,
        "assignment_id": ASSIGNMENT,
        **settings,
    }


# -- running the load generator -------------------------------------------------------------


class LoadGen:
    """The load generator process, and the /proc samples taken at each of its steps."""

    def __init__(
        self,
        cfg: dict[str, Any],
        root: Path,
        servers: Servers | None,
        profile: str = "",
        label: str = "",
        watch: Watch | None = None,
    ) -> None:
        self.root = root
        self.servers = servers
        self.profile = profile
        self.label = label
        #: With a watch (``--until-idle``), phases are marked on it and the profilers run until :meth:`idle`.
        self.watch = watch
        self.profilers: list[subprocess.Popen[bytes]] = []
        self.profiles: dict[str, Path] = {}
        cfg_path = root / f"loadgen-{cfg['scenario']}.json"
        cfg["output"] = str(root / f"loadgen-{cfg['scenario']}-out.json")
        cfg_path.write_text(json.dumps(cfg))
        self.output = Path(cfg["output"])
        self.proc = spawn(
            [sys.executable, str(BENCH / "loadgen.py"), str(cfg_path)],
            root / "loadgen.log",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.samples: dict[str, dict[str, Any]] = {}
        self.times: dict[str, float] = {}

    def expect(self, word: str, timeout: float) -> None:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], min(1.0, max(0.0, deadline - time.monotonic())))
            if ready:
                raw = self.proc.stdout.readline()
                if not raw:
                    # The end of its output: it has exited (reading on would return nothing, at once, for ever).
                    self.proc.wait(timeout=10)
                    raise RuntimeError(
                        f"the load generator exited with {self.proc.returncode}; see {self.root}/loadgen.log"
                    )
                line = raw.decode().strip()
                if line == word:
                    self.times[word] = time.monotonic()
                    self.samples[word] = self.snapshot()
                    if self.watch is not None:
                        self.watch.mark(word)
                    elif word == "UPLOADS_DONE":
                        self.stop_profilers()
                    return
        raise RuntimeError(f"the load generator did not say {word} within {timeout} s")

    def go(self) -> None:
        if self.profile and self.servers:
            self.start_profilers()
        self.samples["GO"] = self.snapshot()
        self.times["GO"] = time.monotonic()
        if self.watch is not None:
            self.watch.mark("GO")
        self.tell("GO")

    def tell(self, word: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{word}\n".encode())
        self.proc.stdin.flush()

    def idle(self) -> None:
        """The exchange is idle again: mark it, stop the profilers, let the load generator list."""
        self.times["IDLE"] = time.monotonic()
        if self.watch is not None:
            self.watch.mark("IDLE")
        self.stop_profilers()
        self.tell("LIST")

    def start_profilers(self) -> None:
        assert self.servers is not None
        mode = {"cpu": [], "gil": ["--gil"], "all": ["--idle"], "native": ["--native"]}[self.profile]
        # Native stacks need the process paused while they are read.
        blocking = [] if self.profile == "native" else ["--nonblocking"]
        for role, pid in self.servers.pids().items():
            out = RESULTS / f"profile-{self.label}-{role}-{self.profile}.txt"
            self.profiles[role] = out
            self.profilers.append(
                spawn(
                    [
                        "py-spy",
                        "record",
                        *blocking,
                        "--format",
                        "raw",
                        "--full-filenames",
                        "--rate",
                        "100",
                        *mode,
                        "-o",
                        str(out),
                        "--pid",
                        str(pid),
                    ],
                    self.root / f"py-spy-{role}.log",
                )
            )

    def stop_profilers(self) -> None:
        for proc in self.profilers:
            proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        for proc in self.profilers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=60)
        stop(self.profilers)
        self.profilers = []

    def snapshot(self) -> dict[str, Any]:
        pids = dict(self.servers.pids()) if self.servers else {}
        pids["loadgen"] = self.proc.pid
        out: dict[str, Any] = {}
        for role, pid in pids.items():
            try:
                out[role] = sample(pid).__dict__
            except OSError:
                out[role] = None
        if self.servers and self.servers.name in BROKERS:
            shared = pids_named("postgres") + pids_named("redis-server") + pids_named("beam.smp")
            out[SHARED] = {"per_pid": cpu_by_pid(shared)}
        out[MACHINE] = {"cpu_seconds": machine_busy_seconds()}
        return out

    def result(self, timeout: float) -> dict[str, Any]:
        self.expect("DONE", timeout)
        self.proc.wait(timeout=30)
        return dict(json.loads(self.output.read_text()))


def cpu_between(samples: dict[str, dict[str, Any]], start: str, end: str, seconds: float) -> dict[str, Any]:
    """Per process: CPU seconds used between two samples, as a share of one core."""
    out = {}
    ours = 0.0
    for role, first in samples[start].items():
        last = samples[end].get(role)
        if not first or not last:
            continue
        if "per_pid" in first:
            used = sum(last["per_pid"][pid] - cpu for pid, cpu in first["per_pid"].items() if pid in last["per_pid"])
        else:
            used = last["cpu_seconds"] - first["cpu_seconds"]
        if role != MACHINE:
            ours += used
        out[role] = {"cpu_seconds": round(used, 2), "cores": round(used / seconds, 2) if seconds else None}
    if MACHINE in out:
        # What the rest of this shared machine took meanwhile: the noise behind our figures.
        others = out[MACHINE]["cpu_seconds"] - ours
        out["everyone else"] = {"cpu_seconds": round(others, 2), "cores": round(others / seconds, 2)}
    return out


def peaks(samples: dict[str, Any]) -> dict[str, float]:
    return {role: round(s["hwm_kb"] / 1024, 1) for role, s in samples.items() if s and "hwm_kb" in s}


# -- the deadline scenario --------------------------------------------------------------------


def run_deadline_mode(mode: str, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    root.mkdir(parents=True)
    instructor, students = write_users(root / "users.yaml", args.students, COURSE)
    counting = args.count_statements and mode != "baseline"
    if counting:
        count_statements_in(root / "statements")
    if mode == "baseline":
        servers = start_baseline(root, args)
    else:
        servers = start_exchange(mode, root, root / "users.yaml", args)
    statements: dict[str, dict[str, int]] = {}
    try:
        if mode != "baseline":
            release(servers.port, instructor)
        cfg = target(
            "deadline",
            servers.port,
            students=students,
            size=args.size,
            concurrency=args.concurrency,
            window=args.window,
            instructor_token=None if mode == "baseline" else instructor,
            lag_timeout=args.lag_timeout,
            until_idle=args.until_idle,
            idle_timeout=args.idle_timeout,
            idempotency_keys=not args.no_keys,
        )
        watch = probe = None
        if args.until_idle:
            probe = LogProbe(servers.db_url) if servers.db_url else None
            watch = Watch(lambda: process_groups(servers, gen, probe), probe)
        gen = LoadGen(cfg, root, servers, args.profile, f"{args.label or 'deadline'}-{mode}", watch)
        gen.expect("READY", 600)
        connections = connections_by_process(servers)
        if any(count == 0 for count in connections.values()):
            print(f"warning: a server process holds none of the load generator's connections: {connections}")
        if watch is not None:
            watch.start()
        gen.go()
        gen.expect("UPLOADS_DONE", 300 + args.students * max(1, args.size // 1024**2))
        if watch is not None:
            quiet = wait_until_idle(
                watch, counted_groups(servers), settled if probe else lambda log: True, args.idle_timeout
            )
            gen.idle()
        raw = gen.result(args.lag_timeout + 300)
        samples = gen.samples
        if counting:
            statements = statements_by_process(root / "statements", servers)
    finally:
        if counting:
            count_statements_in(None)
        if watch is not None:
            watch.stop()
        if probe is not None:
            probe.close()
        servers.stop()
    summary = summarize_deadline(mode, raw, args.concurrency)
    summary["connections"] = connections
    if counting:
        summary["statements"] = statements_summary(statements, summary["accepted"])
    if watch is not None:
        summary.update(whole_cost(summary, raw, watch, counted_groups(servers), quiet, gen))
    accept_seconds = gen.times["UPLOADS_DONE"] - gen.times["GO"]
    summary["cpu_accept_phase"] = cpu_between(samples, "GO", "UPLOADS_DONE", accept_seconds)
    summary["cpu_whole_run"] = cpu_between(samples, "GO", "DONE", gen.times["DONE"] - gen.times["GO"])
    summary["peak_rss_mb"] = peaks(samples["DONE"])
    (root / "raw.json").write_text(json.dumps(raw))
    return summary


STATEMENTS_SITE = Path(__file__).resolve().parent / "statements"


def count_statements_in(folder: Path | None) -> None:
    """Have the nbexchange processes started from now on count their statements into ``folder`` (None: stop)."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(STATEMENTS_SITE)]
    if folder is None:
        os.environ.pop("BENCH_STATEMENTS_DIR", None)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        os.environ["BENCH_STATEMENTS_DIR"] = str(folder)
        paths.insert(0, str(STATEMENTS_SITE))
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)


def statements_by_process(folder: Path, servers: Servers) -> dict[str, dict[str, int]]:
    """Each server process's statement counts, as its last write left them (they write every 0.5 s)."""
    time.sleep(1.5)
    out: dict[str, dict[str, int]] = {}
    for role, pid in servers.pids().items():
        path = folder / f"{pid}.json"
        if path.exists():
            out[role] = json.loads(path.read_text())
    return out


def statements_summary(by_role: dict[str, dict[str, int]], accepted: int) -> dict[str, Any]:
    """Statements per accepted submission, by process, with each process's most frequent ones."""
    per = max(accepted, 1)
    out: dict[str, Any] = {}
    for role, counts in sorted(by_role.items()):
        top = sorted(counts.items(), key=lambda kv: -kv[1])[:15]
        out[role] = {
            "total": sum(counts.values()),
            "per_submission": round(sum(counts.values()) / per, 2),
            "top": [{"count": n, "per_submission": round(n / per, 3), "statement": key} for key, n in top],
        }
    return out


def statements_table(summaries: list[dict[str, Any]]) -> str:
    """The statement counts of the runs that have them, as Markdown."""
    lines = ["| mode | process | statements per submission | most sent (per submission: statement @ sent by) |"]
    lines.append("|---|---|---|---|")
    for summary in summaries:
        for role, counted in summary.get("statements", {}).items():
            top = "<br>".join(f"{t['per_submission']}: {t['statement'][:110]}" for t in counted["top"][:6])
            lines.append(f"| {summary['mode']} | {role} | {counted['per_submission']} | {top} |")
    return "\n".join(lines)


def connections_by_process(servers: Servers) -> dict[str, int]:
    """Established connections to the servers' port that each listening process holds (from /proc)."""
    established = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == servers.port and fields[3] == "01":
                    established.add(fields[9])
    counts = {}
    for role, pid in servers.pids().items():
        if role.startswith(("api", "baseline")):
            inodes = set()
            with contextlib.suppress(FileNotFoundError):
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    with contextlib.suppress(OSError):
                        link = os.readlink(f"/proc/{pid}/fd/{fd}")
                        if link.startswith("socket:["):
                            inodes.add(link[8:-1])
            counts[role] = len(inodes & established)
    return counts


# -- the whole cost (--until-idle) -------------------------------------------------------------


def process_groups(servers: Servers, gen: LoadGen, probe: LogProbe | None) -> dict[str, list[int]]:
    """The pids of each group whose CPU the watch follows, as they are now.

    A server's group holds the processes it started too (none today; b8d5a60's check processes were).
    """
    groups = {role: [pid, *descendants(pid)] for role, pid in servers.pids().items()}
    groups[LOADGEN] = [gen.proc.pid]
    groups[PY_SPY] = [p.pid for p in gen.profilers]
    by_role = probe.backends(servers.app_name) if probe is not None and servers.app_name else {}
    ours = {pid for pids in by_role.values() for pid in pids}
    clients = set(pids_named("postgres", lambda cmdline: "(" in cmdline or "[local]" in cmdline))
    groups[PG_OURS] = sorted(ours)
    for role, pids in by_role.items():  # shown beside PG_OURS, not counted again
        groups[f"{PG_BACKENDS_OF}{role}"] = sorted(pids)
    groups[PG_OTHERS] = sorted(clients - ours)
    groups[PG_BACKGROUND] = sorted(set(pids_named("postgres")) - clients)
    port = urllib.parse.urlsplit(REDIS_URL).port or 6379
    groups[REDIS] = pids_named("redis-server", lambda cmdline: f":{port}" in cmdline)
    return groups


def counted_groups(servers: Servers) -> list[str]:
    """What a submission's cost counts: the servers' processes, and in production PostgreSQL's and Redis's."""
    roles = list(servers.procs)
    if servers.name == "production":
        roles += [PG_OURS, PG_BACKGROUND, REDIS]
    return roles


def whole_cost(
    summary: dict[str, Any], raw: dict[str, Any], watch: Watch, counted: list[str], quiet: dict[str, Any], gen: LoadGen
) -> dict[str, Any]:
    """CPU per accepted submission by phase and process, the timeline and the stage breakdown."""
    accepted = summary["accepted"]
    t0 = raw["t0_monotonic"]
    ok = [r for r in raw["records"] if r.get("status") in (200, 201)]
    out: dict[str, Any] = {
        "idle": quiet,
        "check_defer_max_s": CHECK_DEFER_MAX,
        "cost": {
            "accept_phase": phase_cost(watch, "GO", "UPLOADS_DONE", accepted, counted),
            "after_burst": phase_cost(watch, "UPLOADS_DONE", "IDLE", accepted, counted),
            "total": phase_cost(watch, "GO", "IDLE", accepted, counted),
        },
        "uploads_done_s": round(watch.samples[watch.marks["UPLOADS_DONE"]]["t"] - t0, 2),
        "idle_s": round(watch.samples[watch.marks["IDLE"]]["t"] - t0, 2),
        # What the servers use doing nothing (the projector's polls, the sweeper's timer): a cost per second.
        "idle_floor_cores": round(sum(watch.cores(counted, 3)) / 3, 3),
        "watch_errors": watch.errors[:10],
        "timeline": timeline(raw, watch, visibility(raw.get("positions") or [], ok), counted),
    }
    # The listing waited for idle, so when the last check ended comes from the log's watch (1 s buckets).
    checked = [
        b["t"] + 1 for b in out["timeline"] if b.get("archives", 0) > accepted and b.get("checks_done") == b["archives"]
    ]
    if checked:
        out["all_checked_after_last_upload_s"] = round(max(0.0, checked[0] - out["uploads_done_s"]), 1)
    if gen.profiles:
        total = out["cost"]["total"]["groups"]
        out["stages"] = {
            role: breakdown(path, role, total.get(role, {}).get("cpu_seconds"), accepted)
            for role, path in gen.profiles.items()
            if path.exists()
        }
    return out


def summarize_deadline(mode: str, raw: dict[str, Any], concurrency: int) -> dict[str, Any]:
    records = raw["records"]
    ok = [r for r in records if r.get("status") in (200, 201)]
    failures: dict[str, int] = {}
    for r in records:
        if r not in ok:
            why = str(r.get("status") or r.get("error", "?"))[:60]
            failures[why] = failures.get(why, 0) + 1
    latency = sorted(r["submit_end"] - r["submit_start"] for r in ok)
    fetch = sorted(r["fetch_end"] - r["fetch_start"] for r in ok if "fetch_end" in r)
    sojourn = sorted(r["submit_end"] - r["arrive"] for r in ok)
    first = min((r["arrive"] for r in records if "arrive" in r), default=0.0)
    last = max((r["submit_end"] for r in ok), default=0.0)
    out: dict[str, Any] = {
        "mode": mode,
        "students": len(records),
        "accepted": len(ok),
        "failures": failures,
        "archive_bytes": raw["archive_size"],
        "body_build_seconds": round(raw["build_seconds"], 1),
        "wall_seconds": round(last - first, 2),
        "accepted_per_s_overall": round(len(ok) / (last - first), 1) if last > first else None,
        "accept_latency_s": _dist(latency),
        "fetch_latency_s": _dist(fetch),
        "arrival_to_accept_s": _dist(sojourn),
    }
    out.update(saturated_throughput(raw["busy_changes"], ok, concurrency))
    if raw.get("positions") is not None and mode != "baseline":
        out.update(projection_lag(raw["positions"], ok, last))
        listing = raw.get("listing") or {}
        out["listing"] = listing
        out["lost"] = listing.get("lost")
        out["duplicates"] = listing.get("duplicates")
        if "complete_at" in listing:
            out["all_listed_after_last_upload_s"] = round(listing["complete_at"] - last, 3)
        if "checks" in listing:
            out["archive_states"] = listing["checks"]["states"]
            out["all_checked_after_last_upload_s"] = round(listing["checks"]["at"] - last, 3)
    return out


def _dist_ms(values: list[float]) -> dict[str, float | None]:
    """``_dist`` of seconds, in milliseconds to 0.1."""
    return {k: (round(1000 * v, 1) if v is not None else None) for k, v in _dist(values).items()}


def _dist(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None}
    return {"p50": round(pct(values, 50), 4), "p99": round(pct(values, 99), 4), "max": round(values[-1], 4)}


def saturated_throughput(
    changes: list[tuple[float, int]], ok: list[dict[str, Any]], concurrency: int
) -> dict[str, Any]:
    """Accepts per second while every connection was busy: the server's capacity, not the arrival schedule's."""
    busy, start, end = 0, None, None
    for when, delta in sorted(changes, key=lambda c: (c[0], -c[1])):
        before = busy
        busy += delta
        if busy == concurrency and start is None:
            start = when
        if before == concurrency and busy < concurrency:
            end = when
    if start is None or end is None or end - start < 1.0:
        return {"saturated": False, "accepted_per_s": None}
    done = sum(1 for r in ok if start <= r["submit_end"] <= end)
    return {
        "saturated": True,
        "saturated_from_s": round(start, 2),
        "saturated_until_s": round(end, 2),
        "accepted_per_s": round(done / (end - start), 1),
    }


def _reached(positions: list[tuple[float, int]]) -> tuple[list[float], list[int]]:
    """The probes' times, and the highest read position seen by each (sorted by time)."""
    times: list[float] = []
    reached: list[int] = []
    high = 0
    for t, position in sorted(positions):
        high = max(high, position)
        times.append(t)
        reached.append(high)
    return times, reached


def visibility(positions: list[tuple[float, int]], ok: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """(answered at, lag) of each accepted submission ``collections`` came to reflect: how long after its
    answer the read position first reached its position."""
    times, reached = _reached(positions)
    out = []
    for r in ok:
        i = bisect.bisect_left(reached, r["position"])
        if i < len(reached):
            # Seen by a probe that was answered before the submission's own answer: lag 0.
            out.append((r["submit_end"], max(0.0, times[i] - r["submit_end"])))
    return out


def projection_lag(positions: list[tuple[float, int]], ok: list[dict[str, Any]], last: float) -> dict[str, Any]:
    """For each accepted submission, how long after its answer ``collections`` first reflected its position."""
    times, reached = _reached(positions)
    lags = sorted(lag for _, lag in visibility(positions, ok))
    never = len(ok) - len(lags)
    top = max((r["position"] for r in ok), default=0)
    i = bisect.bisect_left(reached, top)
    return {
        "projection_lag_s": _dist(lags),
        "not_visible_by_position": never,
        "visible_after_last_upload_s": round(times[i] - last, 3) if i < len(reached) else None,
        "probes": len(positions),
    }


# -- the bigupload scenario --------------------------------------------------------------------


def run_bigupload_mode(mode: str, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    root.mkdir(parents=True)
    instructor, students = write_users(root / "users.yaml", 1, COURSE)
    servers = start_exchange(mode, root, root / "users.yaml", args)
    try:
        release(servers.port, instructor)
        max_upload = 5 * 1024**3
        for flag in args.extra:
            if flag.startswith("--NbExchange.max_upload_size="):
                max_upload = int(flag.split("=", 1)[1])
        cfg = target(
            "bigupload",
            servers.port,
            students=students,
            big_size=args.big_size,
            oversized_bytes=max_upload + 2 * 1024**3,
        )
        gen = LoadGen(cfg, root, servers)
        gen.expect("READY", 120)
        before = {role: sample(pid).__dict__ for role, pid in servers.pids().items()}
        resets = {role: reset_peak(pid) for role, pid in servers.pids().items()}
        gen.go()
        gen.expect("UPLOADS_DONE", 3600)
        raw = gen.result(60)
        during = gen.samples["UPLOADS_DONE"]
        # Then the worker checks and unpacks the big archive: its memory counts too.
        settle = wait_checked(servers.port, instructor, timeout=1800) if raw.get("big", {}).get("status") else None
        after = {role: sample(pid).__dict__ for role, pid in servers.pids().items()}
        state = call(servers.port, "GET", "collections", instructor, {"course_id": COURSE, "assignment_id": ASSIGNMENT})
    finally:
        servers.stop()
    growth = {
        role: {
            "rss_before_mb": round(before[role]["rss_kb"] / 1024, 1),
            "peak_during_upload_mb": round(during[role]["hwm_kb"] / 1024, 1) if during.get(role) else None,
            "peak_through_unpack_mb": round(after[role]["hwm_kb"] / 1024, 1),
            "increase_mb": round((after[role]["hwm_kb"] - before[role]["rss_kb"]) / 1024, 1),
            "peak_was_reset": resets[role],
        }
        for role in before
    }
    items = state[1].get("value", [])
    return {
        "mode": mode,
        "oversized": raw.get("oversized"),
        "big": raw.get("big"),
        "big_mb_per_s": round(raw["big"]["bytes"] / 1024**2 / raw["big"]["seconds"], 1)
        if "status" in raw.get("big", {})
        else None,
        "unpacked_and_projected_after_s": round(settle, 1) if settle is not None else None,
        "archive_state": items[0]["archive"] if items else None,
        "memory": growth,
    }


# -- the list scenario ---------------------------------------------------------------------------


def run_list_mode(mode: str, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    root.mkdir(parents=True)
    instructor, students = write_users(root / "users.yaml", args.list_submissions, COURSE)
    servers = start_exchange(mode, root, root / "users.yaml", args)
    try:
        release(servers.port, instructor)
        seed = target(
            "deadline",
            servers.port,
            students=students,
            size=args.list_size,
            concurrency=args.concurrency,
            window=0.0,
            fetch=False,
            instructor_token=None,
        )
        started = time.monotonic()
        gen = LoadGen(seed, root, servers)
        gen.expect("READY", 600)
        gen.go()
        gen.expect("UPLOADS_DONE", 3600)
        seeded = gen.result(60)
        ok = [r for r in seeded["records"] if r.get("status") in (200, 201)]
        seed_seconds = time.monotonic() - started
        settle = wait_quiet(servers.port, instructor, max(r["position"] for r in ok), timeout=1800)
        # The log's head standing still is not enough: the sweep looks only at
        # events older than sweep_grace (30 s), so it reads the seeded events
        # after they settle, and a listing timed meanwhile would measure that
        # contention. Wait, as --until-idle does, until every archive is checked
        # and the projections and the sweep reached the head, then for idle processes.
        probe = LogProbe(servers.db_url)
        watch = Watch(lambda: {role: [pid] for role, pid in servers.pids().items()}, probe)
        watch.start()
        try:
            quiet = wait_until_idle(watch, list(servers.procs), settled, timeout=1800)
        finally:
            watch.stop()
            probe.close()
        if not quiet["idle"]:
            raise RuntimeError(f"the exchange did not go idle: {quiet}")
        swept = settle + quiet["settled_after_s"]
        idle = settle + quiet["seconds"]
        cfg = target("list", servers.port, instructor_token=instructor, requests=args.list_requests)
        gen = LoadGen(cfg, root, servers, args.profile, f"{args.label or 'list'}-{mode}")
        gen.expect("READY", 120)
        gen.go()
        gen.expect("UPLOADS_DONE", 3600)
        raw = gen.result(60)
        cpu = cpu_between(gen.samples, "GO", "UPLOADS_DONE", gen.times["UPLOADS_DONE"] - gen.times["GO"])
        handler = handler_seconds(
            [root / f"{role}.log" for role in servers.procs if role.startswith("api")], len(raw["times"])
        )
    finally:
        servers.stop()
    times = sorted(raw["times"])
    return {
        "mode": mode,
        "seeded": len(ok),
        "seed_seconds": round(seed_seconds, 1),
        "settled_after_s": round(settle, 1),
        "swept_after_s": round(swept, 1),
        "idle_after_s": round(idle, 1),
        "items_listed": raw["items"],
        "answer_bytes": raw["bytes"],
        "requests": len(times),
        "statuses": raw["statuses"],
        "latency_ms": _dist_ms(times),
        # The API's own time, from its log: from the request's start to its finish(), the answer handed to
        # tornado's stream. The rest of latency_ms is the 5 MB crossing loopback and being read there.
        "handler_ms": _dist_ms(handler),
        "cpu": cpu,
    }


#: An API process's request log line: its time stamp, then "<status> <method> <path> <ms>ms".
_REQUEST_LINE = re.compile(r"^\[\w (\S+ \S+) [^]]*\] (\d+) (\w+) (\S+) ([\d.]+)ms$")


def handler_seconds(logs: list[Path], count: int, path: str = f"{BASE_URL}collections") -> list[float]:
    """The last ``count`` GETs of ``path`` in these API logs (the timed ones come last), as the APIs timed them."""
    seen: list[tuple[str, float]] = []
    for log in logs:
        for line in log.read_text(errors="replace").splitlines():
            m = _REQUEST_LINE.match(line)
            if m and m.group(3) == "GET" and m.group(4) == path:
                seen.append((m.group(1), float(m.group(5)) / 1000))
    return sorted(seconds for _, seconds in sorted(seen)[-count:])


# -- reporting ----------------------------------------------------------------------------------


def adjacent_baselines(runs: list[dict[str, Any]], run: dict[str, Any]) -> list[dict[str, Any]]:
    """The baseline runs just before and just after ``run`` (the machine drifts: a mode is held to its neighbours)."""
    at = runs.index(run)
    before = [r for r in runs[:at] if is_baseline(r["mode"])][-1:]
    after = [r for r in runs[at + 1 :] if is_baseline(r["mode"])][:1]
    return before + after


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{1000 * value:.0f}"


def _ratios(value: float | None, bases: list[float | None]) -> str:
    """``value`` over each baseline's, "before / after"."""
    if not value or not bases or not all(bases):
        return "–"
    return " / ".join(f"{value / base:.2f}" for base in bases if base)


def deadline_table(summaries: list[dict[str, Any]]) -> str:
    lines = [
        "| mode | accepted | accepted/s (saturated) | × baseline (before / after) | overall/s "
        "| accept p50 / p99 / max (ms) | p99 × baseline (before / after) | projection lag p50 / p99 / max (ms) "
        "| visible after last upload (ms) | lost | dup | all archives checked after last upload (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        lat = s["accept_latency_s"]
        ratio = p99_ratio = "–"
        if not is_baseline(s["mode"]):
            bases = adjacent_baselines(summaries, s)
            ratio = _ratios(s.get("accepted_per_s"), [b.get("accepted_per_s") for b in bases])
            p99_ratio = _ratios(lat["p99"], [b["accept_latency_s"]["p99"] for b in bases])
        lag = s.get("projection_lag_s") or {}
        lines.append(
            f"| {s['mode']} | {s['accepted']}/{s['students']} | {s.get('accepted_per_s') or '–'} | {ratio} "
            f"| {s['accepted_per_s_overall']} | {_ms(lat['p50'])} / {_ms(lat['p99'])} / {_ms(lat['max'])} "
            f"| {p99_ratio} | {_ms(lag.get('p50'))} / {_ms(lag.get('p99'))} / {_ms(lag.get('max'))} "
            f"| {_ms(s.get('visible_after_last_upload_s'))} | {s.get('lost', '–')} | {s.get('duplicates', '–')} "
            f"| {s.get('all_checked_after_last_upload_s', '–')} {s.get('archive_states', '')} |"
        )
    lines += ["", "| mode | process | peak RSS (MB) | CPU during uploads (cores) |", "|---|---|---|---|"]
    for s in summaries:
        for role, mb in s["peak_rss_mb"].items():
            cores = s["cpu_accept_phase"].get(role, {}).get("cores")
            lines.append(f"| {s['mode']} | {role} | {mb} | {cores} |")
        for role in (SHARED, "everyone else"):
            cores = s["cpu_accept_phase"].get(role, {}).get("cores")
            if cores is not None and (role != SHARED or s["mode"] in BROKERS):
                lines.append(f"| {s['mode']} | {role} | – | {cores} |")
    return "\n".join(lines)


def cost_table(summaries: list[dict[str, Any]]) -> str:
    """CPU per accepted submission (ms) by phase, with each process's share of the total."""
    runs = [s for s in summaries if "cost" in s]

    def bases(s: dict[str, Any]) -> list[float | None]:
        return [b["cost"]["total"]["total"]["ms_per_submission"] for b in adjacent_baselines(runs, s)]

    lines = [
        "| mode | accepted | accepted/s (saturated) | accept p99 (ms) | accept phase (ms/sub) | after the burst "
        "(ms/sub) | total (ms/sub) | total × baseline (before / after) | idle after last accept (s) "
        "| subs/s per core (1000 / total) | idle floor (cores) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in runs:
        c = s["cost"]
        total = c["total"]["total"]["ms_per_submission"]
        lines.append(
            f"| {s['mode']} | {s['accepted']}/{s['students']} | {s.get('accepted_per_s') or '–'} "
            f"| {_ms(s['accept_latency_s']['p99'])} | {c['accept_phase']['total']['ms_per_submission']} "
            f"| {c['after_burst']['total']['ms_per_submission']} | {total} "
            f"| {'1' if is_baseline(s['mode']) else _ratios(total, bases(s))} "
            f"| {round(s['idle_s'] - s['uploads_done_s'], 1)} | {round(1000 / total, 1) if total else '–'} "
            f"| {s['idle_floor_cores']} |"
        )
    lines += accept_path_table(runs, bases)
    lines += [
        "",
        "| mode | process | accept phase (ms/sub) | after the burst (ms/sub) | total (ms/sub) | counted |",
        "|---|---|---|---|---|---|",
    ]
    for s in runs:
        c = s["cost"]
        for group, figures in sorted(c["total"]["groups"].items(), key=lambda g: -(g[1]["cpu_seconds"] or 0)):
            if abs(figures["cpu_seconds"] or 0) < 0.05:
                continue
            lines.append(
                f"| {s['mode']} | {group} | {c['accept_phase']['groups'].get(group, {}).get('ms_per_submission')} "
                f"| {c['after_burst']['groups'].get(group, {}).get('ms_per_submission')} "
                f"| {figures['ms_per_submission']} | {'yes' if group in c['total']['counted'] else 'no'} |"
            )
    for s in runs:
        if len(s.get("stages") or {}) > 1:
            lines += ["", f"{s['mode']}, all its processes: ms per submission by stage", ""]
            lines += ["| stage | ms/sub |", "|---|---|"]
            for stage, ms in stage_totals(s["stages"]):
                lines.append(f"| {stage} | {ms} |")
        for role, stages in (s.get("stages") or {}).items():
            lines += [
                "",
                f"{s['mode']}, {role}: {stages['samples']} samples on CPU ({stages['waiting_samples_dropped']} "
                f"waiting, left out), {stages['cpu_seconds']} s of CPU (100 samples a second: "
                f"{stages['samples'] / max(stages['cpu_seconds'] or 0, 0.01):.0f} per CPU second)",
                "",
            ]
            lines += ["| stage | share of samples | ms/sub |", "|---|---|---|"]
            for stage in stages["stages"]:
                lines.append(f"| {stage['stage']} | {stage['share']:.1%} | {stage['ms_per_submission']} |")
    return "\n".join(lines)


#: Of the three events a student's visit appends (fetched, submitted, the check's outcome), the accept path's.
ACCEPT_SHARE_OF_COMMIT = 2 / 3


def accept_path_ms(run: dict[str, Any]) -> float | None:
    """The CPU of the accept path per submission, from a run's profiles (the issue's "at most 2 ×" aim).

    Where the API processes do nothing else (production): each of them whole, less the benchmark's probes
    and the dispatch of check messages, plus its own PostgreSQL backends during the burst. Where one process
    also checks and projects (embedded): its accept stages, the fetch, and the fetched and submitted events'
    share of the group commit.
    """
    stages = run.get("stages") or {}
    apis = sorted(role for role in stages if role.startswith("api-"))
    if not apis:
        return None

    def ms(role: str, *names: str) -> float:
        return sum(
            stage["ms_per_submission"] or 0.0
            for stage in stages[role]["stages"]
            if any(stage["stage"].startswith(name) for name in names)
        )

    if run["mode"] == "embedded":
        return round(ms("api-0", *ACCEPT) + ACCEPT_SHARE_OF_COMMIT * ms("api-0", COMMIT), 2)
    total, burst = run["cost"]["total"]["groups"], run["cost"]["accept_phase"]["groups"]
    own = sum((total[role]["ms_per_submission"] or 0.0) - ms(role, PROBES, DISPATCH) for role in apis)
    backends = sum(burst.get(PG_BACKENDS_OF + role, {}).get("ms_per_submission") or 0.0 for role in apis)
    return round(own + backends, 2)


def accept_path_table(runs: list[dict[str, Any]], bases: Callable[[dict[str, Any]], list[float | None]]) -> list[str]:
    """The accept path's CPU per submission beside the adjacent baselines' whole (needs ``--profile``)."""
    rows = [(run, accept_path_ms(run)) for run in runs if not is_baseline(run["mode"])]
    rows = [(run, ms) for run, ms in rows if ms is not None]
    if not rows:
        return []
    lines = ["", "| mode | accept path (ms/sub) | × baseline (before / after) |", "|---|---|---|"]
    return lines + [f"| {run['mode']} | {ms} | {_ratios(ms, bases(run))} |" for run, ms in rows]


def stage_totals(by_role: dict[str, dict[str, Any]]) -> list[tuple[str, float]]:
    """Each stage's ms per submission summed over a mode's processes, largest first."""
    totals: dict[str, float] = {}
    for stages in by_role.values():
        for stage in stages["stages"]:
            totals[stage["stage"]] = totals.get(stage["stage"], 0.0) + (stage["ms_per_submission"] or 0.0)
    return sorted(((stage, round(ms, 2)) for stage, ms in totals.items()), key=lambda s: -s[1])


def wait_for_idle(
    timeout: float, below: float = 0.3, steady: int = 3, busy_seconds: Callable[[], float] = machine_busy_seconds
) -> dict[str, Any]:
    """Wait (at most ``timeout`` s) until ``busy_seconds`` (by default: the whole machine's) grows by
    less than ``below`` cores for ``steady`` s."""
    started = time.monotonic()
    calm = 0
    busy = busy_seconds()
    cores = None
    while time.monotonic() - started < timeout:
        time.sleep(1)
        now = busy_seconds()
        cores, busy = now - busy, now
        calm = calm + 1 if cores < below else 0
        if calm >= steady:
            return {"idle": True, "seconds": round(time.monotonic() - started, 1)}
    return {"idle": timeout <= 0, "seconds": round(time.monotonic() - started, 1), "last_busy_cores": cores}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    storage = args.storage or Path(tempfile.mkdtemp(prefix="nbx-bench-", dir="/tmp"))
    storage.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "scenario": args.scenario,
        "argv": sys.argv[1:] if argv is None else argv,
        "machine": machine(),
        "storage": str(storage),
        "fsync_before": fsync_probe(storage),
        "fsync_delay_injected_ms": args.fsync_delay,
    }
    if args.pin:
        # This machine: 2 cores, so the load generator on core 1, the servers on core 0.
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) < 2:
            raise SystemExit("--pin needs at least 2 cores")
        args.server_cpus = ",".join(str(c) for c in cores[:-1])
        os.sched_setaffinity(0, {cores[-1]})  # the load generator and py-spy inherit it
        report["pinned"] = {"servers": args.server_cpus, "loadgen, py-spy, this script": str(cores[-1])}
        print(f"pinned: {report['pinned']}", flush=True)
    if args.api_processes is None:
        # A second process on a core costs each submission more CPU than it saves (bench/README.md, eleventh pass).
        args.api_processes = len(args.server_cpus.split(",")) if args.server_cpus else len(os.sched_getaffinity(0))
    report["api_processes"] = args.api_processes
    print(f"machine: {report['machine']}", flush=True)
    print(f"fsync on {storage} before: {report['fsync_before']}", flush=True)
    if args.fsync_delay:
        print(f"the servers' every fsync made {args.fsync_delay} ms slower (strace)", flush=True)
    runs: list[dict[str, Any]] = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    try:
        modes = list(args.modes)
        if args.scenario == "deadline" and not args.no_baseline:
            # Before and after each mode: this machine's baseline drifts between runs, and within one,
            # so each mode is held to the baseline runs beside it.
            modes = ["baseline", *(step for mode in modes for step in (mode, "baseline"))]
        runner = {"deadline": run_deadline_mode, "bigupload": run_bigupload_mode, "list": run_list_mode}[args.scenario]
        for mode in modes:
            os.sync()
            waited = wait_for_idle(args.quiet_wait)
            again = f"-after-{runs[-1]['mode']}" if mode == "baseline" and runs else ""
            root = storage / f"{args.scenario}-{mode}{again}-{stamp}"
            print(f"== {args.scenario}: {mode} ({root})", flush=True)
            result = runner(mode, root, args)
            if again:
                result["mode"] = f"baseline (after {runs[-1]['mode']})"
            result["waited_for_idle"] = waited
            runs.append(result)
            print(json.dumps(result, indent=1), flush=True)
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
    finally:
        stop_all()
        report["fsync_after"] = fsync_probe(storage)
        report["runs"] = runs
        report["loadavg_after"] = os.getloadavg()
        name = f"{args.scenario}-{stamp}{'-' + args.label if args.label else ''}.json"
        (RESULTS / name).write_text(json.dumps(report, indent=1))
        if not args.keep and args.storage is None:
            shutil.rmtree(storage, ignore_errors=True)
        print(f"fsync on {storage} after: {report['fsync_after']}", flush=True)
        print(f"results: {RESULTS / name}", flush=True)
    if args.scenario == "deadline":
        print(deadline_table(runs))
    if args.until_idle:
        print()
        print(cost_table(runs))
    if args.count_statements:
        print()
        print(statements_table(runs))
    if args.plot:
        title = (
            f"{args.students} students, {args.size // 1024} KB, C={args.concurrency}, "
            f"{'pinned, ' if args.pin else ''}commit {report['machine']['commit']}, {stamp}"
        )
        plot(runs, args.plot, title)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
