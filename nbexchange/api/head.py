"""``head``: the log's last position, hash and time, for anyone keeping anchors outside the exchange."""

from __future__ import annotations

from nbexchange.anchors import log_head
from nbexchange.api.base import BaseHandler


class HeadHandler(BaseHandler):
    route_name = "head"

    @property
    def auth_required(self) -> bool:  # type: ignore[override]
        # As public as the metrics, which publish the same head.
        return bool(self.settings["metrics_require_auth"])

    async def get(self) -> None:
        """The log's head: ``position``, ``hash`` and ``recorded_at`` of its last event."""
        head = await self.run(log_head, self.runtime.store)
        self.answer(head)


default_handlers = [(r"head", HeadHandler)]
