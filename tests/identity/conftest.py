"""Fixtures for the identity tests: requests shaped as tornado hands them to a plugin."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from tornado.httputil import HTTPHeaders, HTTPServerRequest, RequestStartLine

RequestFactory = Callable[..., HTTPServerRequest]


@pytest.fixture
def make_request() -> RequestFactory:
    """A factory for GET requests with the given headers (e.g. ``Authorization="token abc"``)."""

    def make(**headers: str) -> HTTPServerRequest:
        start_line = RequestStartLine("GET", "/api/assignments?course_id=phys101", "HTTP/1.1")
        return HTTPServerRequest(start_line=start_line, headers=HTTPHeaders({"Host": "exchange.test", **headers}))

    return make
