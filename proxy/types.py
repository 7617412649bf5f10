"""Type aliases shared across the package."""

from __future__ import annotations

from typing import Literal, TypeAlias

ResponseType: TypeAlias = Literal["JSON", "XML", "CSV", "PLAIN_TEXT"]
Method: TypeAlias = Literal["GET", "POST", "PUT", "DELETE", "PATCH"]
Status: TypeAlias = Literal["DRAFT", "PUBLISHED", "ARCHIVED"]
Origin: TypeAlias = Literal["REQUEST", "CACHE"]
