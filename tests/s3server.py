"""A server that speaks the S3 protocol on loopback (moto's server mode), for the S3 archive store's tests.

``NBEX_TEST_BLOB_STORE=s3`` makes every live service of the suite keep its
archives there (``tests/service.py``), each in a bucket of its own.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import requests
from service import free_port, stop_processes

#: moto accepts any credentials; the AWS SDK only needs some to sign with.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


class S3Server:
    """``python -m moto.server`` on a free loopback port, that can be stopped and started again on it."""

    def __init__(self) -> None:
        os.environ.update(CREDENTIALS)  # for the AWS SDK here and in the services the suite starts
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = Path(tempfile.mkstemp(prefix="nbex-moto-", suffix=".log")[1])

    def start(self) -> None:
        """Start it and wait until it answers (a restarted moto begins empty)."""
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto's server exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                requests.get(self.url + "/moto-api/", timeout=1)
                return
            except requests.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError(f"moto's server did not answer on {self.url}:\n{self.log.read_text()}")

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL)."""
        if self.proc is not None:
            stop_processes([self.proc], timeout=10)
            self.proc = None


class CuttableLink:
    """A TCP relay on a free loopback port in front of ``upstream`` ("http://host:port"), that passes at
    most ``down_limit`` bytes back on each connection and can cut every connection at once.

    A server that stops mid-download is not enough to test a download cut short: the kernel's socket
    buffers (tcp_rmem grows to 32 MB here) may already hold the whole body. Held back here, the rest
    of the body never reaches the client before :meth:`cut`.
    """

    def __init__(self, upstream: str, down_limit: int) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self._upstream = (host, int(port))
        self._down_limit = down_limit
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._cut = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # the listener was closed by cut()
            server = socket.create_connection(self._upstream)
            with self._lock:
                if self._cut:
                    client.close()
                    server.close()
                    continue
                self._sockets += [client, server]
            threading.Thread(target=self._pipe, args=(client, server, None), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, self._down_limit), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket, limit: int | None) -> None:
        passed = 0
        try:
            while limit is None or passed < limit:
                data = source.recv(min(65536, limit - passed) if limit is not None else 65536)
                if not data:
                    sink.shutdown(socket.SHUT_WR)
                    return
                sink.sendall(data)
                passed += len(data)
        except OSError:
            pass  # cut

    def cut(self) -> None:
        """End every connection now (what was held back is never delivered) and take no new ones."""
        with self._lock:
            self._cut = True
            self._listener.close()
            for sock in self._sockets:
                # shutdown, not only close: a thread blocked in recv on it keeps a closed socket open.
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._sockets.clear()


_shared: S3Server | None = None


def shared_s3() -> S3Server:
    """The suite's one S3 server, started on first use and stopped at exit."""
    global _shared
    if _shared is None:
        _shared = S3Server()
        _shared.start()
        atexit.register(_shared.stop)
    return _shared


def new_bucket_name() -> str:
    """A bucket name no test used yet."""
    return f"nbx-{uuid.uuid4().hex[:16]}"


def s3_flags(prefix: str = "") -> list[str]:
    """The settings that put a service's archives in a new bucket of the shared S3 server."""
    server = shared_s3()
    return [
        "--NbExchange.blob_store=s3",
        f"--NbExchange.s3_endpoint_url={server.url}",
        f"--NbExchange.s3_bucket={new_bucket_name()}",
        f"--NbExchange.s3_prefix={prefix}",
        "--NbExchange.s3_addressing_style=path",
        "--NbExchange.s3_create_bucket=True",
    ]
