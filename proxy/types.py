"""Type aliases shared across the package."""

from __future__ import annotations

from typing import Any, Literal, TypeAlias

JSONValue: TypeAlias = Any
"""A value orjson can encode: dict, list, str, int, float, bool or None."""

ResponseType: TypeAlias = Literal["JSON", "XML", "CSV", "PLAIN_TEXT"]
Method: TypeAlias = Literal["GET", "POST", "PUT", "DELETE", "PATCH"]
Status: TypeAlias = Literal["DRAFT", "PUBLISHED", "ARCHIVED"]
Origin: TypeAlias = Literal["REQUEST", "CACHE"]
