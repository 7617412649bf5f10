"""A source's authentication (the reference's AuthConfig): pure decisions, no I/O.

``basic`` sends ``Authorization: Basic`` built from USERNAME/PASSWORD, else
CLIENT_ID/CLIENT_SECRET. ``bearer`` sends an OAuth2 access token got from
``token_url`` with the ``client_credentials`` or ``password`` grant;
``proxy.tokens`` fetches, caches and shares it. Credentials are stored apart from
the source (``PUT …/credentials``), encrypted, and reach this module decrypted in a
``Secrets`` that shows names only. Every error names credentials, never a value.
"""

from __future__ import annotations

import base64
import dataclasses
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import orjson
from pydantic import BaseModel, ConfigDict, Field, model_validator

from proxy.errors import AuthError, MissingVariables

if TYPE_CHECKING:
    from proxy.templates import RenderedRequest

CredentialType: TypeAlias = Literal["CLIENT_ID", "CLIENT_SECRET", "USERNAME", "PASSWORD"]
AuthMethod: TypeAlias = Literal["basic", "bearer"]
GrantType: TypeAlias = Literal["client_credentials", "password"]

DEFAULT_EXPIRES_IN = 3600
"""Seconds a token is taken to last when its endpoint does not say (RFC 6749 5.1: optional)."""


class AuthConfig(BaseModel):
    """``source.auth``: how to authenticate; the credentials themselves are stored apart."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: AuthMethod
    token_url: str | None = Field(
        default=None, max_length=8192, pattern=r"^(?i:https?)://[^\s/?#]+[^\s]*$"
    )
    # The reference also lists "implicit": a browser flow, which a server cannot run.
    grant_type: GrantType | None = None
    scope: str | None = Field(default=None, max_length=4096, pattern=r"^[^\x00-\x1f\x7f]*$")

    @model_validator(mode="after")
    def _bearer_needs_an_endpoint(self) -> AuthConfig:
        if self.method == "bearer" and (self.token_url is None or self.grant_type is None):
            raise ValueError("bearer auth needs token_url and grant_type")
        return self


def _pair(credentials: Mapping[str, Any], first: str, second: str) -> tuple[str, str] | None:
    if first in credentials and second in credentials:
        return str(credentials[first]), str(credentials[second])
    return None


def check_credentials(auth: AuthConfig | None, credentials: Mapping[str, Any]) -> None:
    """MissingVariables naming the credentials ``auth`` needs and lacks: checked with the
    request's own names, before a cache lookup or a paid call, as variables are."""
    if auth is None:
        return
    if auth.method == "basic":
        _basic_pair(credentials)
        return
    needed = ("USERNAME", "PASSWORD") if auth.grant_type == "password" else _CLIENT
    missing = [name for name in needed if name not in credentials]
    if missing:
        raise MissingVariables(missing)


_CLIENT = ("CLIENT_ID", "CLIENT_SECRET")


def _basic_pair(credentials: Mapping[str, Any]) -> tuple[str, str]:
    """USERNAME/PASSWORD, else CLIENT_ID/CLIENT_SECRET; MissingVariables if neither."""
    pair = _pair(credentials, "USERNAME", "PASSWORD") or _pair(credentials, *_CLIENT)
    if pair is None:
        raise MissingVariables(["USERNAME", "PASSWORD"])
    return pair


def basic_header(credentials: Mapping[str, Any]) -> str:
    """``Basic …`` from USERNAME/PASSWORD, else CLIENT_ID/CLIENT_SECRET."""
    user, password = _basic_pair(credentials)
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def token_form(auth: AuthConfig, credentials: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The form fields of the token request (RFC 6749 4.3 and 4.4, client credentials in
    the body, 2.3.1); MissingVariables naming the credentials the grant lacks."""
    check_credentials(auth, credentials)
    form: list[tuple[str, str]] = [("grant_type", auth.grant_type or "client_credentials")]
    if auth.grant_type == "password":
        form += [("username", str(credentials["USERNAME"]))]
        form += [("password", str(credentials["PASSWORD"]))]
    # A password grant sends the client's own credentials too when it has them.
    form += [
        (field, str(credentials[name]))
        for field, name in (("client_id", "CLIENT_ID"), ("client_secret", "CLIENT_SECRET"))
        if name in credentials
    ]
    if auth.scope:
        form.append(("scope", auth.scope))
    return form


def parse_token(body: bytes) -> tuple[str, float]:
    """``(access_token, expires_in)`` from a token endpoint's 2xx body; AuthError otherwise.

    The message says what is wrong with the answer, never what it held.
    """
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise AuthError("the token endpoint answered something that is not JSON") from None
    if not isinstance(answer, dict):
        raise AuthError("the token endpoint answered JSON that is not an object")
    token = answer.get("access_token")
    if not isinstance(token, str) or not token or not token.isascii() or not token.isprintable():
        raise AuthError("the token endpoint's answer has no usable access_token")
    token_type = answer.get("token_type", "bearer")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise AuthError("the token endpoint issued a token that is not a bearer token")
    expires_in = answer.get("expires_in", DEFAULT_EXPIRES_IN)
    if isinstance(expires_in, str) and expires_in.isdigit():
        expires_in = int(expires_in)  # some endpoints send it as a string
    if isinstance(expires_in, bool) or not isinstance(expires_in, int | float):
        raise AuthError("the token endpoint's expires_in is not a number")
    if not math.isfinite(expires_in) or expires_in < 0:
        raise AuthError("the token endpoint's expires_in is not a number of seconds")
    return token, float(expires_in)


def cache_seconds(expires_in: float) -> float:
    """How long a token is used: ``max(0.8 * expires_in, expires_in - 60)``, so it is
    replaced before it expires whatever its lifetime (a minute early for long ones)."""
    return max(0.8 * expires_in, expires_in - 60)


def fetch_deadline(auth: AuthConfig | None, call_deadline: float, timeout: float) -> float:
    """How long a fetch may take: a bearer call may need a token request (up to
    ``timeout``), then after a 401 another one and the call again."""
    if auth is None or auth.method != "bearer":
        return call_deadline
    return 2 * (timeout + call_deadline)


def with_authorization(request: RenderedRequest, value: str) -> RenderedRequest:
    """``request`` with ``Authorization: value``, in place of any the source's headers set."""
    headers = [(k, v) for k, v in request.headers if k.lower() != "authorization"]
    return dataclasses.replace(request, headers=(*headers, ("Authorization", value)))
