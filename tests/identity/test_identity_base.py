"""The User record, role spelling and token extraction shared by every identity plugin."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest
from tornado.httputil import HTTPServerRequest

from nbexchange.errors import Invalid
from nbexchange.identity import User
from nbexchange.identity.base import normalise_role, token_from_request

#: The ``make_request`` fixture (tests/identity/conftest.py).
RequestFactory = Callable[..., HTTPServerRequest]


@pytest.mark.parametrize("text", ["Instructor", "instructor", "INSTRUCTOR", "  instructor\n"])
def test_instructor_in_any_case_is_normalised(text: str) -> None:
    assert normalise_role(text) == "Instructor"


@pytest.mark.parametrize("text", ["Student", "student", "sTuDeNt "])
def test_student_in_any_case_is_normalised(text: str) -> None:
    assert normalise_role(text) == "Student"


@pytest.mark.parametrize("text", ["Teacher", "", "instructors", None, 1])
def test_other_roles_are_invalid_and_the_note_says_which(text: object) -> None:
    with pytest.raises(Invalid) as raised:
        normalise_role(text)
    assert repr(text) in raised.value.note
    assert raised.value.status_code == 400


def test_user_answers_role_questions_per_course() -> None:
    user = User(name="ada", org_id=1, courses={"phys101": "instructor", "chem2": "Student"})
    assert user.role_in("phys101") == "Instructor"
    assert user.role_in("chem2") == "Student"
    assert user.role_in("bio1") is None
    assert user.is_instructor("phys101") and not user.is_instructor("chem2")
    assert user.is_member("chem2") and not user.is_member("bio1")
    assert user.full_name is None and user.email is None and user.lms_user_id is None


def test_user_is_frozen_and_its_courses_cannot_change() -> None:
    courses = {"phys101": "Student"}
    user = User(name="s1", org_id=1, courses=courses)
    courses["phys101"] = "Instructor"  # the caller's dict changing later must not promote anyone
    courses["chem2"] = "Student"
    assert dict(user.courses) == {"phys101": "Student"}
    with pytest.raises(TypeError):
        user.courses["phys101"] = "Instructor"  # type: ignore[index]  # the point: it is read-only
    with pytest.raises(dataclasses.FrozenInstanceError):
        user.name = "ada"  # type: ignore[misc]  # the point: it is frozen


def test_user_with_an_unknown_role_is_invalid() -> None:
    with pytest.raises(Invalid):
        User(name="s1", org_id=1, courses={"phys101": "Teacher"})


def test_users_with_the_same_fields_are_equal() -> None:
    assert User("s1", 1, {"c": "Student"}) == User("s1", 1, {"c": "student"})
    assert User("s1", 1, {"c": "Student"}) != User("s1", 2, {"c": "Student"})


@pytest.mark.parametrize(
    "header",
    ["token abc123", "Token abc123", "Bearer abc123", "bearer abc123", "  token   abc123  "],
)
def test_token_is_read_from_token_and_bearer_headers(header: str, make_request: RequestFactory) -> None:
    assert token_from_request(make_request(Authorization=header)) == "abc123"


@pytest.mark.parametrize("header", ["Basic YWRhOnB3", "token", "abc123", "token a b", ""])
def test_other_authorization_headers_give_no_token(header: str, make_request: RequestFactory) -> None:
    assert token_from_request(make_request(Authorization=header)) is None


def test_no_authorization_header_gives_no_token(make_request: RequestFactory) -> None:
    assert token_from_request(make_request()) is None
