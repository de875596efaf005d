"""Users as JupyterHub knows them: the hub vouches for the token, the hub's groups give the courses."""

from __future__ import annotations

import importlib
import json
import os
import time
from collections import OrderedDict
from collections.abc import Iterable
from functools import cached_property
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.httputil import HTTPServerRequest
from tornado.web import decode_signed_value
from traitlets import Bytes, Float, Int, TraitError, Unicode, default

from nbexchange.errors import Invalid, Unavailable
from nbexchange.identity.base import INSTRUCTOR, STUDENT, User, UserPlugin, token_digest, token_from_request

DEFAULT_HUB_API_URL = "http://127.0.0.1:8081/hub/api"

#: nbgrader's multi-course convention for hub groups, prefix -> role.
GROUP_PREFIXES = (("formgrade-", INSTRUCTOR), ("nbgrader-", STUDENT))

#: What the hub answers ``GET /user`` with when the token is not (or no longer) valid.
REJECTED_TOKEN_CODES = frozenset({401, 403, 404})


def courses_from_groups(groups: Iterable[object]) -> dict[str, str]:
    """Course roles from hub group names: ``formgrade-<course>`` is Instructor, ``nbgrader-<course>`` Student.

    A user in both groups of a course is its Instructor; other groups are ignored.
    """
    courses: dict[str, str] = {}
    for group in groups:
        if not isinstance(group, str):
            continue
        for prefix, role in GROUP_PREFIXES:
            course_id = group[len(prefix) :]
            if group.startswith(prefix) and course_id and courses.get(course_id) != INSTRUCTOR:
                courses[course_id] = role
    return courses


def _text(model: dict[str, Any], key: str) -> str | None:
    value = model.get(key)
    return value if isinstance(value, str) and value else None


class _UserCache:
    """Users by token digest, each kept ``ttl`` seconds, at most ``size`` of them (oldest go first)."""

    def __init__(self, ttl: float, size: int) -> None:
        self.ttl = ttl
        self.size = size
        self._entries: OrderedDict[str, tuple[float, User]] = OrderedDict()

    def get(self, key: str) -> User | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, user = entry
        if expires <= time.monotonic():
            del self._entries[key]
            return None
        return user

    def put(self, key: str, user: User) -> None:
        if self.ttl <= 0 or self.size <= 0:
            return
        self._entries[key] = (time.monotonic() + self.ttl, user)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


class JupyterHubPlugin(UserPlugin):
    """Asks JupyterHub who owns the request's token, and maps hub groups to course roles.

    A token comes from the ``Authorization`` header, or else from the OAuth cookie
    that ``jupyterhub.services.auth.HubOAuth`` sets for browsers. The cookie path
    needs the ``jupyterhub`` package (imported only when a request has no token)
    and ``cookie_secret``; without either, cookie-only requests are simply
    unauthenticated. The hub includes ``groups`` in its answer only if the token
    may read them (scope ``read:users:groups``).

    An unreachable or failing hub raises ``Unavailable``: an outage is never
    reported as a bad token.
    """

    hub_api_url = Unicode(
        help="""Base URL of JupyterHub's REST API, e.g. http://hub:8081/hub/api.

        Default: $JUPYTERHUB_API_URL, else http://127.0.0.1:8081/hub/api.
        """,
    ).tag(config=True)

    @default("hub_api_url")
    def _default_hub_api_url(self) -> str:
        return os.environ.get("JUPYTERHUB_API_URL") or DEFAULT_HUB_API_URL

    api_token = Unicode(
        help="""This service's own JupyterHub API token (the OAuth client secret for browser logins).

        Default: $JUPYTERHUB_API_TOKEN, which JupyterHub sets for the services it manages.
        """,
    ).tag(config=True)

    @default("api_token")
    def _default_api_token(self) -> str:
        return os.environ.get("JUPYTERHUB_API_TOKEN", "")

    org_id = Int(
        help="""The organisation every JupyterHub user of this exchange belongs to.

        Default: $NBEX_ORG_ID, else 1.
        """,
    ).tag(config=True)

    @default("org_id")
    def _default_org_id(self) -> int:
        value = os.environ.get("NBEX_ORG_ID", "1")
        try:
            return int(value)
        except ValueError:
            raise Invalid(f"NBEX_ORG_ID must be an integer, not {value!r}.") from None

    cache_ttl = Float(
        60.0,
        help="""Seconds a user the hub vouched for is remembered without asking again (0: always ask).

        Longer spares the hub; shorter makes a removed group or revoked token take effect sooner.
        """,
    ).tag(config=True)

    cache_size = Int(
        1024,
        help="The most users remembered at once; the oldest are forgotten first.",
    ).tag(config=True)

    request_timeout = Float(
        10.0,
        help="Seconds to wait for JupyterHub to answer before the exchange reports itself unavailable.",
    ).tag(config=True)

    cookie_secret = Bytes(
        b"",
        help="""The secret this service's tornado application signs cookies with.

        Needed to read the HubOAuth cookie of browser requests; empty disables that path.
        """,
    ).tag(config=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Reading org_id here makes a malformed $NBEX_ORG_ID stop start-up, not the first request.
        self.log.info("Users are checked with JupyterHub at %s, in organisation %d.", self.hub_api_url, self.org_id)
        self._cache = _UserCache(self.cache_ttl, self.cache_size)

    async def authenticate(self, request: HTTPServerRequest) -> User | None:
        """The hub user who owns the request's token or OAuth cookie, or None."""
        token = token_from_request(request) or self._token_from_cookie(request)
        if token is None:
            return None
        key = token_digest(token)
        user = self._cache.get(key)
        if user is None:
            model = await self._hub_user_model(token)
            user = None if model is None else self._user_from_model(model)
            if user is not None:
                self._cache.put(key, user)
        return user

    async def _hub_user_model(self, token: str) -> dict[str, Any] | None:
        """The hub's model of the token's owner, or None if the hub rejects the token."""
        url = self.hub_api_url.rstrip("/") + "/user"
        request = HTTPRequest(
            url,
            headers={"Authorization": f"token {token}"},
            connect_timeout=self.request_timeout,
            request_timeout=self.request_timeout,
        )
        try:
            response = await AsyncHTTPClient().fetch(request, raise_error=False)
        except (OSError, HTTPClientError) as e:  # refused, unresolvable, timed out
            self.log.warning("JupyterHub at %s cannot be reached: %s", url, e)
            raise Unavailable("JupyterHub cannot be reached to check your token; try again shortly.") from e
        if response.code in REJECTED_TOKEN_CODES:
            return None
        try:
            model: object = json.loads(response.body) if response.code == 200 else None
        except ValueError:
            model = None
        if not isinstance(model, dict):
            self.log.warning("JupyterHub at %s answered %d: %r", url, response.code, response.body[:200])
            raise Unavailable("JupyterHub failed while checking your token; try again shortly.")
        return model

    def _user_from_model(self, model: dict[str, Any]) -> User | None:
        name = _text(model, "name")
        if name is None:
            raise Unavailable("JupyterHub answered with a user that has no name; try again shortly.")
        if model.get("kind", "user") != "user":
            # A hub service is not a person: it would share names with users and
            # hold no course roles, so it is not let in as one.
            self.log.info("Refusing JupyterHub %s %r: only users may use the exchange.", model.get("kind"), name)
            return None
        groups = model.get("groups")
        return User(
            name=name,
            org_id=self.org_id,
            courses=courses_from_groups(groups if isinstance(groups, list) else []),
            full_name=_text(model, "full_name") or name,
            email=_text(model, "email"),
        )

    def has_credentials(self, request: HTTPServerRequest) -> bool:
        """Whether the request carries a token or the hub's OAuth cookie."""
        return super().has_credentials(request) or self._token_from_cookie(request) is not None

    def explain_forbidden(self, note: str) -> str:
        """The note, and that roles come from hub groups, as they stood up to ``cache_ttl`` seconds ago."""
        where = (
            " Course roles come from your JupyterHub groups (formgrade-<course> for Instructors, "
            "nbgrader-<course> for Students)"
        )
        if self.cache_ttl <= 0:
            return f"{note}{where}, read from JupyterHub on every request."
        return (
            f"{note}{where}, which the exchange refreshes every {self.cache_ttl:g} seconds: "
            f"a group you were added to just now applies within {self.cache_ttl:g} seconds."
        )

    def _token_from_cookie(self, request: HTTPServerRequest) -> str | None:
        if not self.cookie_secret or not request.cookies or self._hub_cookie_name is None:
            return None
        morsel = request.cookies.get(self._hub_cookie_name)
        if morsel is None:
            return None
        value = decode_signed_value(self.cookie_secret, self._hub_cookie_name, morsel.value)
        return value.decode("ascii", "replace") if value else None

    @cached_property
    def _hub_cookie_name(self) -> str | None:
        """The name of HubOAuth's cookie, or None when the ``jupyterhub`` package is absent or unset."""
        try:
            auth = importlib.import_module("jupyterhub.services.auth")
        except ImportError:
            self.log.info("The jupyterhub package is not installed: browser cookies are not accepted.")
            return None
        try:
            hub_oauth = auth.HubOAuth(parent=self, api_url=self.hub_api_url, api_token=self.api_token)
            return str(hub_oauth.cookie_name)
        except (TraitError, ValueError) as e:  # e.g. $JUPYTERHUB_CLIENT_ID unset
            self.log.warning("HubOAuth cannot be set up, so browser cookies are not accepted: %s", e)
            return None
