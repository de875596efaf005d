"""Start a real exchange service (API process, and worker processes on a real broker) for tests."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import sqlalchemy as sa
import yaml
from kombu import Connection

from nbexchange.app import NbExchange
from nbexchange.storage import ArchiveStore, LocalArchiveStore, open_archive_store
from nbexchange.workers.app import QUEUE, is_rabbitmq

BASE_URL = "/services/nbexchange/"

TEST_DB_URL = os.environ.get("NBEX_TEST_DB_URL", "")
TEST_BROKER_URL = os.environ.get("NBEX_TEST_BROKER_URL", "")
#: ``s3``: every live service keeps its archives in a bucket of its own on an S3 server the suite starts
#: (moto's, tests/s3server.py). Unset: in its folder, as by default.
TEST_BLOB_STORE = os.environ.get("NBEX_TEST_BLOB_STORE", "local")

#: A real Redis for tests of the production topology, whichever pass runs them (.ci/run starts one).
REDIS_URL = TEST_BROKER_URL or "redis://127.0.0.1:6379/0"

#: Ten years: the fixed timestamps of the suite's submissions are all accepted.
SKEW_FOR_FIXED_STAMPS = 10 * 365 * 24 * 3600


def fresh_db_url(tmp_path: Path) -> tuple[str, object]:
    """A URL to an empty database for one test, and a token to drop it with."""
    if not TEST_DB_URL:
        return f"sqlite:///{tmp_path / 'exchange.sqlite'}", None
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(TEST_DB_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    admin.dispose()
    sep = "&" if "?" in TEST_DB_URL else "?"
    return f"{TEST_DB_URL}{sep}options=-csearch_path%3D{schema}", schema


def drop_db(token: object) -> None:
    """Drop what :func:`fresh_db_url` made."""
    if token is None:
        return
    admin = sa.create_engine(TEST_DB_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f"DROP SCHEMA {token} CASCADE")
    admin.dispose()


#: nbgrader's settings that make it use the plugin, one class per action.
PLUGIN_FACTORY_CONFIG = """\
c.ExchangeFactory.collect = 'nbexchange.plugin.ExchangeCollect'
c.ExchangeFactory.exchange = 'nbexchange.plugin.Exchange'
c.ExchangeFactory.fetch_assignment = 'nbexchange.plugin.ExchangeFetchAssignment'
c.ExchangeFactory.fetch_feedback = 'nbexchange.plugin.ExchangeFetchFeedback'
c.ExchangeFactory.list = 'nbexchange.plugin.ExchangeList'
c.ExchangeFactory.release_assignment = 'nbexchange.plugin.ExchangeReleaseAssignment'
c.ExchangeFactory.release_feedback = 'nbexchange.plugin.ExchangeReleaseFeedback'
c.ExchangeFactory.submit = 'nbexchange.plugin.ExchangeSubmit'
"""


def missing(message: str) -> None:
    """Skip a test whose program is missing, saying which; under CI (CI=true) fail instead."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message + " (CI=true: .ci/run installs it)")
    pytest.skip(message)


def require(program: str, how: str) -> None:
    """``program`` must be on PATH."""
    if not shutil.which(program):
        missing(f"{program} is not installed ({how})")


def stop_processes(procs: list[subprocess.Popen[bytes]], timeout: float = 20) -> None:
    """Stop processes: SIGTERM to all, then SIGKILL to any still running after ``timeout`` seconds."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Service:
    """A running exchange: its URL, its users' tokens, and its processes."""

    url: str
    tokens: dict[str, str]
    storage: Path
    db_url: str
    broker_url: str
    flags: list[str]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    #: Each API process's own URL (all equal to ``url`` where they share its port).
    api_urls: list[str] = field(default_factory=list)

    def headers(self, name: str, **extra: str) -> dict[str, str]:
        """Request headers authenticating as ``name``."""
        return {"Authorization": f"token {self.tokens[name]}", **extra}

    def start_worker(self) -> subprocess.Popen[bytes]:
        """Start one more ``nbexchange worker`` process."""
        log = self.storage / f"worker-{len(self.procs)}.log"
        proc = _spawn(["worker", *self.flags], log)
        self.procs.append(proc)
        self.logs.append(log)
        return proc

    @property
    def queue(self) -> str:
        """The name of the service's queue (``queue_name``, or its default)."""
        names = [flag.split("=", 1)[1] for flag in self.flags if flag.startswith("--NbExchange.queue_name=")]
        return names[-1] if names else QUEUE

    def stop(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL), then delete its queue from a RabbitMQ broker."""
        stop_processes(self.procs)
        self.procs.clear()
        drop_queue(self.broker_url, self.queue)

    def log_text(self) -> str:
        """Everything the processes logged, for a failing test's report."""
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())


def drop_queue(broker_url: str, queue: str) -> None:
    """Delete a test's queue (and its exchange) from a RabbitMQ broker, where it would stay, durable.

    A test's queue in Redis is a key that its last message took away; one
    in RabbitMQ is a quorum queue (a Raft log on disk), one per test, which
    would pile up in the shared broker. A broker that is gone (a test's own,
    stopped) has nothing to delete.
    """
    if not is_rabbitmq(broker_url):
        return
    try:
        with Connection(broker_url, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
            conn.default_channel.queue_delete(queue)
            conn.default_channel.exchange_delete(queue)
    except Exception:
        pass  # gone with its broker


def clean_env() -> dict[str, str]:
    """This process's environment without the JupyterHub and nbexchange settings a test did not choose."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTERHUB_", "NBEX_"))}


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "ab")  # noqa: SIM115 - handed to the child for its lifetime
    return subprocess.Popen(
        [sys.executable, "-m", "nbexchange", *args], stdout=out, stderr=subprocess.STDOUT, env=clean_env()
    )


def run_nbexchange(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m nbexchange`` to its end with a clean environment (plus ``env``)."""
    return subprocess.run(
        [sys.executable, "-m", "nbexchange", *args],
        cwd=cwd,
        env={**clean_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_users(
    path: Path, users: dict[str, dict[str, str]], orgs: dict[str, int] | None = None, mode: int = 0o600
) -> dict[str, str]:
    """A users file for ``{name: {course: role}}``, private unless ``mode`` says so; returns ``{name: token}``."""
    tokens = {name: secrets.token_hex(16) for name in users}
    entries: list[dict[str, Any]] = [
        {
            "name": name,
            "token": tokens[name],
            "org_id": (orgs or {}).get(name, 1),
            "full_name": name.replace("_", " ").title(),
            "email": f"{name}@example.org",
            "lms_user_id": f"lms-{name}",
            "courses": courses,
        }
        for name, courses in users.items()
    ]
    # Created private: it holds tokens, and is never readable by others even for a moment.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(yaml.safe_dump({"users": entries}))
    path.chmod(mode)
    return tokens


def start_service(
    root: Path,
    users: dict[str, dict[str, str]],
    *,
    db_url: str,
    broker_url: str = "",
    orgs: dict[str, int] | None = None,
    workers: int = 1,
    api_processes: int = 1,
    extra: list[str] | None = None,
    users_mode: int = 0o600,
    cold_start: bool = False,
) -> Service:
    """Start the API (and, with a broker, ``workers`` worker processes) and wait until it answers.

    By default only the first API process migrates the database, and the
    others start once it answers, sharing its port. ``cold_start`` starts
    them as replicas of a rollout do: every process at once, each migrating
    on start (``upgrade_db``, the default), each API on a port of its own.
    """
    root.mkdir(parents=True, exist_ok=True)
    tokens = write_users(root / "users.yaml", users, orgs, users_mode)
    port = free_port()
    flags = [
        f"--NbExchange.base_storage_location={root / 'store'}",
        f"--NbExchange.db_url={db_url}",
        f"--NbExchange.users_file={root / 'users.yaml'}",
        f"--NbExchange.queue_name=nbx-test-{uuid.uuid4().hex[:8]}",
        "--NbExchange.sweep_interval=2",
        "--NbExchange.sweep_grace=1",
        # The suite's submissions carry fixed timestamps (tests/httpclient.py's
        # STAMP) so that lists compare exactly: the clock-skew rule is tested by
        # services started with it set (tests/api/test_decisions.py).
        f"--NbExchange.max_clock_skew={SKEW_FOR_FIXED_STAMPS}",
    ]
    if TEST_BLOB_STORE == "s3":
        from s3server import s3_flags  # imported here: it builds on this module

        flags += s3_flags()
    # A setting in ``extra`` replaces the default above (traitlets refuses a setting given twice).
    overridden = {flag.split("=", 1)[0] for flag in extra or []}
    flags = [flag for flag in flags if flag.split("=", 1)[0] not in overridden] + list(extra or [])
    if broker_url:
        flags.append(f"--NbExchange.broker_url={broker_url}")
    service = Service(f"http://127.0.0.1:{port}{BASE_URL}", tokens, root, db_url, broker_url, flags)
    for i in range(api_processes):
        log = root / f"api-{i}.log"
        if cold_start:
            own_port = port if i == 0 else free_port()
            service.procs.append(_spawn(["--ip=127.0.0.1", f"--port={own_port}", *flags], log))
            service.api_urls.append(f"http://127.0.0.1:{own_port}{BASE_URL}")
            service.logs.append(log)
            continue
        reuse = ["--NbExchange.reuse_port=True"] if api_processes > 1 else []
        # Only the first process migrates, so two never race to create the schema.
        migrate = [] if i == 0 else ["--NbExchange.upgrade_db=False"]
        service.procs.append(_spawn(["--ip=127.0.0.1", f"--port={port}", *reuse, *migrate, *flags], log))
        service.api_urls.append(service.url)
        service.logs.append(log)
        if i == 0:
            wait_until_up(service)
    if broker_url:
        for _ in range(workers):
            service.start_worker()
    wait_until_up(service)
    return service


def service_archives(service: Service) -> ArchiveStore:
    """The archive store a service keeps its blobs in (its folder, or its bucket), opened creating nothing."""
    settings = NbExchange()
    settings.parse_command_line(service.flags)
    return open_archive_store(settings, create=False)


def corrupt_blob(service: Service, sha256: str, data: bytes) -> None:
    """Change a stored blob's bytes behind the service's back (a failing disk, a hand on the bucket)."""
    replace_blob(service_archives(service), sha256, data)


def replace_blob(archives: ArchiveStore, sha256: str, data: bytes | None) -> None:
    """Put ``data`` where the blob ``sha256`` is kept, or remove it (None), behind the store's back."""
    if isinstance(archives, LocalArchiveStore):
        path = archives.path(sha256)
        if data is None:
            path.unlink()
        else:
            os.chmod(path, 0o600)
            path.write_bytes(data)
        return
    from nbexchange.storage_s3 import BLOBS, S3ArchiveStore

    assert isinstance(archives, S3ArchiveStore)
    key = archives.prefix + BLOBS + sha256
    if data is None:
        archives.client.delete_object(Bucket=archives.bucket, Key=key)
    else:
        archives.client.put_object(Bucket=archives.bucket, Key=key, Body=data)


def verify(service: Service) -> dict[str, Any]:
    """``nbexchange verify`` on the service's database and store: its report."""
    done = subprocess.run(
        [sys.executable, "-m", "nbexchange", "verify", *service.flags],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(),
    )
    report: dict[str, Any] = json.loads(done.stdout)
    assert (done.returncode == 0) == report["ok"], done.stderr
    return report


def collect(service: Service, grace: float = 0) -> dict[str, Any]:
    """Run ``nbexchange collect`` on the service's database and store (grace 0: nothing is young); its report."""
    done = subprocess.run(
        [sys.executable, "-m", "nbexchange", "collect", f"--grace={grace}", *service.flags],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def wait_until_up(service: Service, timeout: float = 60) -> None:
    """Poll every API process's ``health`` until it answers 200; fail with the logs if a process died."""
    deadline = time.monotonic() + timeout
    waiting = list(dict.fromkeys(service.api_urls or [service.url]))
    while time.monotonic() < deadline:
        for proc in service.procs:
            if proc.poll() is not None:
                service.stop()
                raise RuntimeError(f"An exchange process exited with {proc.returncode}:\n{service.log_text()}")
        try:
            while waiting and requests.get(waiting[0] + "health", timeout=2).status_code == 200:
                waiting.pop(0)
        except requests.ConnectionError:
            pass
        if not waiting:
            return
        time.sleep(0.1)
    service.stop()
    raise RuntimeError(f"The exchange did not answer within {timeout} s:\n{service.log_text()}")
