"""JupyterHubPlugin against a stand-in hub: a real tornado server on a real port."""

from __future__ import annotations

import asyncio
import logging
import sys
import types
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from tornado.httpserver import HTTPServer
from tornado.httputil import HTTPServerRequest
from tornado.testing import bind_unused_port
from tornado.web import Application, RequestHandler, create_signed_value

from nbexchange.errors import Invalid, Unavailable
from nbexchange.identity import JupyterHubPlugin, User

#: The ``make_request`` fixture (tests/identity/conftest.py).
RequestFactory = Callable[..., HTTPServerRequest]

ADA = {"kind": "user", "name": "ada", "admin": False, "groups": ["formgrade-phys101", "nbgrader-chem2"]}
S1 = {"kind": "user", "name": "s1", "admin": False, "groups": ["nbgrader-phys101"]}


class FakeHub:
    """Answers ``GET /hub/api/user`` like JupyterHub, from a dict of tokens to user models."""

    def __init__(self, models: dict[str, dict[str, Any]]) -> None:
        self.models = models
        self.calls = 0
        self.status = 200  # anything else: answer every request with it
        self.delay = 0.0
        sock, port = bind_unused_port()
        self.url = f"http://127.0.0.1:{port}/hub/api"
        self.server = HTTPServer(Application([(r"/hub/api/user", FakeHubUserHandler, {"hub": self})]))
        self.server.add_sockets([sock])

    async def stop(self) -> None:
        self.server.stop()
        await self.server.close_all_connections()


class FakeHubUserHandler(RequestHandler):
    def initialize(self, hub: FakeHub) -> None:
        self.hub = hub

    async def get(self) -> None:
        self.hub.calls += 1
        await asyncio.sleep(self.hub.delay)
        scheme, _, token = self.request.headers.get("Authorization", "").partition(" ")
        model = self.hub.models.get(token) if scheme == "token" else None
        if self.hub.status != 200:
            self.set_status(self.hub.status)
            self.write({"status": self.hub.status, "message": "hub trouble"})
        elif model is None:
            # What JupyterHub answers for a token it does not know.
            self.set_status(403)
            self.write({"status": 403, "message": "Missing or invalid credentials."})
        else:
            self.write(model)


@asynccontextmanager
async def running_hub(**models: dict[str, Any]) -> AsyncIterator[FakeHub]:
    hub = FakeHub(dict(models))
    try:
        yield hub
    finally:
        await hub.stop()


def plugin_for(hub: FakeHub, **settings: Any) -> JupyterHubPlugin:
    return JupyterHubPlugin(hub_api_url=hub.url, api_token="service-token", **settings)


@pytest.fixture(autouse=True)
def no_hub_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("JUPYTERHUB_API_URL", "JUPYTERHUB_API_TOKEN", "NBEX_ORG_ID", "JUPYTERHUB_CLIENT_ID"):
        monkeypatch.delenv(name, raising=False)


def test_hub_groups_become_course_roles(make_request: RequestFactory) -> None:
    model = {
        "kind": "user",
        "name": "ada",
        "groups": ["formgrade-phys101", "nbgrader-phys101", "nbgrader-chem2", "formgrade-", "staff"],
    }

    async def scenario() -> None:
        async with running_hub(tok=model) as hub:
            user = await plugin_for(hub, org_id=4).authenticate(make_request(Authorization="token tok"))
        assert user == User(
            name="ada", org_id=4, courses={"phys101": "Instructor", "chem2": "Student"}, full_name="ada"
        )
        assert user.lms_user_id is None and user.email is None

    asyncio.run(scenario())


def test_instructor_wins_whichever_group_comes_first(make_request: RequestFactory) -> None:
    model = {"kind": "user", "name": "ada", "groups": ["nbgrader-phys101", "formgrade-phys101"]}

    async def scenario() -> None:
        async with running_hub(tok=model) as hub:
            user = await plugin_for(hub).authenticate(make_request(Authorization="Bearer tok"))
        assert user is not None and user.is_instructor("phys101")

    asyncio.run(scenario())


def test_a_user_without_groups_has_no_courses(make_request: RequestFactory) -> None:
    async def scenario() -> None:
        async with running_hub(tok={"kind": "user", "name": "nobody"}) as hub:
            user = await plugin_for(hub).authenticate(make_request(Authorization="token tok"))
        assert user is not None and user.name == "nobody" and dict(user.courses) == {}

    asyncio.run(scenario())


def test_second_request_with_the_same_token_is_answered_from_the_cache(make_request: RequestFactory) -> None:
    async def scenario() -> None:
        async with running_hub(a=ADA, s=S1) as hub:
            plugin = plugin_for(hub)
            first = await plugin.authenticate(make_request(Authorization="token a"))
            second = await plugin.authenticate(make_request(Authorization="token a"))
            assert hub.calls == 1
            assert second == first
            await plugin.authenticate(make_request(Authorization="token s"))
            assert hub.calls == 2

    asyncio.run(scenario())


def test_an_expired_entry_asks_the_hub_again_and_sees_changed_groups(make_request: RequestFactory) -> None:
    async def scenario() -> None:
        async with running_hub(a=dict(ADA)) as hub:
            plugin = plugin_for(hub, cache_ttl=0.2)
            before = await plugin.authenticate(make_request(Authorization="token a"))
            hub.models["a"]["groups"] = ["nbgrader-phys101"]
            await asyncio.sleep(0.3)
            after = await plugin.authenticate(make_request(Authorization="token a"))
            assert hub.calls == 2
        assert before is not None and before.is_instructor("phys101")
        assert after is not None and after.role_in("phys101") == "Student"

    asyncio.run(scenario())


def test_the_cache_holds_at_most_cache_size_users(make_request: RequestFactory) -> None:
    async def scenario() -> None:
        async with running_hub(a=ADA, s=S1) as hub:
            plugin = plugin_for(hub, cache_size=1)
            for token in ("a", "s", "a"):
                await plugin.authenticate(make_request(Authorization=f"token {token}"))
            assert hub.calls == 3

    asyncio.run(scenario())


def test_zero_ttl_always_asks_the_hub(make_request: RequestFactory) -> None:
    async def scenario() -> None:
        async with running_hub(a=ADA) as hub:
            plugin = plugin_for(hub, cache_ttl=0)
            for _ in range(3):
                await plugin.authenticate(make_request(Authorization="token a"))
            assert hub.calls == 3

    asyncio.run(scenario())


def test_a_token_the_hub_rejects_gives_no_user(make_request: RequestFactory) -> None:
    async def scenario() -> None:
        async with running_hub(a=ADA) as hub:
            assert await plugin_for(hub).authenticate(make_request(Authorization="token forged")) is None
            assert hub.calls == 1

    asyncio.run(scenario())


@pytest.mark.parametrize("status", [401, 403, 404])
def test_hub_answers_meaning_bad_token_give_no_user(status: int, make_request: RequestFactory) -> None:
    async def scenario() -> None:
        async with running_hub(a=ADA) as hub:
            hub.status = status
            assert await plugin_for(hub).authenticate(make_request(Authorization="token a")) is None

    asyncio.run(scenario())


def test_no_token_gives_no_user_without_asking_the_hub(make_request: RequestFactory) -> None:
    async def scenario() -> None:
        async with running_hub(a=ADA) as hub:
            plugin = plugin_for(hub)
            assert await plugin.authenticate(make_request()) is None
            assert await plugin.authenticate(make_request(Authorization="Basic YTpi")) is None
            assert hub.calls == 0

    asyncio.run(scenario())


def test_a_hub_service_token_is_not_a_user(make_request: RequestFactory) -> None:
    service = {"kind": "service", "name": "ada", "roles": ["admin"]}

    async def scenario() -> None:
        async with running_hub(svc=service) as hub:
            assert await plugin_for(hub).authenticate(make_request(Authorization="token svc")) is None

    asyncio.run(scenario())


@pytest.mark.parametrize("status", [500, 502, 503, 429])
def test_a_failing_hub_is_unavailable_not_unauthenticated(status: int, make_request: RequestFactory) -> None:
    async def scenario() -> None:
        async with running_hub(a=ADA) as hub:
            plugin = plugin_for(hub)
            hub.status = status
            with pytest.raises(Unavailable) as raised:
                await plugin.authenticate(make_request(Authorization="token a"))
            assert raised.value.status_code == 503
            assert "JupyterHub" in raised.value.note
            # The failure is not remembered: once the hub recovers, the same token works.
            hub.status = 200
            user = await plugin.authenticate(make_request(Authorization="token a"))
            assert user is not None and user.name == "ada"

    asyncio.run(scenario())


def test_a_hub_answering_nonsense_is_unavailable(make_request: RequestFactory) -> None:
    async def scenario() -> None:
        async with running_hub(a={"kind": "user", "groups": []}) as hub:
            with pytest.raises(Unavailable):
                await plugin_for(hub).authenticate(make_request(Authorization="token a"))

    asyncio.run(scenario())


def test_a_stopped_hub_is_unavailable(make_request: RequestFactory) -> None:
    async def scenario() -> None:
        async with running_hub(a=ADA) as hub:
            plugin = plugin_for(hub)
            await hub.stop()
            with pytest.raises(Unavailable) as raised:
                await plugin.authenticate(make_request(Authorization="token a"))
        assert "cannot be reached" in raised.value.note

    asyncio.run(scenario())


def test_a_hub_slower_than_request_timeout_is_unavailable(make_request: RequestFactory) -> None:
    async def scenario() -> None:
        async with running_hub(a=ADA) as hub:
            hub.delay = 1.0
            with pytest.raises(Unavailable):
                await plugin_for(hub, request_timeout=0.2).authenticate(make_request(Authorization="token a"))

    asyncio.run(scenario())


def test_settings_default_to_jupyterhub_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    plugin = JupyterHubPlugin()
    assert (plugin.hub_api_url, plugin.api_token, plugin.org_id) == ("http://127.0.0.1:8081/hub/api", "", 1)
    assert plugin.cache_ttl == 60

    monkeypatch.setenv("JUPYTERHUB_API_URL", "http://hub:8081/hub/api")
    monkeypatch.setenv("JUPYTERHUB_API_TOKEN", "service-token")
    monkeypatch.setenv("NBEX_ORG_ID", "7")
    plugin = JupyterHubPlugin()
    assert (plugin.hub_api_url, plugin.api_token, plugin.org_id) == ("http://hub:8081/hub/api", "service-token", 7)


def test_the_environment_url_and_org_are_the_ones_used(
    monkeypatch: pytest.MonkeyPatch, make_request: RequestFactory
) -> None:
    async def scenario() -> None:
        async with running_hub(a=ADA) as hub:
            monkeypatch.setenv("JUPYTERHUB_API_URL", hub.url + "/")
            monkeypatch.setenv("NBEX_ORG_ID", "7")
            user = await JupyterHubPlugin().authenticate(make_request(Authorization="token a"))
            assert hub.calls == 1
        assert user is not None and user.org_id == 7

    asyncio.run(scenario())


def test_a_malformed_org_id_in_the_environment_stops_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NBEX_ORG_ID", "physics")
    with pytest.raises(Invalid) as raised:
        JupyterHubPlugin()
    assert "NBEX_ORG_ID" in raised.value.note


COOKIE_SECRET = b"service-cookie-secret"
COOKIE_NAME = "service-nbexchange"


class StandInHubOAuth:
    """The one thing the plugin takes from HubOAuth: the name of its cookie."""

    cookie_name = COOKIE_NAME

    def __init__(self, **settings: Any) -> None:
        self.settings = settings


@pytest.fixture
def stand_in_jupyterhub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes ``jupyterhub.services.auth.HubOAuth`` importable, as if jupyterhub were installed."""
    auth = types.ModuleType("jupyterhub.services.auth")
    auth.HubOAuth = StandInHubOAuth  # type: ignore[attr-defined]  # a module built at run time
    monkeypatch.setitem(sys.modules, "jupyterhub", types.ModuleType("jupyterhub"))
    monkeypatch.setitem(sys.modules, "jupyterhub.services", types.ModuleType("jupyterhub.services"))
    monkeypatch.setitem(sys.modules, "jupyterhub.services.auth", auth)


def oauth_cookie(token: str, secret: bytes = COOKIE_SECRET) -> str:
    return f"{COOKIE_NAME}={create_signed_value(secret, COOKIE_NAME, token).decode()}"


def test_without_jupyterhub_a_cookie_only_request_gives_no_user(
    make_request: RequestFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The test extra installs jupyterhub (tests/hub): make it absent, as on a service host without it.
    monkeypatch.setitem(sys.modules, "jupyterhub.services.auth", None)

    async def scenario() -> None:
        async with running_hub(a=ADA) as hub:
            plugin = plugin_for(hub, cookie_secret=COOKIE_SECRET)
            assert await plugin.authenticate(make_request(Cookie=oauth_cookie("a"))) is None
            assert hub.calls == 0

    with caplog.at_level(logging.INFO):
        asyncio.run(scenario())
    assert "The jupyterhub package is not installed: browser cookies are not accepted." in caplog.text


def test_a_browser_hub_oauth_cookie_is_checked_with_the_hub(
    stand_in_jupyterhub: None, make_request: RequestFactory
) -> None:
    async def scenario() -> None:
        async with running_hub(a=ADA) as hub:
            plugin = plugin_for(hub, cookie_secret=COOKIE_SECRET)
            user = await plugin.authenticate(make_request(Cookie=oauth_cookie("a")))
            assert user is not None and user.name == "ada"
            forged = oauth_cookie("a", secret=b"someone else's secret")
            assert await plugin.authenticate(make_request(Cookie=forged)) is None
            assert hub.calls == 1

    asyncio.run(scenario())


def test_without_a_cookie_secret_cookies_are_not_read(stand_in_jupyterhub: None, make_request: RequestFactory) -> None:
    async def scenario() -> None:
        async with running_hub(a=ADA) as hub:
            assert await plugin_for(hub).authenticate(make_request(Cookie=oauth_cookie("a"))) is None
            assert hub.calls == 0

    asyncio.run(scenario())
