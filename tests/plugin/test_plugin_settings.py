"""Where the plugin finds the service and its token: configuration, then the environment, then JupyterHub."""

from __future__ import annotations

import socket

import pytest
from nbgrader.coursedir import CourseDirectory
from nbgrader.exchange.abc import ExchangeError

from nbexchange.plugin import Exchange

VARIABLES = (
    "NBEX_SERVICE_URL",
    "NBEX_API_TOKEN",
    "JUPYTERHUB_API_URL",
    "JUPYTERHUB_BASE_URL",
    "JUPYTERHUB_API_TOKEN",
    "JUPYTERHUB_PUBLIC_HUB_URL",
)


@pytest.fixture
def environment(monkeypatch):
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_without_settings_the_service_is_local_and_there_is_no_token(environment):
    exchange = Exchange()
    assert exchange.service_url == "http://127.0.0.1:9000/services/nbexchange/"
    assert exchange.api_token == ""


def test_under_jupyterhub_the_token_is_the_servers_and_the_service_is_behind_the_hubs_public_url(environment, stub):
    environment.setenv("JUPYTERHUB_API_URL", stub.url)  # never asked: the public URL is enough
    environment.setenv("JUPYTERHUB_BASE_URL", "/jhub/")
    environment.setenv("JUPYTERHUB_PUBLIC_HUB_URL", "https://hub.example.org/jhub/hub/")
    environment.setenv("JUPYTERHUB_API_TOKEN", "hub-token")
    exchange = Exchange()
    assert exchange.service_url == "https://hub.example.org/jhub/services/nbexchange/"
    assert exchange.api_token == "hub-token"
    assert Exchange(service_name="exchange-2").service_url == "https://hub.example.org/jhub/services/exchange-2/"

    environment.delenv("JUPYTERHUB_BASE_URL")
    assert Exchange().service_url == "https://hub.example.org/services/nbexchange/"
    assert stub.seen == []


def test_without_a_public_url_the_hubs_record_of_the_service_gives_its_address(environment, stub):
    hub_api = stub.url.replace("/services/nbexchange/", "/jhub/hub/api")
    environment.setenv("JUPYTERHUB_API_URL", hub_api)
    environment.setenv("JUPYTERHUB_API_TOKEN", "hub-token")
    record = {"kind": "service", "name": "nbexchange", "url": "http://10.0.0.5:9000/", "prefix": "/jhub/services/x/"}
    stub.answers = [(200, {}, record)]

    assert Exchange().service_url == "http://10.0.0.5:9000/jhub/services/x/"
    (asked,) = stub.seen
    assert asked["path"] == "/jhub/hub/api/services/nbexchange"
    assert asked["headers"]["Authorization"] == "token hub-token"
    # Known once, not asked again (nbgrader's server extension builds an exchange per request).
    assert Exchange().service_url == "http://10.0.0.5:9000/jhub/services/x/"
    assert len(stub.seen) == 1


HUB_REFUSALS = [
    # What JupyterHub answers a server token without read:services.
    pytest.param(403, {"status": 403, "message": "Action is not authorized with current scopes"}, id="403"),
    pytest.param(404, {"status": 404, "message": "No such service: nbexchange"}, id="no-such-service"),
    # read:services:name only: a model without the address.
    pytest.param(200, {"kind": "service", "name": "nbexchange", "admin": False}, id="name-only"),
    pytest.param(200, b"<!DOCTYPE html><html><body>Hub</body></html>", id="html"),
    pytest.param(200, {"kind": "service", "url": 5, "prefix": ["x"]}, id="malformed"),
]


@pytest.mark.parametrize(("status", "answer"), HUB_REFUSALS)
def test_a_hub_that_does_not_give_the_address_fails_the_command_saying_what_to_set(environment, stub, status, answer):
    environment.setenv("JUPYTERHUB_API_URL", stub.url + "hub/api")
    environment.setenv("JUPYTERHUB_API_TOKEN", "hub-token")
    stub.answers = [(status, {"Content-Type": "text/html"} if isinstance(answer, bytes) else {}, answer)]
    exchange = Exchange(coursedir=CourseDirectory())
    assert exchange.service_url == ""
    with pytest.raises(ExchangeError) as failure:
        exchange.start()
    message = str(failure.value)
    assert f"answered HTTP {status} without the service's address" in message
    assert "NBEX_SERVICE_URL" in message and "read:services!service=nbexchange" in message
    assert "<" not in message

    # A refusal is not remembered: once the hub gives the address, it is used.
    stub.answers = [(200, {}, {"url": "http://exchange:9000", "prefix": "/services/nbexchange/"})]
    assert Exchange().service_url == "http://exchange:9000/services/nbexchange/"


def test_a_hub_that_cannot_be_reached_fails_the_command_saying_so(environment):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    environment.setenv("JUPYTERHUB_API_URL", f"http://127.0.0.1:{port}/hub/api")
    environment.setenv("JUPYTERHUB_API_TOKEN", "hub-token")
    with pytest.raises(ExchangeError, match=r"JupyterHub at .* cannot be reached to find the exchange \(Connection"):
        Exchange(coursedir=CourseDirectory()).start()


def test_nbex_variables_win_over_jupyterhubs_and_configuration_over_both(environment):
    environment.setenv("JUPYTERHUB_API_URL", "http://hub:8081/hub/api")
    environment.setenv("JUPYTERHUB_API_TOKEN", "hub-token")
    environment.setenv("NBEX_SERVICE_URL", "http://exchange:9000/services/nbexchange/")
    environment.setenv("NBEX_API_TOKEN", "exchange-token")
    exchange = Exchange()
    assert exchange.service_url == "http://exchange:9000/services/nbexchange/"
    assert exchange.api_token == "exchange-token"

    configured = Exchange(service_url="http://elsewhere/services/nbexchange/", api_token="configured")
    assert (configured.service_url, configured.api_token) == ("http://elsewhere/services/nbexchange/", "configured")
