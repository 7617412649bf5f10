"""``proxy.auth``: the pure half of source auth — the config, the headers, the token
request and answer, how long a token is used."""

from __future__ import annotations

import base64
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from proxy.auth import (
    DEFAULT_EXPIRES_IN,
    AuthConfig,
    basic_header,
    cache_seconds,
    check_credentials,
    fetch_deadline,
    parse_token,
    token_form,
    with_authorization,
)
from proxy.errors import AuthError, MissingVariables
from proxy.source_spec import HTTPSource
from proxy.templates import RenderedRequest

CANARY = "auth-canary-99e1"
CLIENT = {"CLIENT_ID": "cid", "CLIENT_SECRET": CANARY}
USER = {"USERNAME": "ada", "PASSWORD": CANARY}
BEARER = {"method": "bearer", "token_url": "https://idp.example/token"}


def decoded_basic(header: str) -> str:
    assert header.startswith("Basic ")
    return base64.b64decode(header.removeprefix("Basic ")).decode()


def test_basic_prefers_username_and_password_else_the_client_pair() -> None:
    assert decoded_basic(basic_header({**CLIENT, **USER})) == f"ada:{CANARY}"
    assert decoded_basic(basic_header(CLIENT)) == f"cid:{CANARY}"
    with pytest.raises(MissingVariables) as missing:
        basic_header({"USERNAME": "ada", "CLIENT_ID": "cid"})
    assert CANARY not in str(missing.value.to_dict())


@pytest.mark.parametrize(
    ("auth", "credentials", "form"),
    [
        (
            {**BEARER, "grant_type": "client_credentials", "scope": "a.read a.write"},
            CLIENT,
            [
                ("grant_type", "client_credentials"),
                ("client_id", "cid"),
                ("client_secret", CANARY),
                ("scope", "a.read a.write"),
            ],
        ),
        (
            {**BEARER, "grant_type": "password"},
            {**USER, "CLIENT_ID": "cid"},
            [
                ("grant_type", "password"),
                ("username", "ada"),
                ("password", CANARY),
                ("client_id", "cid"),
            ],
        ),
    ],
    ids=["client_credentials", "password"],
)
def test_token_form_follows_the_grant(
    auth: dict[str, Any], credentials: dict[str, str], form: list[tuple[str, str]]
) -> None:
    assert token_form(AuthConfig(**auth), credentials) == form


@pytest.mark.parametrize(
    ("grant", "credentials", "missing"),
    [
        ("client_credentials", {"CLIENT_ID": "cid"}, ["CLIENT_SECRET"]),
        ("password", {"PASSWORD": CANARY}, ["USERNAME"]),
    ],
)
def test_token_form_names_the_missing_credentials(
    grant: str, credentials: dict[str, str], missing: list[str]
) -> None:
    with pytest.raises(MissingVariables) as refused:
        token_form(AuthConfig(**BEARER, grant_type=grant), credentials)  # type: ignore[arg-type]
    assert refused.value.extra["variables"] == missing


def test_check_credentials_names_what_each_method_lacks() -> None:
    check_credentials(None, {})
    check_credentials(AuthConfig(method="basic"), CLIENT)
    check_credentials(AuthConfig(**BEARER, grant_type="password"), USER)
    cases = [
        (AuthConfig(method="basic"), {"USERNAME": "ada"}, ["USERNAME", "PASSWORD"]),
        (AuthConfig(**BEARER, grant_type="client_credentials"), USER, list(CLIENT)),
        (AuthConfig(**BEARER, grant_type="password"), {"USERNAME": "ada"}, ["PASSWORD"]),
    ]
    for auth, credentials, missing in cases:
        with pytest.raises(MissingVariables) as refused:
            check_credentials(auth, credentials)
        assert refused.value.extra["variables"] == missing


@pytest.mark.parametrize(
    "auth",
    [
        {"method": "bearer", "grant_type": "client_credentials"},
        {"method": "bearer", "token_url": "https://idp.example/token"},
        {**BEARER, "grant_type": "implicit"},
        {**BEARER, "grant_type": "client_credentials", "token_url": "ftp://idp.example/t"},
        {**BEARER, "grant_type": "client_credentials", "scope": "a\r\nb"},
        {"method": "digest"},
        {"method": "basic", "username": "ada"},
    ],
    ids=["no-url", "no-grant", "implicit", "not-http", "control-chars", "method", "unknown-field"],
)
def test_a_bad_auth_config_is_refused(auth: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        HTTPSource(url="https://api.example", auth=auth)


def test_the_reference_auth_config_is_accepted_and_dumped_as_given() -> None:
    auth = {**BEARER, "grant_type": "client_credentials", "scope": "api.read"}
    source = HTTPSource(url="https://api.example", auth=auth)
    assert source.model_dump(mode="json", exclude_none=True)["auth"] == auth
    basic = HTTPSource(url="https://api.example", auth={"method": "basic"})
    assert basic.model_dump(mode="json", exclude_none=True)["auth"] == {"method": "basic"}


def answer(**fields: Any) -> bytes:
    return orjson.dumps(fields)


def test_parse_token_takes_the_token_and_its_lifetime() -> None:
    assert parse_token(answer(access_token="t", token_type="Bearer", expires_in=60)) == ("t", 60)
    assert parse_token(answer(access_token="t", expires_in="120")) == ("t", 120)
    assert parse_token(answer(access_token="t")) == ("t", DEFAULT_EXPIRES_IN)


@pytest.mark.parametrize(
    "body",
    [
        f"<html>{CANARY}</html>".encode(),
        b"[]",
        answer(token=CANARY),
        answer(access_token=""),
        answer(access_token=f"{CANARY}\r\nX: 1"),
        answer(access_token=CANARY, token_type="mac"),
        answer(access_token=CANARY, expires_in="soon"),
        answer(access_token=CANARY, expires_in=-1),
        answer(access_token=CANARY, expires_in=True),
    ],
)
def test_parse_token_refuses_what_is_not_a_usable_bearer_token(body: bytes) -> None:
    with pytest.raises(AuthError) as refused:
        parse_token(body)
    assert refused.value.code == "AUTH_ERROR" and refused.value.status == 502
    assert CANARY not in str(refused.value.to_dict())


@pytest.mark.parametrize(
    ("expires_in", "seconds"), [(3600, 3540), (300, 240), (100, 80), (30, 24), (0, 0)]
)
def test_a_token_is_used_until_before_it_expires(expires_in: float, seconds: float) -> None:
    assert cache_seconds(expires_in) == pytest.approx(seconds)


def test_our_authorization_replaces_the_sources() -> None:
    request = RenderedRequest(
        "GET", "https://api.example", (("authorization", "Bearer old"), ("X-A", "1")), (), None
    )
    headers = with_authorization(request, "Bearer new").headers
    assert headers == (("X-A", "1"), ("Authorization", "Bearer new"))


def test_a_bearer_fetch_has_time_for_two_token_requests_and_two_calls() -> None:
    bearer = AuthConfig(**BEARER, grant_type="client_credentials")
    assert fetch_deadline(None, 12, 5) == 12
    assert fetch_deadline(AuthConfig(method="basic"), 12, 5) == 12
    assert fetch_deadline(bearer, 12, 5) == 34
