"""proxy.templates under hypothesis: no runtime value, however hostile, steers the request.

Each property says what a rendering may do with an arbitrary value: refuse it with
INVALID_PARAM naming the parameter (in a fixed message, so never the value), or put it
exactly where the template says and nowhere else. Runs are derandomized, so CI sees
the same examples every time; the hostile pieces are mixed in explicitly, since
plain ``st.text()`` rarely spells ``%2e`` or ``[::1]``.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit
from xml.etree import ElementTree

import httpx
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.errors import InvalidParam
from proxy.source_spec import HTTPSource
from proxy.templates import (
    MAX_HEADER_VALUE,
    MAX_URL_LENGTH,
    CompiledSource,
    RenderedRequest,
    compile_source,
    render,
)

PROPERTY = settings(max_examples=400, deadline=None, derandomize=True, database=None)

HOSTILE = [
    ".", "..", "\u3002", "\uff0e", "\uff61", "%2e", "%2E%2e", "@", "\\", "/", "//", "%2f", "%5c", ":", "?",
    "#", "&", "=", "+", "%", "%00", "%0d%0a", "\r\n", "\r", "\n", "\x00", "\t", " ",
    "[::1]", "[fd00:ec2::254]", "169.254.169.254", "evil.example", "http://evil.example",
    "//evil.example:80", "user:pass@", ":8080", "\u2025", "\u2024", "\ufe52", "é", "\U0001d54f",
    "X-Injected: 1", "<", ">", '"', "'", "{{ p }}", "{{ env.SECRET }}",
]  # fmt: skip
JSON_SCALARS = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
)
texts = st.lists(st.sampled_from(HOSTILE) | st.text(max_size=8), max_size=6).map("".join)
json_values = st.recursive(
    JSON_SCALARS | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=6,
)
values = texts | json_values | st.text()


def compiled(**source: Any) -> CompiledSource:
    source.setdefault("url", "https://api.example.com/x")
    return compile_source(HTTPSource(**source), ["p"], ["SECRET"])


def attempt(source: CompiledSource, value: Any, *reasons: str) -> RenderedRequest | None:
    """The rendering, or None when it was refused for one of ``reasons``, naming ``p`` only."""
    try:
        return render(source, {"p": value}, {"SECRET": "s3cret"})
    except InvalidParam as exc:
        assert exc.to_dict()["param"] == "p"
        assert exc.message in {f"parameter 'p' {reason}" for reason in reasons}, exc.message
        return None


def pairs_of(value: Any) -> list[Any]:
    """Query params and form fields: a list value is one pair per item."""
    return value if isinstance(value, list) else [value]


def reads_as(text: str, value: Any) -> bool:
    """The contract's text of a value: a string as it is, anything else as its JSON."""
    return text == value if isinstance(value, str) else json.loads(text) == value


# --- the URL -------------------------------------------------------------------------------

URL_TEMPLATES = [
    "https://api.example.com:8443/v1/{{ p }}/items?q={{ p }}&x=1",
    "http://10.0.0.7/{{ p }}",
    "https://api.example.com/files/.{{ p }}/raw",  # a literal dot beside the value
    "https://api.example.com/a/{{ p }}{{ p }}/b?{{ p }}",  # two values in one segment
    "http://[::1]:8080/{{ p }}?q={{ p }}#frag",
    "https://{{ env.SECRET }}@api.example.com/{{ env.SECRET }}/{{ p }}",
]
URL_REASONS = (
    "would climb out of its path segment",
    "would change the URL's scheme, host or port",
    f"would make the URL longer than {MAX_URL_LENGTH} characters",
)


def with_params(rendered: RenderedRequest) -> httpx.URL:
    """The URL as proxy.upstream sends it: query params appended after the template's query."""
    url = httpx.URL(rendered.url)
    extra = urlencode(rendered.params).encode("ascii")
    return url.copy_with(query=url.query + b"&" + extra if url.query else extra) if extra else url


def shape(url: httpx.URL) -> tuple[Any, ...]:
    """What a value must not change, as httpx and the stdlib read the URL. httpx drops "."
    and ".." segments as it parses, so one that appeared shows as a segment less."""
    split = urlsplit(str(url))
    return (
        (url.scheme, url.host, url.port, url.raw_path.split(b"?", 1)[0].count(b"/")),
        (split.scheme, split.hostname, split.port, split.path.count("/")),
    )


@PROPERTY
@given(template=st.sampled_from(URL_TEMPLATES), value=values)
def test_a_value_never_moves_the_origin_nor_adds_a_segment(template: str, value: Any) -> None:
    source = compiled(url=template, params={"extra": "{{ p }}"})
    rendered = attempt(source, value, *URL_REASONS)
    if rendered is None:
        return
    benign = render(source, {"p": "x"}, {"SECRET": "s3cret"})
    assert shape(httpx.URL(rendered.url)) == shape(httpx.URL(benign.url))
    assert shape(with_params(rendered)) == shape(with_params(benign))


@PROPERTY
@given(value=values)
def test_a_query_value_reads_back_whole(value: Any) -> None:
    source = compiled(url="https://api.example.com/s?q={{ p }}&lang=en", params={"e": "{{ p }}"})
    rendered = attempt(source, value, *URL_REASONS)
    if rendered is None:
        return
    sent = parse_qsl(with_params(rendered).query.decode("ascii"), keep_blank_values=True)
    items = pairs_of(value)
    assert [k for k, _ in sent] == ["q", "lang", *["e"] * len(items)]
    assert reads_as(sent[0][1], value) and sent[1][1] == "en"
    assert all(reads_as(text, item) for (_, text), item in zip(sent[2:], items, strict=True))


@PROPERTY
@given(value=st.text(alphabet="ab.%2e/", max_size=5))
def test_dot_segments_are_refused_not_normalised(value: str) -> None:
    """What a server would resolve upward never leaves: a "." or ".." segment is refused."""
    source = compiled(url="https://api.example.com/a/{{ p }}/b")
    rendered = attempt(source, value, *URL_REASONS)
    assert (rendered is None) == (value in (".", ".."))


def test_a_value_too_long_for_a_url_is_refused() -> None:
    source = compiled(url="https://api.example.com/{{ p }}")
    assert attempt(source, "v" * MAX_URL_LENGTH, *URL_REASONS) is None
    assert attempt(source, "v" * 1000, *URL_REASONS) is not None


# --- headers -------------------------------------------------------------------------------

HEADER_REASONS = (
    "would inject a header",
    "is not ASCII",
    f"is longer than a header takes ({MAX_HEADER_VALUE})",
)
HEADERS = {
    "X-A": "v {{ p }}",
    "X-B": "{{ p }}",
    "Accept": "application/json",
    "X-S": "{{ SECRET }}",
}


@PROPERTY
@given(value=values, body=st.sampled_from([None, {"k": "{{ p }}"}]))
def test_exactly_the_declared_headers_leave(value: Any, body: Any) -> None:
    source = compiled(url="https://api.example.com/x", method="POST", headers=HEADERS, body=body)
    rendered = attempt(source, value, *HEADER_REASONS)
    if rendered is None:
        return
    added = () if body is None else ("Content-Type",)
    assert tuple(name for name, _ in rendered.headers) == (*HEADERS, *added)
    for _, text in rendered.headers:
        assert not {"\r", "\n", "\x00"} & set(text)
    assert reads_as(dict(rendered.headers)["X-B"], value)
    request = httpx.Request("POST", rendered.url, headers=list(rendered.headers))
    assert [k for k in request.headers if k.startswith("x-")] == ["x-a", "x-b", "x-s"]


# --- bodies --------------------------------------------------------------------------------


@PROPERTY
@given(value=values)
def test_a_json_body_is_valid_json_holding_the_value(value: Any) -> None:
    body = {"whole": "{{ p }}", "text": "a {{ p }} b", "nested": [{"k": "{{ p }}"}]}
    rendered = attempt(compiled(method="POST", body=body), value)
    assert rendered is not None and rendered.content is not None
    sent = json.loads(rendered.content)  # the stdlib: integers beyond 64 bits stay exact
    assert sent["whole"] == value and sent["nested"] == [{"k": value}]
    assert sent["text"].startswith("a ") and sent["text"].endswith(" b")
    assert reads_as(sent["text"][2:-2], value)


@PROPERTY
@given(value=values)
def test_a_json_text_body_is_valid_json_holding_the_text(value: Any) -> None:
    source = compiled(
        method="POST", headers={"Content-Type": "application/json"}, body='{"s": "<{{ p }}>"}'
    )
    rendered = attempt(source, value)
    assert rendered is not None and rendered.content is not None
    sent = json.loads(rendered.content)
    assert sent.keys() == {"s"} and reads_as(sent["s"][1:-1], value)


@PROPERTY
@given(value=values)
def test_a_form_body_reads_back_whole(value: Any) -> None:
    """A field per list item from an object body; the value's text from a string body."""
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    for body, items in (({"g": "1", "f": "{{ p }}"}, pairs_of(value)), ("g=1&f={{ p }}", [value])):
        rendered = attempt(compiled(method="POST", headers=form, body=body), value)
        assert rendered is not None and rendered.content is not None
        sent = parse_qsl(rendered.content.decode("ascii"), keep_blank_values=True)
        assert [k for k, _ in sent] == ["g", *["f"] * len(items)] and sent[0][1] == "1"
        assert all(reads_as(text, item) for (_, text), item in zip(sent[1:], items, strict=True))


@PROPERTY
@given(value=values)
def test_an_xml_body_is_well_formed_holding_the_text(value: Any) -> None:
    """XML 1.0 cannot carry most control characters at all: those are refused."""
    source = compiled(
        method="POST",
        headers={"Content-Type": "text/xml"},
        body={"xml": '<r a="{{ p }}"><v>{{ p }}</v></r>'},
    )
    rendered = attempt(source, value, "cannot be written in XML")
    if rendered is None:
        return
    assert rendered.content is not None
    root = ElementTree.fromstring(rendered.content)
    assert reads_as(root.get("a") or "", value)
    assert reads_as(root.findtext("v") or "", value)


# --- the rules above, one example each ------------------------------------------------------


def test_a_value_too_long_for_a_header_is_refused() -> None:
    source = compiled(headers={"X": "{{ p }}"})
    assert attempt(source, "v" * (MAX_HEADER_VALUE + 1), *HEADER_REASONS) is None
    rendered = attempt(source, "v" * MAX_HEADER_VALUE, *HEADER_REASONS)
    assert rendered is not None and rendered.headers == (("X", "v" * MAX_HEADER_VALUE),)


def test_an_empty_value_beside_a_literal_dot_is_refused() -> None:
    """``/files/.{{ p }}`` with ``p=""`` is ``/files/.``, which resolves to ``/files/``."""
    source = compiled(url="https://api.example.com/files/.{{ p }}/raw")
    assert attempt(source, "", *URL_REASONS) is None
    assert attempt(source, "x", *URL_REASONS) is not None


def test_xml_keeps_whitespace_and_refuses_control_characters() -> None:
    source = compiled(
        method="POST", headers={"Content-Type": "text/xml"}, body={"xml": '<r a="{{ p }}"/>'}
    )
    assert attempt(source, "a\x01b", "cannot be written in XML") is None
    rendered = attempt(source, "a\tb\r\nc")
    assert rendered is not None and rendered.content == b'<r a="a&#9;b&#13;&#10;c"/>'
