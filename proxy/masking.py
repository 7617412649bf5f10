"""Secret values replaced by ``***`` in what an answer echoes: pure, no I/O.

``POST …/test`` shows the request it sent and the answer it got. Variables and
credentials are rendered into the URL (percent-encoded), headers and body, and an
upstream may echo them back: every form a value takes there is replaced, the
longest first, so a value that contains another is masked whole.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, quote_plus

import orjson

MASK = "***"
MIN_ECHOED = 4
"""The shortest value masked in what the upstream answered: a 1-3 character value
(a region, a version) would turn every number and word holding it into stars."""


def _text(value: Any) -> str:
    """A value as the templates insert it: strings as they are, the rest as JSON."""
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def forms(values: Iterable[Any]) -> list[str]:
    """Every text a value may take once rendered, longest first: as is, percent-encoded
    for a path, a query and a form."""
    found: set[str] = set()
    for value in values:
        if value is None:
            continue
        text = _text(value)
        found |= {text, quote(text, safe=""), quote(text, safe="/"), quote_plus(text, safe="")}
    found.discard("")
    return sorted(found, key=len, reverse=True)


def mask(text: str, secrets: list[str], shortest: int = 1) -> str:
    """``text`` with every secret form of at least ``shortest`` characters replaced."""
    for secret in secrets:
        if len(secret) >= shortest and secret in text:
            text = text.replace(secret, MASK)
    return text


def mask_tree(value: Any, secrets: list[str], shortest: int = 1) -> Any:
    """A JSON value with every string in it (keys too) masked; numbers stay as they are."""
    if isinstance(value, str):
        return mask(value, secrets, shortest)
    if isinstance(value, dict):
        return {
            mask(str(k), secrets, shortest): mask_tree(v, secrets, shortest)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [mask_tree(item, secrets, shortest) for item in value]
    return value
