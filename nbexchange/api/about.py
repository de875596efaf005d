"""The prefix itself, the OpenAPI document and its rendered page: what the service is, for people and for the hub."""

from __future__ import annotations

import html
import importlib.metadata
import importlib.resources
import json
from functools import cache
from typing import Any

import yaml

from nbexchange.api.base import BaseHandler

#: Where the document and its page are served, relative to ``base_url``.
OPENAPI_YAML = "openapi.yaml"
OPENAPI_JSON = "openapi.json"
API_PAGE = "api"

METHODS = ("get", "post", "put", "patch", "delete")


def version() -> str:
    """The installed distribution's version (``unknown`` when run from a bare source tree)."""
    try:
        return importlib.metadata.version("nbexchange")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


@cache
def _packaged_document() -> dict[str, Any]:
    """The OpenAPI document shipped with the package, read once."""
    text = (importlib.resources.files("nbexchange.api") / OPENAPI_YAML).read_text(encoding="utf-8")
    document: dict[str, Any] = yaml.safe_load(text)
    return document


@cache
def openapi_document(base_url: str) -> dict[str, Any]:
    """The OpenAPI document with its server's URL set to where this service answers."""
    document = dict(_packaged_document())
    server = dict(document["servers"][0])
    server["url"] = base_url.rstrip("/")
    document["servers"] = [server, *document["servers"][1:]]
    return document


@cache
def openapi_text(base_url: str, form: str) -> str:
    """The document as YAML or JSON text, made once per process."""
    document = openapi_document(base_url)
    if form == "json":
        return json.dumps(document, indent=2, ensure_ascii=False)
    return str(yaml.safe_dump(document, sort_keys=False, allow_unicode=True, width=100))


def _answer(response: Any) -> str:
    """A response's description, or the name of the shared response it refers to."""
    if not isinstance(response, dict):
        return ""
    if "description" in response:
        return str(response["description"])
    return str(response.get("$ref", "")).rsplit("/", 1)[-1]


@cache
def api_page(base_url: str) -> str:
    """A self-contained HTML page of the document's operations (no scripts, nothing fetched from elsewhere)."""
    document = openapi_document(base_url)
    info = document["info"]
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{esc(info['title'])} API</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;"
        "line-height:1.45}code,pre{background:#f4f4f4;padding:.1rem .3rem}section{border-top:1px solid #ccc;"
        "padding:.5rem 0}.m{display:inline-block;min-width:4.5rem;font-weight:bold;text-transform:uppercase}"
        "table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:.2rem .5rem;text-align:left;"
        "vertical-align:top}</style></head><body>",
        f"<h1>{esc(info['title'])} API <small>v{esc(str(info['version']))}</small></h1>",
        f"<p>{esc(info.get('summary', ''))}</p>",
        f"<pre>{esc(info.get('description', ''))}</pre>",
        f"<p>Base URL: <code>{esc(base_url)}</code>. Machine-readable: "
        f'<a href="{esc(base_url + OPENAPI_YAML)}">{OPENAPI_YAML}</a>, '
        f'<a href="{esc(base_url + OPENAPI_JSON)}">{OPENAPI_JSON}</a>.</p>',
    ]
    for path, item in document["paths"].items():
        for method in METHODS:
            op = item.get(method)
            if not isinstance(op, dict):
                continue
            token = "no token" if op.get("security") == [] else "token"
            parts.append(
                f'<section id="{esc(op.get("operationId", ""))}"><h2><span class="m">{method}</span>'
                f"<code>{esc(path)}</code></h2><p>{esc(op.get('summary', ''))} <em>({token})</em></p>"
            )
            if op.get("description"):
                parts.append(f"<p>{esc(op['description'])}</p>")
            parameters = [p for p in op.get("parameters", []) if isinstance(p, dict) and "name" in p]
            if parameters:
                parts.append("<table><tr><th>parameter</th><th>in</th><th>required</th><th>meaning</th></tr>")
                for p in parameters:
                    parts.append(
                        f"<tr><td><code>{esc(p['name'])}</code></td><td>{esc(p.get('in', ''))}</td>"
                        f"<td>{'yes' if p.get('required') else ''}</td><td>{esc(p.get('description', ''))}</td></tr>"
                    )
                parts.append("</table>")
            responses = op.get("responses", {}).items()
            answers = ", ".join(f"{esc(str(status))} {esc(_answer(response))}" for status, response in responses)
            parts.append(f"<p>Answers: {answers}</p></section>")
    parts.append("</body></html>")
    return "\n".join(parts)


class _Described(BaseHandler):
    """A route about the API itself: served to anyone, and knows the prefix it is served under."""

    auth_required = False
    #: This route, relative to ``base_url``.
    route = ""

    @property
    def base_url(self) -> str:
        """The service's prefix, as this request reached it (``base_url`` ends every route's regex)."""
        return self.request.path[: len(self.request.path) - len(self.route)]


class AboutHandler(_Described):
    """``GET <base_url>``: what this service is. JupyterHub polls the service's URL; this answers it."""

    route_name = "about"

    def get(self) -> None:
        """The service's name and version, and where its API is described."""
        self.answer(
            {
                "name": "nbexchange",
                "version": version(),
                "api_version": str(_packaged_document()["info"]["version"]),
                "openapi": self.base_url + OPENAPI_YAML,
                "documentation": self.base_url + API_PAGE,
            }
        )


class OpenApiYamlHandler(_Described):
    """``GET <base_url>openapi.yaml``: the API's contract."""

    route_name = "openapi"
    route = OPENAPI_YAML
    content_type = "application/yaml"

    def get(self) -> None:
        """The OpenAPI document, its server's URL set to this service's prefix."""
        self.set_header("Content-Type", f"{self.content_type}; charset=UTF-8")
        self.finish(openapi_text(self.base_url, self.route.rsplit(".", 1)[-1]))


class OpenApiJsonHandler(OpenApiYamlHandler):
    """``GET <base_url>openapi.json``: the same document as JSON."""

    route = OPENAPI_JSON
    content_type = "application/json"


class ApiPageHandler(_Described):
    """``GET <base_url>api``: the OpenAPI document as a page to read."""

    route_name = "api"
    route = API_PAGE

    def get(self) -> None:
        """The rendered page (self-contained: no network needed)."""
        self.set_header("Content-Type", "text/html; charset=UTF-8")
        self.finish(api_page(self.base_url))


default_handlers = [
    (handler.route, handler) for handler in (AboutHandler, OpenApiYamlHandler, OpenApiJsonHandler, ApiPageHandler)
]
