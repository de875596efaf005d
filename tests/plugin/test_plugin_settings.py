"""Where the plugin finds the service and its token: configuration, then the environment, then JupyterHub's."""

from __future__ import annotations

import pytest

from nbexchange.plugin import Exchange

VARIABLES = ("NBEX_SERVICE_URL", "NBEX_API_TOKEN", "JUPYTERHUB_API_URL", "JUPYTERHUB_BASE_URL", "JUPYTERHUB_API_TOKEN")


@pytest.fixture
def environment(monkeypatch):
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_without_settings_the_service_is_local_and_there_is_no_token(environment):
    exchange = Exchange()
    assert exchange.service_url == "http://127.0.0.1:9000/services/nbexchange/"
    assert exchange.api_token == ""


def test_under_jupyterhub_the_service_is_on_the_hub_and_the_token_is_the_servers(environment):
    environment.setenv("JUPYTERHUB_API_URL", "http://hub:8081/jhub/hub/api")
    environment.setenv("JUPYTERHUB_BASE_URL", "/jhub/")
    environment.setenv("JUPYTERHUB_API_TOKEN", "hub-token")
    exchange = Exchange()
    assert exchange.service_url == "http://hub:8081/jhub/services/nbexchange/"
    assert exchange.api_token == "hub-token"

    environment.delenv("JUPYTERHUB_BASE_URL")
    assert Exchange().service_url == "http://hub:8081/services/nbexchange/"


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
