"""nbgrader exchange plugin that keeps assignments, submissions and feedback in an nbexchange service."""

from nbgrader.exchange.abc import ExchangeError

from .collect import ExchangeCollect
from .exchange import Exchange
from .fetch_assignment import ExchangeFetchAssignment
from .fetch_feedback import ExchangeFetchFeedback
from .list import ExchangeList
from .release_assignment import ExchangeReleaseAssignment
from .release_feedback import ExchangeReleaseFeedback
from .submit import ExchangeSubmit

__all__ = [
    "Exchange",
    "ExchangeError",
    "ExchangeCollect",
    "ExchangeFetchAssignment",
    "ExchangeFetchFeedback",
    "ExchangeList",
    "ExchangeReleaseAssignment",
    "ExchangeReleaseFeedback",
    "ExchangeSubmit",
]
