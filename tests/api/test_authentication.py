"""401s and 403s that say what to fix: no token, a header of another form and a refused token differ.

Every route that needs a user answers 401 with ``WWW-Authenticate: token``; under
JupyterHub a 403 says that course roles come from hub groups, re-read every
``cache_ttl`` seconds.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
import requests
from httpclient import COURSE, get, ok, refused
from service import TEST_BROKER_URL, Service, drop_db, fresh_db_url, start_service
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application, RequestHandler

from nbexchange.identity import JupyterHubPlugin

ROUTES = [
    ("GET", "assignments"),
    ("GET", "assignment"),
    ("POST", "assignment"),
    ("DELETE", "assignment"),
    ("POST", "submission"),
    ("GET", "collections"),
    ("GET", "collection"),
    ("GET", "feedback"),
    ("POST", "feedback"),
    ("GET", "history"),
    ("GET", "events"),
]

CASES = {
    "no header": ({}, "No API token was sent"),
    "empty header": ({"Authorization": ""}, "No API token was sent"),
    "basic auth": ({"Authorization": "Basic YWRhOnNlY3JldA=="}, "not of the form 'token"),
    "scheme without a token": ({"Authorization": "token"}, "not of the form 'token"),
    "token with spaces": ({"Authorization": "token a b"}, "not of the form 'token"),
    "wrong token": ({"Authorization": "token not-a-real-token"}, "was not accepted"),
    "wrong bearer token": ({"Authorization": "Bearer not-a-real-token"}, "was not accepted"),
}


@pytest.mark.hostile(
    "Authentication",
    "every route (GET, POST, DELETE) with no Authorization header, an empty one, Basic credentials, a scheme with "
    "no token, a token with spaces, a wrong token or a wrong Bearer token",
    "401 with WWW-Authenticate: token; the note says which: no token sent, a header of another form, or a token "
    "not accepted",
)
@pytest.mark.parametrize("method, route", ROUTES)
def test_every_route_says_why_it_answers_401(svc, method, route):
    for case, (headers, words) in CASES.items():
        answer = requests.request(method, svc.url + route, params={"course_id": COURSE}, headers=headers, timeout=10)
        body = refused(answer, 401, words)
        assert answer.headers.get("WWW-Authenticate") == "token", case
        assert "not-a-real-token" not in body["note"]


def test_a_403_from_the_users_file_has_no_hub_hint(svc):
    answer = get(svc, "assignments", "stranger", course_id=COURSE)
    assert "JupyterHub" not in refused(answer, 403, "not a member")["note"]
    assert "WWW-Authenticate" not in answer.headers


# -- under JupyterHub --------------------------------------------------------------------------

HUB_USERS = {
    "s1-token": {"kind": "user", "name": "s1", "groups": ["nbgrader-phys101"]},
    "ada-token": {"kind": "user", "name": "ada", "groups": ["formgrade-phys101"]},
}


class HubUser(RequestHandler):
    """``GET /hub/api/user`` as JupyterHub answers it: the token's owner, or 403 for a token it does not know."""

    def get(self) -> None:
        scheme, _, token = self.request.headers.get("Authorization", "").partition(" ")
        model = HUB_USERS.get(token) if scheme == "token" else None
        if model is None:
            self.set_status(403)
            self.write({"status": 403, "message": "Missing or invalid credentials."})
        else:
            self.write(model)


@pytest.fixture(scope="module")
def hub() -> Iterator[str]:
    """A stand-in hub on a real port, served from a thread of its own; its API URL."""
    sockets = bind_sockets(0, "127.0.0.1")
    port = sockets[0].getsockname()[1]
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        server = HTTPServer(Application([(r"/hub/api/user", HubUser)]))
        server.add_sockets(sockets)
        loop.call_soon(ready.set)
        loop.run_forever()
        server.stop()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    ready.wait(10)
    yield f"http://127.0.0.1:{port}/hub/api"
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


@pytest.fixture(scope="module")
def hub_svc(hub: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("hub-exchange")
    url, token = fresh_db_url(root)
    flags = [
        "--NbExchange.user_plugin_class=nbexchange.identity.JupyterHubPlugin",
        f"--JupyterHubPlugin.hub_api_url={hub}",
        "--JupyterHubPlugin.api_token=service-token",
        "--JupyterHubPlugin.cache_ttl=45",
    ]
    service = start_service(root, {}, db_url=url, broker_url=TEST_BROKER_URL, extra=flags)
    service.tokens.update({model["name"]: token for token, model in HUB_USERS.items()})
    yield service
    service.stop()
    drop_db(token)


@pytest.mark.hostile(
    "Authentication",
    "under JupyterHub, a user asking for a course they hold no hub group of, and a student asking for an "
    "Instructor's route",
    "403 whose note adds that roles come from formgrade-<course>/nbgrader-<course> groups, refreshed every "
    "cache_ttl seconds",
)
def test_a_403_under_jupyterhub_says_groups_are_refreshed_every_cache_ttl(hub_svc):
    assert ok(get(hub_svc, "assignments", "s1", course_id=COURSE))["value"] == []
    for answer in (
        get(hub_svc, "assignments", "s1", course_id="chem202"),
        get(hub_svc, "events", "s1", course_id=COURSE),
        get(hub_svc, "collections", "s1", course_id=COURSE, assignment_id="ps1"),
    ):
        refused(answer, 403, "JupyterHub groups", "formgrade-<course>", "nbgrader-<course>", "every 45 seconds")


def test_under_jupyterhub_a_refused_token_and_no_token_differ(hub_svc):
    refused(requests.get(hub_svc.url + "assignments", params={"course_id": COURSE}, timeout=10), 401, "No API token")
    wrong = requests.get(
        hub_svc.url + "assignments", params={"course_id": COURSE}, headers={"Authorization": "token nope"}, timeout=10
    )
    refused(wrong, 401, "was not accepted")
    assert wrong.headers["WWW-Authenticate"] == "token"


def test_the_hub_hint_follows_cache_ttl():
    assert "every 2.5 seconds" in JupyterHubPlugin(cache_ttl=2.5).explain_forbidden("No.")
    assert "on every request" in JupyterHubPlugin(cache_ttl=0).explain_forbidden("No.")
