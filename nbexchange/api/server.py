"""The tornado application and the ``nbexchange`` (serve) command's process."""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY
from tornado import web
from tornado.netutil import bind_sockets

from nbexchange.anchors import Anchorer, HeadCollector
from nbexchange.api import default_handlers
from nbexchange.api.base import NotFoundHandler
from nbexchange.api.connection import JSONErrorHTTPServer
from nbexchange.api.uploads import UploadSlots
from nbexchange.exchange import Exchange
from nbexchange.identity.base import UserPlugin
from nbexchange.metrics import StateCollector
from nbexchange.projections import NAMES, lag
from nbexchange.runtime import Runtime
from nbexchange.storage import CHUNK_SIZE
from nbexchange.tuning import tune_gc
from nbexchange.workers.app import BUSY_FILL, EmbeddedWorker, Sweeper, shown_url

if TYPE_CHECKING:
    from nbexchange.app import NbExchange

log = logging.getLogger(__name__)


def make_app(
    settings: NbExchange, runtime: Runtime, user_plugin: UserPlugin, executor: ThreadPoolExecutor
) -> web.Application:
    """The tornado application: every route under ``base_url``, JSON errors everywhere."""
    base = settings.base_url
    handlers: list[Any] = [(base + route, handler) for route, handler in default_handlers]
    return web.Application(
        handlers,
        default_handler_class=NotFoundHandler,
        exchange=Exchange(runtime, settings.consistency_timeout, settings.max_clock_skew),
        runtime=runtime,
        archives=runtime.archives,
        user_plugin=user_plugin,
        executor=executor,
        max_upload_size=settings.max_upload_size,
        max_feedback_size=settings.max_feedback_size,
        max_body_size=settings.max_body_size,
        upload_timeout=settings.upload_timeout,
        upload_stall_timeout=settings.upload_stall_timeout,
        upload_slots=UploadSlots(settings.max_uploads_per_user, settings.max_uploads_total),
        metrics_require_auth=settings.metrics_require_auth,
        log_function=_log_request,
    )


def _log_request(handler: web.RequestHandler) -> None:
    status = handler.get_status()
    level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    log.log(
        level,
        "%d %s %s %.1fms",
        status,
        handler.request.method,
        handler.request.path,
        1000 * handler.request.request_time(),
    )


_collector: StateCollector | None = None


def _register_collector(runtime: Runtime) -> None:
    global _collector
    if _collector is None:
        _collector = StateCollector(lambda: lag(runtime.engine, NAMES), runtime.queue_depth)
        REGISTRY.register(_collector)
        REGISTRY.register(HeadCollector(runtime.store))


def serve(settings: NbExchange) -> None:
    """Run the API until SIGTERM or SIGINT; in the embedded default, the workers too."""
    # Identity first: a service that must refuse to start does so before touching the database.
    user_plugin = settings.make_user_plugin()
    runtime = Runtime(settings)
    executor = ThreadPoolExecutor(settings.executor_threads, thread_name_prefix="nbexchange-io")
    worker = sweeper = None
    hold = settings.check_hold_seconds
    if hold > 0 and hold + BUSY_FILL >= settings.sweep_grace:
        log.warning(
            "check_defer_max (%s s) is not below sweep_grace (%s s) by %s s, the longest a held check "
            "waits more to fill its message: the sweep may check held archives itself, doing the work twice",
            hold,
            settings.sweep_grace,
            BUSY_FILL,
        )
    if settings.embedded:
        worker = EmbeddedWorker(runtime.celery, settings.worker_concurrency)
        worker.start()
        sweeper = Sweeper(runtime, settings.sweep_interval)
        sweeper.start()
    _register_collector(runtime)
    anchorer = None
    if settings.anchor_interval > 0 and (settings.anchor_file or settings.anchor_url):
        anchorer = Anchorer(runtime.store, settings.anchor_interval, settings.anchor_file, settings.anchor_url)
        anchorer.start()
    app = make_app(settings, runtime, user_plugin, executor)

    async def main() -> None:
        # 1 MiB body chunks, not tornado's 64 KiB: a quarter of the per-chunk work on
        # the accept path (measured +48 % accepted/s in bench/deadline.py).
        server = JSONErrorHTTPServer(
            app,
            xheaders=True,
            chunk_size=CHUNK_SIZE,
            # A read buffer of a few chunks; what bounds a request's body is max_body_size.
            max_buffer_size=8 * CHUNK_SIZE,
            max_body_size=settings.max_body_size,
            max_header_size=settings.max_header_size,
            idle_connection_timeout=settings.idle_connection_timeout,
            body_timeout=settings.body_timeout,
        )
        server.add_sockets(bind_sockets(settings.port, settings.ip, reuse_port=settings.reuse_port))
        embedded = "embedded (in-process broker and worker)"
        mode = embedded if settings.embedded else f"broker {shown_url(settings.broker_url)}"
        log.info("nbexchange listening on http://%s:%d%s, %s", settings.ip, settings.port, settings.base_url, mode)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("Stopping: no new connections; finishing requests in flight")
        server.stop()
        await server.close_all_connections()

    tune_gc()
    try:
        asyncio.run(main())
    finally:
        if anchorer:
            anchorer.stop()
        if sweeper:
            sweeper.stop()
        if worker:
            worker.stop()
        executor.shutdown(wait=True)
        runtime.close()
