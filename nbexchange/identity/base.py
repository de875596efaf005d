"""Who is asking: the ``User`` a request resolves to, and the plugin interface that resolves it."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from tornado.httputil import HTTPServerRequest
from traitlets.config import LoggingConfigurable

from nbexchange.errors import Invalid, Unauthorized

INSTRUCTOR = "Instructor"
STUDENT = "Student"

#: The schemes accepted in an ``Authorization`` header, lower-cased.
TOKEN_SCHEMES = frozenset({"token", "bearer"})

#: What a 401 says, by what the request carried: nothing, a header of another form, or a token not accepted.
NO_TOKEN = "No API token was sent: send the header 'Authorization: token <your API token>'."
NOT_A_TOKEN = "The Authorization header is not of the form 'token <your API token>' (or 'Bearer <token>')."
TOKEN_REFUSED = (
    "The API token sent was not accepted: it is wrong, expired or revoked. Check the token your client "
    "is configured with, or ask for a new one."
)


def normalise_role(text: object) -> str:
    """The canonical spelling of a course role: ``"Instructor"`` or ``"Student"``.

    Accepts either word in any case, with surrounding spaces; anything else is ``Invalid``.
    """
    if isinstance(text, str):
        for role in (INSTRUCTOR, STUDENT):
            if text.strip().lower() == role.lower():
                return role
    raise Invalid(f"Unknown role {text!r}: a role is 'Instructor' or 'Student'.")


@dataclass(frozen=True)
class User:
    """An authenticated person and the role they hold in each of their courses."""

    name: str
    org_id: int
    courses: Mapping[str, str]
    full_name: str | None = None
    email: str | None = None
    lms_user_id: str | None = None

    def __post_init__(self) -> None:
        # A read-only copy: the caller's dict may change later, and a frozen
        # dataclass holding a mutable mapping would only look frozen.
        roles = {course_id: normalise_role(role) for course_id, role in self.courses.items()}
        object.__setattr__(self, "courses", MappingProxyType(roles))

    def role_in(self, course_id: str) -> str | None:
        """This user's role in the course, or None if they are not a member."""
        return self.courses.get(course_id)

    def is_instructor(self, course_id: str) -> bool:
        """Whether this user is an Instructor of the course."""
        return self.role_in(course_id) == INSTRUCTOR

    def is_member(self, course_id: str) -> bool:
        """Whether this user holds any role in the course."""
        return course_id in self.courses


def token_from_request(request: HTTPServerRequest) -> str | None:
    """The API token in the request's ``Authorization: token …`` (or ``Bearer …``) header, if any."""
    parts = request.headers.get("Authorization", "").split()
    if len(parts) == 2 and parts[0].lower() in TOKEN_SCHEMES:
        return parts[1]
    return None


def token_digest(token: str) -> str:
    """The key a token is looked up and cached by: its sha256, so no secret is kept or compared as is."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class UserPlugin(LoggingConfigurable):
    """Turns a request into a ``User``; the service's ``user_plugin_class`` is one of these."""

    async def authenticate(self, request: HTTPServerRequest) -> User | None:
        """The user making the request, or None when it carries no valid credentials.

        Raises ``Unavailable`` when the identity source cannot be asked, so that an
        outage is never mistaken for an anonymous caller.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement authenticate()")

    def unauthenticated(self, request: HTTPServerRequest) -> Unauthorized:
        """The 401 for a request ``authenticate`` found no user in, saying what was wrong with it."""
        if self.has_credentials(request):
            return Unauthorized(TOKEN_REFUSED)
        if request.headers.get("Authorization", "").strip():
            return Unauthorized(NOT_A_TOKEN)
        return Unauthorized(NO_TOKEN)

    def has_credentials(self, request: HTTPServerRequest) -> bool:
        """Whether the request carries credentials this plugin reads (they may still be refused)."""
        return token_from_request(request) is not None

    def explain_forbidden(self, note: str) -> str:
        """A 403's note, with what the user should know about where their course roles come from."""
        return note
