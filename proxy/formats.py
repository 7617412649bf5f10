"""Turn an upstream body into a JSON value according to the source's ``response_type``.

Pure functions, no I/O. Every failure surfaces as :class:`proxy.errors.ParseError` with a
short reason that never echoes the body or a header, so an error response cannot leak
upstream data (nor a secret the upstream reflected back).
"""

from __future__ import annotations

import codecs
import csv
import io
from typing import TYPE_CHECKING, Any

import orjson

from proxy.errors import ParseError
from proxy.types import ResponseType

if TYPE_CHECKING:
    from xml.etree.ElementTree import Element

_MAX_REASON = 200
_MAX_XML_DEPTH = 100
"""Deeper XML is refused: with list wrapping the result could exceed orjson.dumps' 254 levels."""


def charset_of(content_type: str | None) -> str | None:
    """The charset parameter of a Content-Type header value, lower-cased, or None."""
    if not content_type:
        return None
    for param in content_type.split(";")[1:]:
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset":
            value = value.strip().strip('"').strip()
            return value.lower() or None
    return None


def parse_body(content: bytes, response_type: ResponseType, charset: str | None = None) -> Any:
    """Turn an upstream body into a JSON value; anything that does not parse is a ParseError."""
    try:
        if response_type == "XML":
            return _parse_xml(content, charset, response_type)
        text = _decode(content, charset, response_type)
        if response_type == "JSON":
            return orjson.loads(text) if text.strip() else None
        if response_type == "CSV":
            return list(csv.DictReader(io.StringIO(text, newline=""), restkey="_extra"))
        return text
    except (orjson.JSONDecodeError, csv.Error) as exc:
        raise _error(response_type, str(exc)) from exc
    except (ValueError, LookupError) as exc:  # expat: unsupported declared encoding
        # Not str(exc): it quotes the encoding name, which is the upstream's text.
        raise _error(response_type, "the XML declaration names an unsupported encoding") from exc


def _error(response_type: ResponseType, reason: str) -> ParseError:
    return ParseError(f"{response_type} body does not parse: {reason[:_MAX_REASON]}")


def _decode(content: bytes, charset: str | None, response_type: ResponseType) -> str:
    """Strict decoding so mojibake is refused rather than passed on; a UTF-8 BOM is dropped."""
    name = charset or "utf-8"
    try:
        codec = codecs.lookup(name).name
        return content.decode("utf-8-sig" if codec == "utf-8" else name)
    except LookupError as exc:
        # The name is not quoted: it is the upstream's text, and may reflect a secret it was sent.
        raise _error(response_type, "unknown charset in the Content-Type header") from exc
    except UnicodeDecodeError as exc:
        raise _error(response_type, f"not valid {name} at byte {exc.start}") from exc


def _parse_xml(content: bytes, charset: str | None, response_type: ResponseType) -> Any:
    """Bytes go to the parser as is so the XML declaration's encoding is honoured.

    defusedxml and expat are imported with the first XML body: a sidecar whose sources
    answer JSON never loads them (~1.5 MiB, README "Footprint").
    """
    from xml.etree.ElementTree import ParseError as XMLSyntaxError

    from defusedxml import DefusedXmlException
    from defusedxml.ElementTree import fromstring

    source: str | bytes = content if charset is None else _decode(content, charset, response_type)
    if not source.strip():
        return None
    try:
        root: Element = fromstring(source, forbid_dtd=True)
    except XMLSyntaxError as exc:
        raise _error(response_type, str(exc)) from exc
    except DefusedXmlException as exc:  # its repr names entities and URLs from the body
        raise _error(response_type, f"forbidden XML construct ({type(exc).__name__})") from exc
    return _element_value(root, 0, response_type)


def _element_value(element: Element, depth: int, response_type: ResponseType) -> Any:
    """Children become keys (repeated tags a list), attributes plain keys, text a string."""
    if depth > _MAX_XML_DEPTH:
        raise _error(response_type, f"elements nested deeper than {_MAX_XML_DEPTH} levels")
    text = element.text
    if len(element) == 0:
        if not element.attrib:
            return text
        return {**element.attrib, "text": text} if text is not None else dict(element.attrib)
    children: dict[str, Any] = {}
    for child in element:
        value = _element_value(child, depth + 1, response_type)
        if child.tag not in children:
            children[child.tag] = value
        elif isinstance(seen := children[child.tag], list):  # values are never lists
            seen.append(value)
        else:
            children[child.tag] = [seen, value]
    result: dict[str, Any] = dict(element.attrib)
    if text is not None and text.strip():
        result["text"] = text
    return {**result, **children}


def format_body(content: bytes, response_type: ResponseType, charset: str | None = None) -> bytes:
    """``parse_body`` encoded as JSON once, so cache hits can answer these bytes unchanged.

    orjson reads deeper nesting than it writes (1024 vs 254 levels): a body in
    between parses but cannot be answered, so it is a ParseError too.
    """
    value = parse_body(content, response_type, charset)
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError as exc:
        raise _error(response_type, str(exc)) from exc
