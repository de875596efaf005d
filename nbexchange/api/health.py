"""``health``, ``ready`` and ``metrics``: for load balancers, orchestrators and Prometheus."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from nbexchange.api.base import BaseHandler
from nbexchange.errors import Unavailable
from nbexchange.projections import NAMES, lag


class HealthHandler(BaseHandler):
    route_name = "health"
    auth_required = False

    def get(self) -> None:
        """The process is up."""
        self.answer({"status": "ok"})


class ReadyHandler(BaseHandler):
    route_name = "ready"
    auth_required = False

    async def get(self) -> None:
        """Database and broker reachable; how far projections lag the log."""
        runtime = self.settings["runtime"]
        try:
            behind = await self.run(lag, runtime.engine, NAMES)
        except Unavailable as e:
            raise Unavailable(f"The database is unreachable: {e.note}") from e
        if not await self.run(runtime.broker_reachable):
            raise Unavailable("The message broker is unreachable.")
        self.answer({"database": "ok", "broker": "ok", "projection_lag": behind})


class MetricsHandler(BaseHandler):
    route_name = "metrics"

    @property
    def auth_required(self) -> bool:  # type: ignore[override]
        return bool(self.settings["metrics_require_auth"])

    async def get(self) -> None:
        """Prometheus exposition of this process's metrics."""
        body = await self.run(generate_latest)
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(body)


default_handlers = [(r"health", HealthHandler), (r"ready", ReadyHandler), (r"metrics", MetricsHandler)]
