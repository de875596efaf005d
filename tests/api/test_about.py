"""The prefix itself, the served OpenAPI document and its page: answered to anyone, on a live server."""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import json
import re
from html.parser import HTMLParser
from urllib.parse import urlsplit

import requests
import yaml

from nbexchange.api.about import openapi_text

PACKAGED = yaml.safe_load((importlib.resources.files("nbexchange.api") / "openapi.yaml").read_text(encoding="utf-8"))


def test_the_prefix_answers_what_the_service_is_without_a_token(svc):
    """JupyterHub checks a service's URL every minute: it gets a 200 and a small JSON, not a 404."""
    base = urlsplit(svc.url).path
    response = requests.get(svc.url, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json() == {
        "success": True,
        "name": "nbexchange",
        "version": importlib.metadata.version("nbexchange"),
        "api_version": str(PACKAGED["info"]["version"]),
        "openapi": base + "openapi.yaml",
        "documentation": base + "api",
    }
    # A token changes nothing, a wrong one included: the answer holds nothing private.
    assert requests.get(svc.url, headers={"Authorization": "token nonsense"}, timeout=10).status_code == 200
    # Routes under the prefix that do not exist are still JSON 404s.
    missing = requests.get(svc.url + "nothing-here", timeout=10)
    assert missing.status_code == 404 and missing.json()["success"] is False


def test_the_openapi_document_is_served_as_yaml_and_json_with_the_services_own_prefix(svc):
    base = urlsplit(svc.url).path
    as_yaml = requests.get(svc.url + "openapi.yaml", timeout=10)
    as_json = requests.get(svc.url + "openapi.json", timeout=10)
    assert as_yaml.status_code == as_json.status_code == 200
    assert as_yaml.headers["Content-Type"].startswith("application/yaml")
    assert as_json.headers["Content-Type"].startswith("application/json")
    document = yaml.safe_load(as_yaml.text)
    assert document == as_json.json()
    assert document["servers"][0]["url"] == base.rstrip("/")
    assert {**document, "servers": PACKAGED["servers"]} == PACKAGED


def test_the_document_names_the_prefix_the_service_runs_under():
    document = json.loads(openapi_text("/jhub/services/exchange-2/", "json"))
    assert document["servers"][0]["url"] == "/jhub/services/exchange-2"
    assert yaml.safe_load(openapi_text("/jhub/services/exchange-2/", "yaml")) == document


class _Page(HTMLParser):
    """Collects a page's section ids, links and anything that would load from elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.links: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "section" and values.get("id"):
            self.ids.add(str(values["id"]))
        if tag == "a" and values.get("href"):
            self.links.append(str(values["href"]))
        if tag in ("script", "link", "img", "iframe") or "src" in values:
            self.external.append(tag)


def test_the_api_page_lists_every_operation_and_loads_nothing_from_elsewhere(svc):
    response = requests.get(svc.url + "api", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/html")
    page = _Page()
    page.feed(response.text)
    operations = {
        op["operationId"] for item in PACKAGED["paths"].values() for op in item.values() if isinstance(op, dict)
    }
    assert page.ids == operations
    assert page.external == []  # no CDN: the hub's network may have no internet
    assert not re.search(r"https?://", " ".join(page.links))
    for link in page.links:  # the machine-readable forms it links to are served
        assert requests.get(f"{svc.url.split('/services/')[0]}{link}", timeout=10).status_code == 200
