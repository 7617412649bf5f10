"""A data source's templates: parsed and checked once at registration, rendered per request.

``compile_source`` resolves every name and fixes where each value will land, so a bad
configuration fails at registration (``TemplateError`` → 422), not on a live request.
``check`` holds a call's values to the declarations (the one place that does), and
``render`` only looks checked values up, converts and encodes them. Runtime params come from
the caller, so whatever they hold is encoded for the place it lands: percent-encoded
in the URL, refused in a header when it carries control characters, escaped in an XML,
JSON or form text body. A runtime param can never reach another part of the request.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias
from urllib.parse import quote, quote_plus, unquote, urlencode, urlsplit
from xml.sax.saxutils import escape

import orjson

from proxy.errors import InvalidParam, MissingParams, MissingVariables, UnknownParams
from proxy.source_spec import HTTPSource

_BRACES = re.compile(r"\{\{(.*?)\}\}", re.S)
_NAME = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_.-]*)\s*")
_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_.-]*)\s*\}\}")
_SCHEME = re.compile(r"(?i)https?://")
_HEADER_UNSAFE = re.compile(r"[^\t\x20-\x7e]")  # httpx sends header values as ASCII
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Quotes for attributes; whitespace as references, which attribute normalisation keeps.
_XML_ENTITIES = {'"': "&quot;", "'": "&apos;", "\t": "&#9;", "\n": "&#10;", "\r": "&#13;"}
_XML_UNWRITABLE = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_FORM = "application/x-www-form-urlencoded"
_CASTS = {"str": "str", "string": "str", "int": "int", "integer": "int", "float": "float"}
_CASTS |= {"number": "float", "bool": "bool", "boolean": "bool", "auto": ""}
_BOOLS = {"true": True, "false": False, "1": True, "0": False}
MAX_URL_LENGTH = 16 * 1024
"""A runtime value may not push the URL (query params included) past this: servers refuse
request lines of 8-16 KiB, so a longer URL is a mistake or an attack, not a call to pay for."""
MAX_HEADER_VALUE = 8 * 1024
"""The longest runtime value a header takes, for the same reason."""


class TemplateError(ValueError):
    """A configuration error found at registration; the admin API answers 422 with it."""


@dataclass(frozen=True)
class Names:
    """Every placeholder name a source uses, before it is checked against declarations."""

    params: frozenset[str]
    env: frozenset[str]


@dataclass(frozen=True)
class RenderedRequest:
    """Everything httpx needs to send one upstream request.

    Variables (API keys) are rendered into the url, headers, params and content: none
    of them is in ``repr``, which tracebacks, ``%r`` and test diffs print.
    """

    method: str
    url: str = field(repr=False)
    headers: tuple[tuple[str, str], ...] = field(repr=False)
    params: tuple[tuple[str, str], ...] = field(repr=False)
    content: bytes | None = field(repr=False)


@dataclass(frozen=True, slots=True)
class _Ref:
    """One inserted value: a runtime param or a variable, cast to ``cast`` when given."""

    name: str
    is_param: bool
    cast: str | None = None


@dataclass(frozen=True, slots=True)
class _Const:
    value: Any


@dataclass(frozen=True, slots=True)
class _Str:
    parts: Text


@dataclass(frozen=True, slots=True)
class _Dict:
    items: tuple[tuple[str, Node], ...]


@dataclass(frozen=True, slots=True)
class _List:
    items: tuple[Node, ...]


Text: TypeAlias = tuple[str | _Ref, ...]
Node: TypeAlias = _Const | _Ref | _Str | _Dict | _List
_Enc: TypeAlias = Callable[[_Ref, str], str]
_Values: TypeAlias = Mapping[str, Any]
_BodyFn: TypeAlias = Callable[[_Values, _Values], bytes | None]


@dataclass(frozen=True, slots=True)
class CompiledSource:
    """A source's templates, parsed once; opaque outside this module."""

    method: str
    prefix: Text  # scheme://userinfo@host:port: literals and variables only
    path: Text
    query: Text  # from the first ? or # on
    url_name: str | None  # named when the URL's origin moves; None: nothing inserted after it
    url_params: tuple[str, ...]  # runtime params in the path, the query or the query params
    headers: tuple[tuple[str, Text], ...]
    added_headers: tuple[tuple[str, str], ...]
    params: tuple[tuple[str, Node], ...]
    body: _BodyFn
    runtime_params: frozenset[str]  # as declared: a call gives exactly these
    variables: tuple[str, ...]  # as declared: each needs a value


def _object_form(value: dict[str, Any]) -> tuple[Any, bool, Any] | None:
    """``(name, is_env, value_type)`` when ``value`` is one of the engine's object forms."""
    keys = value.keys()
    if keys == {"env"}:
        return value["env"], True, None
    if keys == {"param"} or keys == {"param", "value_type"}:
        return value["param"], False, value.get("value_type")
    return None


def scan_names(source: HTTPSource) -> Names:
    """Every placeholder name in url, header values, param values and body (nested)."""
    params: set[str] = set()
    env: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, str):
            for match in _PLACEHOLDER.finditer(value):
                name = match.group(1)
                target, name = (env, name[4:]) if name.startswith("env.") else (params, name)
                target.add(name)
        elif isinstance(value, dict):
            form = _object_form(value)
            if form is None:
                walk(list(value.values()))
            elif isinstance(form[0], str):
                (env if form[1] else params).add(form[0])
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk([source.url, list(source.headers.values()), list(source.params.values()), source.body])
    return Names(frozenset(params), frozenset(env))


class _Compiler:
    """Resolves names against the declarations and remembers every use, in order."""

    def __init__(self, runtime_params: Iterable[str], variables: Iterable[str]) -> None:
        self.runtime = frozenset(runtime_params)
        self.variables = frozenset(variables)
        if both := sorted(self.runtime & self.variables):
            raise TemplateError(f"declared both as runtime param and variable: {', '.join(both)}")
        self.used: list[_Ref] = []
        self.where = "url"

    def ref(self, name: Any, env: bool, value_type: Any = None) -> _Ref:
        if not isinstance(name, str):
            raise TemplateError(f"an object form in {self.where} needs a string name")
        if value_type is not None and (not isinstance(value_type, str) or value_type not in _CASTS):
            raise TemplateError(f"{name!r} in {self.where} has an unknown value_type")
        if env and name not in self.variables:
            raise TemplateError(f"env.{name} in {self.where} is not a declared variable")
        if not env and name not in self.runtime and name not in self.variables:
            raise TemplateError(
                f"{name!r} in {self.where} is neither a runtime param nor a variable"
            )
        cast = value_type if value_type and _CASTS[value_type] else None  # "auto" keeps the type
        ref = _Ref(name, not env and name in self.runtime, cast)
        self.used.append(ref)
        return ref

    def parts(self, text: str) -> Text:
        out: list[str | _Ref] = []
        pos = 0
        for match in _BRACES.finditer(text):
            named = _NAME.fullmatch(match.group(1))
            if named is None:
                raise TemplateError(f"a '{{{{ }}}}' in {self.where} does not hold a valid name")
            if match.start() > pos:
                out.append(text[pos : match.start()])
            name = named.group(1)
            out.append(
                self.ref(name[4:], True) if name.startswith("env.") else self.ref(name, False)
            )
            pos = match.end()
        if pos < len(text) or not out:
            out.append(text[pos:])
        return tuple(out)

    def pairs(self, mapping: dict[str, Any], label: str) -> tuple[tuple[str, Node], ...]:
        out = []
        for key, value in mapping.items():
            self.where = f"{label} {key!r}"
            out.append((key, self.node(value)))
        return tuple(out)

    def node(self, value: Any) -> Node:
        """A value tree; subtrees without placeholders collapse into constants."""
        if isinstance(value, str):
            parts = self.parts(value)
            if len(parts) == 1:
                return parts[0] if isinstance(parts[0], _Ref) else _Const(value)
            return _Str(parts)
        if isinstance(value, dict):
            if (form := _object_form(value)) is not None:
                return self.ref(*form)
            items = tuple((key, self.node(item)) for key, item in value.items())
            return _Const(value) if all(isinstance(n, _Const) for _, n in items) else _Dict(items)
        if isinstance(value, list):
            nodes = tuple(self.node(item) for item in value)
            return _Const(value) if all(isinstance(n, _Const) for n in nodes) else _List(nodes)
        return _Const(value)


def _find(text: str, chars: str, start: int) -> int:
    return min((i for c in chars if (i := text.find(c, start)) >= 0), default=len(text))


def compile_source(
    source: HTTPSource, runtime_params: Iterable[str], variables: Iterable[str]
) -> CompiledSource:
    """Check every name and every place a value lands; raises TemplateError."""
    variables = tuple(variables)
    comp = _Compiler(runtime_params, variables)
    url = source.url
    comp.parts(url)  # names and malformed placeholders, before the URL is cut at / ? #
    comp.used.clear()
    if (scheme := _SCHEME.match(url)) is None:
        raise TemplateError("url must start with http:// or https://")
    cut = _find(url, "/?#", scheme.end())
    if cut == scheme.end():
        raise TemplateError("url has no host")
    prefix = comp.parts(url[:cut])
    if ref := next((r for r in comp.used if r.is_param), None):
        raise TemplateError(f"runtime param {ref.name!r} can't set the URL's scheme, host or port")
    start, query_at = len(comp.used), _find(url, "?#", cut)
    path, query = comp.parts(url[cut:query_at]), comp.parts(url[query_at:])
    tail = comp.used[start:]
    url_name = next((r.name for r in tail if r.is_param), tail[0].name if tail else None)

    headers: list[tuple[str, Text]] = []
    content_type: str | None = None
    for name, value in source.headers.items():
        comp.where = f"header {name!r}"
        if isinstance(value, list) or (isinstance(value, dict) and not _object_form(value)):
            raise TemplateError(f"header {name!r} must be a string, a number or an object form")
        text = _as_text(comp.node(value))
        if any(isinstance(p, str) and _HEADER_UNSAFE.search(p) for p in (name, *text)):
            raise TemplateError(f"header {name!r} holds control or non-ASCII characters")
        if name.lower() == "content-type" and content_type is None:
            content_type = "".join(p for p in text if isinstance(p, str)).lower()
        headers.append((name, text))

    start = len(comp.used)
    params = comp.pairs(source.params, "param")
    url_params = dict.fromkeys(r.name for r in (*tail, *comp.used[start:]) if r.is_param)
    comp.where = "body"
    body, added = _compile_body(comp, source.body, content_type)
    return CompiledSource(
        method=source.method,
        prefix=prefix,
        path=path,
        query=query,
        url_name=url_name,
        url_params=tuple(url_params),
        headers=tuple(headers),
        added_headers=added,
        params=params,
        body=body,
        runtime_params=comp.runtime,
        variables=variables,
    )


def _as_text(node: Node) -> Text:
    """A header value as parts: a header is text, so even a whole placeholder becomes text."""
    if isinstance(node, _Str):
        return node.parts
    if isinstance(node, _Ref):
        return (node,)
    return (_text(node.value),) if isinstance(node, _Const) else ()  # dicts, lists refused


def _compile_body(
    comp: _Compiler, body: dict[str, Any] | str | None, content_type: str | None
) -> tuple[_BodyFn, tuple[tuple[str, str], ...]]:
    """The body's renderer, and the Content-Type header to add when none was given."""
    kind = content_type or ""
    if body is None:
        return (lambda p, v: None), ()
    if isinstance(body, dict) and "xml" in kind and body.keys() == {"xml"}:
        body = body["xml"] if isinstance(body["xml"], str) else body
    if isinstance(body, str):
        parts = comp.parts(body)
        enc = next((e for word, e in _TEXT_BODY_ENCODERS if word in kind), _plain)
        return (lambda p, v: _join(parts, p, v, enc).encode()), ()
    if _FORM in kind:
        pairs = comp.pairs(body, "form field")
        return (lambda p, v: urlencode(_pairs(pairs, p, v)).encode()), ()
    node = comp.node(body)
    added = (("Content-Type", "application/json"),) if content_type is None else ()
    return (lambda p, v: _dumps(_eval(node, p, v))), added


def check(
    compiled: CompiledSource, params: Mapping[str, Any], variables: Mapping[str, Any]
) -> None:
    """Whether a call's values fit the source's declarations: every runtime param and no
    other, a value for every variable. Raises MissingParams, UnknownParams or
    MissingVariables (names only, never values)."""
    if missing := sorted(compiled.runtime_params - params.keys()):
        raise MissingParams(missing)
    if unknown := sorted(params.keys() - compiled.runtime_params):
        raise UnknownParams(unknown)
    if unset := [name for name in compiled.variables if name not in variables]:
        raise MissingVariables(unset)


def render(
    compiled: CompiledSource, params: Mapping[str, Any], variables: Mapping[str, Any]
) -> RenderedRequest:
    """The request for values that passed ``check``; raises InvalidParam."""
    c = compiled
    prefix = _join(c.prefix, params, variables, _plain)
    rest = _join_path(c.path, params, variables) + _join(c.query, params, variables, _enc_query)
    url = prefix + rest
    if c.url_name is not None and not _keeps_origin(rest) and _origin(url) != _origin(prefix):
        raise InvalidParam(c.url_name, "would change the URL's scheme, host or port")
    query_params = tuple(_pairs(c.params, params, variables))
    if c.url_params and len(url) + len(urlencode(query_params)) > MAX_URL_LENGTH:
        longest = max(c.url_params, key=lambda name: len(_text(params[name])))
        raise InvalidParam(longest, f"would make the URL longer than {MAX_URL_LENGTH} characters")
    headers = tuple(
        [(name, _join(text, params, variables, _enc_header)) for name, text in c.headers]
    )
    return RenderedRequest(
        method=c.method,
        url=url,
        headers=headers + c.added_headers,
        params=query_params,
        content=c.body(params, variables),
    )


def _join_path(parts: Text, params: _Values, variables: _Values) -> str:
    """The URL path, where no runtime value makes a ``.`` or ``..`` segment, alone or with
    its neighbours (``/f/.{{ ext }}`` with ``ext=""``): clients and servers resolve those
    upward. A runtime value holds no ``/`` once encoded, so it sits in one segment."""
    texts = [
        p if isinstance(p, str) else _enc_path(p, _text(_value(p, params, variables)))
        for p in parts
    ]
    path = "".join(texts)
    segments, index = path.split("/"), 0
    for part, text in zip(parts, texts, strict=True):
        if isinstance(part, _Ref) and part.is_param and unquote(segments[index]) in (".", ".."):
            raise InvalidParam(part.name, "would climb out of its path segment")
        index += text.count("/")
    return path


def _keeps_origin(rest: str) -> bool:
    """Whether ``rest`` appended to a URL leaves its scheme, host and port as they were:
    it does when it is empty or opens with the character that ends the authority (``/``,
    ``?``, ``#``), which is how the template cut it. Two ``urlsplit`` (14 µs a request)
    are left for anything else."""
    return rest[:1] in ("", "/", "?", "#")


def _origin(url: str) -> tuple[str, str | None, int | None] | None:
    try:
        split = urlsplit(url)
        return split.scheme, split.hostname, split.port
    except ValueError:  # a port that is not a number
        return None


def _dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:  # integers beyond 64 bits, which the stdlib can write
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def _text(value: Any) -> str:
    """A value as text: strings as they are, everything else as compact JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return _dumps(value).decode()


def _cast(ref: _Ref, value: Any) -> Any:
    """The engine's ``value_type``: a caller's "42" may feed an int field, never "abc"."""
    kind = _CASTS[ref.cast or "auto"]
    try:
        if kind == "str":
            return _text(value)
        if kind == "bool":
            return value if isinstance(value, bool) else _BOOLS[_text(value).strip().lower()]
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError  # True is not the number 1 here
        if kind == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if math.isfinite(number := float(value)):
            return number
    except (ValueError, KeyError, OverflowError):
        pass
    raise InvalidParam(ref.name, f"cannot be read as {ref.cast}")


def _value(ref: _Ref, params: _Values, variables: _Values) -> Any:
    value = (params if ref.is_param else variables)[ref.name]
    return value if ref.cast is None else _cast(ref, value)


def _join(parts: Text, params: _Values, variables: _Values, enc: _Enc) -> str:
    return "".join(
        [p if isinstance(p, str) else enc(p, _text(_value(p, params, variables))) for p in parts]
    )


def _eval(node: Node, params: _Values, variables: _Values) -> Any:
    """A value tree rendered to JSON values: a whole placeholder keeps its value's type."""
    if isinstance(node, _Const):
        return node.value
    if isinstance(node, _Ref):
        return _value(node, params, variables)
    if isinstance(node, _Str):
        return _join(node.parts, params, variables, _plain)
    if isinstance(node, _Dict):
        return {key: _eval(item, params, variables) for key, item in node.items}
    return [_eval(item, params, variables) for item in node.items]


def _pairs(
    items: tuple[tuple[str, Node], ...], params: _Values, variables: _Values
) -> list[tuple[str, str]]:
    """Query or form pairs as text; a list value becomes one pair per item."""
    out: list[tuple[str, str]] = []
    for key, node in items:
        value = _eval(node, params, variables)
        out += [(key, _text(item)) for item in (value if isinstance(value, list) else [value])]
    return out


def _plain(ref: _Ref, text: str) -> str:
    return text


def _enc_path(ref: _Ref, text: str) -> str:
    if not ref.is_param:
        return quote(text, safe="/")  # an operator's variable may hold several segments
    return quote(text, safe="")


def _enc_query(ref: _Ref, text: str) -> str:
    return quote(text, safe="")


def _enc_header(ref: _Ref, text: str) -> str:
    if _HEADER_UNSAFE.search(text):
        unsafe = "would inject a header" if _CONTROL.search(text) else "is not ASCII"
        raise InvalidParam(ref.name, unsafe)
    if ref.is_param and len(text) > MAX_HEADER_VALUE:
        raise InvalidParam(ref.name, f"is longer than a header takes ({MAX_HEADER_VALUE})")
    return text


def _enc_xml(ref: _Ref, text: str) -> str:
    """XML 1.0 cannot hold most control characters, even as references: refused, since
    the upstream would reject or misread an ill-formed document."""
    if _XML_UNWRITABLE.search(text):
        raise InvalidParam(ref.name, "cannot be written in XML")
    return escape(text, _XML_ENTITIES)


_TEXT_BODY_ENCODERS: tuple[tuple[str, _Enc], ...] = (
    ("xml", _enc_xml),
    ("json", lambda ref, text: orjson.dumps(text)[1:-1].decode()),
    (_FORM, lambda ref, text: quote_plus(text, safe="")),
)
