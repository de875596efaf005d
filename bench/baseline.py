"""The accept path's practical limit on this machine: a bare tornado handler that streams uploads to disk and fsyncs.

``python bench/baseline.py --port P --folder DIR --fetch-file ARCHIVE``

No database, no parsing, no hashing, no authentication: the body goes to a
fresh file as it arrives, is fsync'd (in a thread, as the service does), and
the answer is a small JSON. ``GET .../assignment`` sends ``ARCHIVE``, as the
service's fetch does, so a student's visit costs the same round trips in both.
Same tornado, same executor size, same buffer limits as the service.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tornado import web
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets

BASE = "/services/nbexchange/"


@web.stream_request_body
class UploadHandler(web.RequestHandler):
    def prepare(self) -> None:
        if self.request.method != "POST":
            return
        self.request.connection.set_max_body_size(8 * 1024**3)  # type: ignore[union-attr]
        fd, name = tempfile.mkstemp(prefix="upload-", dir=self.settings["folder"])
        self.file = os.fdopen(fd, "wb")

    def data_received(self, chunk: bytes) -> None:
        self.file.write(chunk)

    async def post(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self.settings["executor"], _fsync_close, self.file)
        self.counter = self.settings["counter"]
        self.counter[0] += 1
        self.set_status(201)
        self.set_header("Content-Type", "application/json; charset=UTF-8")
        self.finish(json.dumps({"success": True, "note": "Submitted", "position": self.counter[0]}))

    def on_connection_close(self) -> None:
        file = getattr(self, "file", None)
        if file is not None:
            file.close()


def _fsync_close(file: object) -> None:
    file.flush()  # type: ignore[attr-defined]
    os.fsync(file.fileno())  # type: ignore[attr-defined]
    file.close()  # type: ignore[attr-defined]


class FetchHandler(web.RequestHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "application/gzip")
        self.finish(self.settings["fetch_bytes"])


class HealthHandler(web.RequestHandler):
    def get(self) -> None:
        self.finish({"success": True})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--fetch-file", type=Path, required=True)
    parser.add_argument("--executor-threads", type=int, default=64)
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    app = web.Application(
        [(BASE + "submission", UploadHandler), (BASE + "assignment", FetchHandler), (BASE + "health", HealthHandler)],
        folder=str(args.folder),
        executor=ThreadPoolExecutor(args.executor_threads),
        fetch_bytes=args.fetch_file.read_bytes(),
        counter=[0],
        log_function=lambda handler: None,
    )

    async def serve() -> None:
        server = HTTPServer(app, max_buffer_size=64 * 1024 * 1024)
        server.add_sockets(bind_sockets(args.port, "127.0.0.1"))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        server.stop()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
