"""Redis, RabbitMQ and PostgreSQL servers of a test's own, on free ports, for tests that stop and start them."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from kombu import Connection
from service import free_port


def redis_answers(host: str, port: int) -> bool:
    """Whether a Redis server answers PING at ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(what)
        time.sleep(0.05)


class RedisServer:
    """A ``redis-server`` of the test's own, on a free port, that can be killed and started again."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        """Start it (nothing persisted: a restart begins empty) and wait until it answers."""
        log = open(self.folder / "redis.log", "ab")  # noqa: SIM115 - handed to the child for its lifetime
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
            + ["--daemonize", "no", "--dir", str(self.folder)],
            cwd=self.folder,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        _wait(lambda: redis_answers("127.0.0.1", self.port), 10, f"redis-server on port {self.port} did not answer")

    def kill(self) -> None:
        """SIGKILL it: every queued message is lost."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


def amqp_answers(url: str) -> bool:
    """Whether an AMQP broker at ``url`` accepts a connection (and its login)."""
    try:
        with Connection(url, connect_timeout=1) as conn:
            conn.ensure_connection(max_retries=1, timeout=1)
        return True
    except Exception:
        return False


#: Where Debian (and RabbitMQ's own packages) keep the server's scripts, which run as the calling user.
RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")


def rabbitmq_script(name: str) -> str | None:
    """The path of ``rabbitmq-server`` or ``rabbitmqctl`` to run as this user, or ``None`` if not installed.

    Debian's ``/usr/sbin`` wrappers switch root to the ``rabbitmq`` user (its
    home, its Erlang cookie): the scripts behind them run a node as whoever
    calls them, with the settings of the environment.
    """
    direct = RABBITMQ_BIN / name
    return str(direct) if direct.is_file() else shutil.which(name)


class RabbitMQServer:
    """A RabbitMQ node of the test's own, on free ports, that can be killed, stopped and started again.

    Its name, ports, data, logs, configuration and Erlang cookie are all its
    own (in a folder of its own); only epmd, Erlang's port mapper, is shared
    with the machine's nodes, each known there by its name. Its data (the
    queues, their messages) outlives a restart, as a real broker's does.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.dist_port = free_port()
        self.node = f"nbx-{uuid.uuid4().hex[:10]}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"
        self.proc: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "rabbitmq.conf").write_text(f"listeners.tcp.default = 127.0.0.1:{self.port}\n")
        (folder / "rabbitmq-env.conf").write_text("")
        (folder / "enabled_plugins").write_text("[].\n")

    def _env(self) -> dict[str, str]:
        return {
            **os.environ,
            "HOME": str(self.folder),  # the Erlang cookie: this node's and its rabbitmqctl's alone
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "RABBITMQ_MNESIA_BASE": str(self.folder / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.folder / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.folder / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": str(self.folder / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.folder / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.folder / "rabbitmq.pid"),
        }

    def start(self) -> None:
        """Start it (with the data it had, if any) and wait until it accepts AMQP connections."""
        server = rabbitmq_script("rabbitmq-server")
        assert server is not None
        log = open(self.folder / "rabbitmq.out", "ab")  # noqa: SIM115 - handed to the child for its lifetime
        self.proc = subprocess.Popen(
            [server], cwd=self.folder, stdout=log, stderr=subprocess.STDOUT, env=self._env(), start_new_session=True
        )
        log.close()

        def answers() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited with {self.proc.returncode}:\n{self.log_text()}")
            return amqp_answers(self.url)

        _wait(answers, 60, f"RabbitMQ node {self.node} did not answer on port {self.port}:\n{self.log_text()}")

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``rabbitmqctl -n <this node> args``."""
        ctl = rabbitmq_script("rabbitmqctl")
        assert ctl is not None
        return subprocess.run(
            [ctl, "-n", self.node, *args], env=self._env(), capture_output=True, text=True, timeout=timeout
        )

    def stop(self) -> None:
        """Stop it as an operator does (``rabbitmqctl stop``): connections are closed, data kept."""
        if self.proc is not None and self.proc.poll() is None:
            done = self.ctl("stop")
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"rabbitmqctl stop did not stop {self.node}: {done.stdout}{done.stderr}") from None
        self.proc = None

    def kill(self) -> None:
        """SIGKILL the node (a crash, a power cut): what it had confirmed is on disk, the rest is lost."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def log_text(self) -> str:
        """What the node logged."""
        paths = [self.folder / "rabbitmq.out", *sorted((self.folder / "log").glob("*.log"))]
        return "\n".join(p.read_text(errors="replace")[-4000:] for p in paths if p.exists())

    def remove(self) -> None:
        """Stop it (SIGKILL if rabbitmqctl cannot) and delete its data."""
        try:
            self.stop()
        finally:
            self.kill()
            shutil.rmtree(self.folder, ignore_errors=True)


class PostgresServer:
    """A PostgreSQL cluster of the test's own (``initdb``), on a free port, that can be stopped and started again.

    Made in a folder of its own outside pytest's (whose parents only their
    owner may enter): PostgreSQL refuses to run as root, so under root the
    cluster belongs to the ``postgres`` user and its processes run as that
    user. Durability is off (``fsync``): a test's data need not survive a
    power cut, and the machine's disk is shared.
    """

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="nbex-pg-"))
        self.data = self.folder / "data"
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self.proc: subprocess.Popen[bytes] | None = None
        self._as: dict[str, Any] = {}
        if os.geteuid() == 0:
            self._as = {"user": "postgres", "group": "postgres", "extra_groups": []}
            shutil.chown(self.folder, "postgres", "postgres")
        subprocess.run(
            ["initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"],
            check=True,
            capture_output=True,
            cwd=self.folder,
            **self._as,
        )

    def start(self) -> None:
        """Start it and wait until it accepts connections."""
        log = open(self.folder / "postgres.log", "ab")  # noqa: SIM115 - handed to the child for its lifetime
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.folder),
            "fsync": "off",
            "full_page_writes": "off",
            "max_connections": "200",
        }
        args = [arg for name, value in settings.items() for arg in ("-c", f"{name}={value}")]
        self.proc = subprocess.Popen(
            ["postgres", "-D", str(self.data), *args],
            cwd=self.folder,
            stdout=log,
            stderr=subprocess.STDOUT,
            **self._as,
        )
        log.close()
        _wait(self._answers, 30, f"PostgreSQL on port {self.port} did not answer:\n{self.log_text()}")

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"PostgreSQL exited with {self.proc.returncode}:\n{self.log_text()}")
        engine = sa.create_engine(self.url, connect_args={"connect_timeout": 2}, poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
            return True
        except sa.exc.OperationalError:
            return False
        finally:
            engine.dispose()

    def stop(self) -> None:
        """Stop it as an operator's restart does ("fast" shutdown: every session is cut off at once)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(timeout=30)
        self.proc = None

    def log_text(self) -> str:
        """What the server logged."""
        path = self.folder / "postgres.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def remove(self) -> None:
        """Stop it and delete its cluster."""
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)
