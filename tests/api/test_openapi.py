"""The OpenAPI file: a valid document listing exactly the routes the server has, in the shapes it answers."""

from __future__ import annotations

import importlib.resources
import re
from typing import Any

import jsonschema
import pytest
import requests
import yaml
from builders import make_archive
from tornado import web

from nbexchange.api import default_handlers
from nbexchange.api.uploads import UploadHandler

METHODS = ("get", "post", "put", "patch", "delete", "head", "options")
COURSE = "phys101"


def load_spec() -> dict[str, Any]:
    # Loaded as package data, so a wheel without the file fails here too.
    text = (importlib.resources.files("nbexchange.api") / "openapi.yaml").read_text(encoding="utf-8")
    spec: dict[str, Any] = yaml.safe_load(text)
    return spec


SPEC = load_spec()


def documented_operations() -> set[tuple[str, str]]:
    return {(path, method) for path, item in SPEC["paths"].items() for method in item if method in METHODS}


def served_operations() -> set[tuple[str, str]]:
    """(path, method) for every method a routed handler implements, itself or through its bases."""
    served = set()
    for route, handler in default_handlers:
        for method in METHODS:
            # tornado's own stubs answer 405; anything else is a real implementation.
            if getattr(handler, method) is not getattr(web.RequestHandler, method):
                served.add(("/" + route, method))
    return served


def handler_for(path: str) -> type[web.RequestHandler]:
    return dict(("/" + route, handler) for route, handler in default_handlers)[path]


def deref(node: Any) -> Any:
    """``node`` with every local ``$ref`` replaced by what it points at (siblings kept)."""
    if isinstance(node, list):
        return [deref(item) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target: Any = SPEC
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        merged = {**deref(target), **{k: deref(v) for k, v in node.items() if k != "$ref"}}
        return merged
    return {key: deref(value) for key, value in node.items()}


def operation(path: str, method: str) -> dict[str, Any]:
    op: dict[str, Any] = deref(SPEC["paths"][path][method])
    return op


def needs_token(op: dict[str, Any]) -> bool:
    """Whether every security alternative of the operation needs the token (``{}`` is "none")."""
    security = op.get("security", SPEC["security"])
    return bool(security) and all(alternative for alternative in security)


def json_schema(path: str, method: str, status: int) -> dict[str, Any]:
    responses = operation(path, method)["responses"]
    response = responses.get(str(status)) or responses["default"]
    schema: dict[str, Any] = response["content"]["application/json"]["schema"]
    return schema


def conforms(response: requests.Response, path: str, method: str) -> dict[str, Any]:
    """Assert the answer is JSON in the documented schema for its status; return its body."""
    assert response.headers["Content-Type"].startswith("application/json"), (path, method, response.text)
    body: dict[str, Any] = response.json()
    jsonschema.Draft202012Validator(json_schema(path, method, response.status_code)).validate(body)
    return body


# -- the document itself ---------------------------------------------------------


def test_document_is_valid_openapi_3_1():
    try:
        from openapi_spec_validator import validate
    except ImportError:  # not a test dependency: the checks below stand alone
        validate = None
    if validate is not None:
        validate(SPEC)

    assert SPEC["openapi"].startswith("3.1.")
    assert SPEC["info"]["title"] == "nbexchange" and SPEC["info"]["version"]
    assert SPEC["servers"][0]["url"] == "/services/nbexchange"
    scheme = SPEC["components"]["securitySchemes"]["token"]
    assert (scheme["type"], scheme["in"], scheme["name"]) == ("apiKey", "header", "Authorization")
    assert "token <token>" in scheme["description"]
    ids = [SPEC["paths"][p][m]["operationId"] for p, m in documented_operations()]
    assert len(ids) == len(set(ids)), "operationIds must be unique"

    # Every local reference resolves (deref raises KeyError otherwise).
    refs = re.findall(r"\$ref: ['\"]?(#/[^'\"\s}]+)", yaml.safe_dump(SPEC))
    assert refs
    for ref in refs:
        deref({"$ref": ref})


def test_documented_routes_are_exactly_the_routes_served():
    documented, served = documented_operations(), served_operations()
    assert documented - served == set(), "documented but not served"
    assert served - documented == set(), "served but not documented"
    assert ("/assignment", "delete") in served and ("/feedback", "post") in served


@pytest.mark.parametrize("path, method", sorted(served_operations()))
def test_each_operation_documents_its_refusals(path, method):
    op = operation(path, method)
    statuses = set(op["responses"])
    handler = handler_for(path)
    errors = {s for s in statuses if s.isdigit() and int(s) >= 400} | ({"default"} & statuses)
    for status in errors:
        body = op["responses"][status]["content"]["application/json"]["schema"]
        assert body["required"] == ["success", "note"] and body["properties"]["success"] == {"const": False}
    names = {p["name"] for p in op.get("parameters", [])}
    if needs_token(op):
        assert {"400", "401", "403", "503"} <= statuses
        assert "course_id" in names
    if method in ("post", "delete") or handler.route_name in ("assignment", "collection") or path == "/feedback":
        # Every write, downloads included, may be retried safely with a key.
        assert "Idempotency-Key" in names and "409" in statuses
    if "503" in statuses:
        assert "Retry-After" in op["responses"]["503"]["headers"]
    if method == "post" and issubclass(handler, UploadHandler):
        assert {"201", "200", "413", "415", "429", "503", "507"} <= statuses
        assert "Retry-After" in op["responses"]["429"]["headers"]
        form = op["requestBody"]["content"]["multipart/form-data"]["schema"]
        assert form["required"] == [handler.file_field]
        assert set(form["properties"]) == {handler.file_field, *handler.list_fields}


def test_downloads_are_documented_as_gzip_with_their_position():
    for path in ("/assignment", "/collection"):
        ok = operation(path, "get")["responses"]["200"]
        assert "application/gzip" in ok["content"]
        assert "X-Nbexchange-Position" in ok["headers"]


# -- the document against a live server ------------------------------------------


@pytest.mark.parametrize("path, method", sorted(documented_operations()))
def test_each_documented_operation_is_served(svc, path, method):
    """Without credentials: 401 JSON where the document asks for a token, 200 where it does not."""
    response = requests.request(method.upper(), svc.url + path.lstrip("/"), timeout=10)
    if needs_token(operation(path, method)):
        assert response.status_code == 401, response.text
        body = conforms(response, path, method)
        assert "token" in body["note"]
    else:
        assert response.status_code == 200, response.text


def test_answers_have_the_documented_shapes(svc):
    """One of each operation, as the user allowed to do it; every body checked against its schema."""

    def call(method: str, route: str, who: str | None, status: int, params=None, files=None, data=None):
        response = requests.request(
            method.upper(),
            svc.url + route.lstrip("/"),
            params=params,
            headers=svc.headers(who) if who else {},
            files=files,
            data=data,
            timeout=30,
        )
        assert response.status_code == status, response.text
        if response.headers["Content-Type"] == "application/gzip":
            assert "application/gzip" in operation(route, method)["responses"][str(status)]["content"]
            assert int(response.headers["X-Nbexchange-Position"]) >= 1
            return response
        return conforms(response, route, method)

    course = {"course_id": COURSE}
    ids = {**course, "assignment_id": "ps-openapi"}
    archive = {"assignment": ("a.tar.gz", make_archive())}
    released = call("post", "/assignment", "ada", 201, ids, files=archive, data={"notebooks": "nb1"})
    assert released["note"] == "Released"
    items = call("get", "/assignments", "s1", 200, {**course, "min_position": released["position"]})["value"]
    assert any(i["assignment_id"] == "ps-openapi" and i["status"] == "released" for i in items)
    call("get", "/assignment", "s1", 200, ids)
    stamp = "2026-01-31 23:59:59.123456 UTC"
    sent = call("post", "/submission", "s1", 201, {**ids, "timestamp": stamp}, files=archive)
    subs = call("get", "/collections", "ada", 200, {**ids, "min_position": sent["position"]})["value"]
    assert [s["timestamp"] for s in subs] == [stamp]
    call("get", "/collection", "ada", 200, {**ids, "path": subs[0]["path"]})
    feedback = {"feedback": ("nb1.html", b"<html>good</html>")}
    on = {**ids, "notebook": "nb1", "student": "s1", "timestamp": stamp, "checksum": "c1"}
    given = call("post", "/feedback", "ada", 201, on, files=feedback)
    after = {"min_position": given["position"]}
    fetched = call("get", "/feedback", "s1", 200, {**ids, **after})
    assert [f["filename"] for f in fetched["feedback"]] == ["nb1.html"]
    mine = call("get", "/assignments", "s1", 200, {**course, "min_position": fetched["position"]})["value"]
    assert {"fetched", "submitted", "feedback_fetched"} <= {i["status"] for i in mine}
    history = call("get", "/history", "ada", 200, {**course, **after})["value"]
    assert history[0]["course_id"] == COURSE and history[0]["role"] == "Instructor"
    page = call("get", "/events", "ada", 200, {**course, "limit": 1000})
    assert page["value"] and page["next_after"] == page["value"][-1]["position"]
    gone = call("delete", "/assignment", "ada", 200, {**ids, "purge": "true"})
    assert gone["note"] == "Unreleased and purged"
    assert call("get", "/health", None, 200)["status"] == "ok"
    assert call("get", "/ready", None, 200)["projection_lag"] >= 0

    # Refusals are in the documented error shape too.
    assert "Instructor" in call("get", "/events", "s1", 403, course)["note"]
    gone_at = {"min_position": gone["position"]}
    assert "not released" in call("get", "/assignment", "s1", 404, {**ids, **gone_at})["note"]
    assert "required" in call("get", "/collections", "ada", 400, course)["note"]
