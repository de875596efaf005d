"""A server that speaks the S3 protocol on loopback (moto's server mode), for the S3 archive store's tests.

``NBEX_TEST_BLOB_STORE=s3`` makes every live service of the suite keep its
archives there (``tests/service.py``), each in a bucket of its own.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import tempfile
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
