"""proxy.templates: names are checked at compile, values land only where they are meant to."""

from __future__ import annotations

import dataclasses
import re
from typing import Any
from urllib.parse import parse_qsl

import httpx
import orjson
import pytest

from proxy.errors import InvalidParam, MissingParams, MissingVariables, UnknownParams
from proxy.source_spec import HTTPSource
from proxy.templates import (
    CompiledSource,
    Names,
    RenderedRequest,
    TemplateError,
    check,
    compile_source,
    render,
    scan_names,
)

SEED_SECTION_5: dict[str, Any] = {
    "url": "https://api.example.com/users/{{ user_id }}",
    "method": "GET",
    "headers": {"Authorization": "Bearer {{ api_token }}"},
    "params": {"include": "profile"},
}


def build(
    runtime_params: list[str] | None = None, variables: list[str] | None = None, /, **source: Any
) -> CompiledSource:
    source.setdefault("url", "https://api.example.com/x")
    return compile_source(HTTPSource(**source), runtime_params or [], variables or [])


def go(
    params: dict[str, Any] | None = None, variables: dict[str, Any] | None = None, /, **source: Any
) -> RenderedRequest:
    """Compile with every given name declared, then render."""
    params, variables = params or {}, variables or {}
    return render(build(list(params), list(variables), **source), params, variables)


def to_httpx(r: RenderedRequest) -> httpx.Request:
    return httpx.Request(
        r.method, r.url, params=list(r.params) or None, headers=list(r.headers), content=r.content
    )


def seed_section_5() -> RenderedRequest:
    compiled = compile_source(HTTPSource(**SEED_SECTION_5), ["user_id"], ["api_token"])
    return render(compiled, {"user_id": "12345"}, {"api_token": "abc123token"})


# --- the seed's examples -------------------------------------------------------------------


def test_seed_section_5_example() -> None:
    r = seed_section_5()
    assert r == RenderedRequest(
        method="GET",
        url="https://api.example.com/users/12345",
        headers=(("Authorization", "Bearer abc123token"),),
        params=(("include", "profile"),),
        content=None,
    )


def test_seed_section_5_example_through_httpx() -> None:
    request = to_httpx(seed_section_5())
    assert str(request.url) == "https://api.example.com/users/12345?include=profile"
    assert request.headers["Authorization"] == "Bearer abc123token"
    assert request.method == "GET"
    assert request.content == b""


def test_example_1_github() -> None:
    source = HTTPSource(
        url="https://api.github.com/users/{{ username }}",
        method="GET",
        headers={
            "Authorization": "token {{ github_token }}",
            "Accept": "application/vnd.github.v3+json",
        },
        response_type="JSON",
        timeout=30,
    )
    compiled = compile_source(source, ["username"], ["github_token"])
    r = render(compiled, {"username": "octocat"}, {"github_token": "abc123token"})
    assert (r.method, r.url) == ("GET", "https://api.github.com/users/octocat")
    assert r.headers == (
        ("Authorization", "token abc123token"),
        ("Accept", "application/vnd.github.v3+json"),
    )
    assert r.params == ()
    assert r.content is None
    assert str(to_httpx(r).url) == "https://api.github.com/users/octocat"


def test_example_2_csv() -> None:
    source = HTTPSource(
        url="https://data.company.com/products.csv", response_type="CSV", timeout=60
    )
    r = render(compile_source(source, [], []), {}, {})
    assert r == RenderedRequest("GET", "https://data.company.com/products.csv", (), (), None)


def test_example_3_soap() -> None:
    source = HTTPSource(
        url="https://legacy.system.com/soap",
        method="POST",
        headers={"Content-Type": "text/xml", "SOAPAction": "GetCustomer"},
        body={"xml": "<soap:Envelope>...</soap:Envelope>"},
        response_type="XML",
        timeout=45,
    )
    r = render(compile_source(source, [], []), {}, {})
    assert r.method == "POST"
    assert r.url == "https://legacy.system.com/soap"
    assert r.headers == (("Content-Type", "text/xml"), ("SOAPAction", "GetCustomer"))
    assert r.content == b"<soap:Envelope>...</soap:Envelope>"


# --- placeholder syntax and name resolution ------------------------------------------------


@pytest.mark.parametrize("spelling", ["{{id}}", "{{ id }}", "{{  id }}", "{{\tid\n}}"])
def test_placeholder_spacing(spelling: str) -> None:
    r = go({"id": "7"}, url=f"https://a.example/u/{spelling}")
    assert r.url == "https://a.example/u/7"


def test_env_prefix_and_plain_name_both_reach_variables() -> None:
    r = go(
        None,
        {"tok": "T", "region": "eu"},
        url="https://{{ region }}.example.com/x",
        headers={"A": "{{ env.tok }}", "B": "{{tok}}"},
    )
    assert r.url == "https://eu.example.com/x"
    assert r.headers == (("A", "T"), ("B", "T"))


def test_names_with_dots_and_dashes() -> None:
    r = go({"a.b-c": "v"}, url="https://a.example/{{ a.b-c }}")
    assert r.url == "https://a.example/v"


def test_declared_but_unused_names_are_allowed() -> None:
    compiled = build(["unused"], ["also_unused"])
    assert render(compiled, {}, {}).url == "https://api.example.com/x"


# --- JSON bodies ---------------------------------------------------------------------------


def test_json_body_whole_placeholders_keep_their_type() -> None:
    r = go(
        {"n": 42, "obj": {"k": [1, 2]}, "flag": False, "nothing": None, "ratio": 0.5},
        {"secret": "s3"},
        method="POST",
        body={
            "count": "{{ n }}",
            "filter": "{{ obj }}",
            "flag": "{{flag}}",
            "nothing": "{{ nothing }}",
            "nested": {"list": ["{{ n }}", "lit", {"deep": "{{ ratio }}"}], "key": "{{ secret }}"},
            "literal": {"untouched": [1, "two"]},
        },
    )
    assert orjson.loads(r.content or b"") == {
        "count": 42,
        "filter": {"k": [1, 2]},
        "flag": False,
        "nothing": None,
        "nested": {"list": [42, "lit", {"deep": 0.5}], "key": "s3"},
        "literal": {"untouched": [1, "two"]},
    }
    assert ("Content-Type", "application/json") in r.headers


def test_json_body_text_substitution_inside_strings() -> None:
    r = go(
        {"n": 42, "obj": {"a": 1}, "yes": True, "name": "Ann"},
        method="POST",
        body={"msg": "n={{ n }} obj={{ obj }} yes={{ yes }}", "hi": "hello {{ name }}!"},
    )
    assert orjson.loads(r.content or b"") == {
        "msg": 'n=42 obj={"a":1} yes=true',
        "hi": "hello Ann!",
    }


def test_json_body_keeps_a_given_content_type() -> None:
    r = go(
        {"n": 1}, method="POST", headers={"content-type": "application/vnd.x+json"}, body={"a": 1}
    )
    assert r.headers == (("content-type", "application/vnd.x+json"),)
    assert r.content == b'{"a":1}'


def test_an_empty_body_is_no_body() -> None:
    # The engine's default body, which the admin API shows for "no body": nothing is sent.
    r = go(method="POST", body={})
    assert r.content is None
    assert r.headers == ()


def test_json_body_large_integer_literal() -> None:
    r = go({"n": 1}, method="POST", body={"big": 2**70, "n": "{{ n }}"})
    assert r.content == b'{"big":1180591620717411303424,"n":1}'


def test_object_forms_in_json_body() -> None:
    r = go(
        {"age": "42", "score": "1.5", "ok": "true", "raw": [1]},
        {"KEY": "k"},
        method="POST",
        body={
            "age": {"param": "age", "value_type": "int"},
            "score": {"param": "score", "value_type": "number"},
            "ok": {"param": "ok", "value_type": "boolean"},
            "raw": {"param": "raw"},
            "auto": {"param": "raw", "value_type": "auto"},
            "text": {"param": "raw", "value_type": "str"},
            "key": {"env": "KEY"},
            "list": [{"env": "KEY"}],
        },
    )
    assert orjson.loads(r.content or b"") == {
        "age": 42,
        "score": 1.5,
        "ok": True,
        "raw": [1],
        "auto": [1],
        "text": "[1]",
        "key": "k",
        "list": ["k"],
    }


@pytest.mark.parametrize(
    ("value_type", "value", "expected"),
    [
        ("int", "42", 42),
        ("integer", 7.0, 7),
        ("int", 5, 5),
        ("float", 3, 3.0),
        ("float", "2.5", 2.5),
        ("bool", "FALSE", False),
        ("bool", 1, True),
        ("bool", True, True),
        ("string", 12, "12"),
        ("str", False, "false"),
        ("str", None, "null"),
    ],
)
def test_value_type_casts(value_type: str, value: Any, expected: Any) -> None:
    r = go({"v": value}, method="POST", body={"v": {"param": "v", "value_type": value_type}})
    result = orjson.loads(r.content or b"")["v"]
    assert result == expected
    assert type(result) is type(expected)


@pytest.mark.parametrize(
    ("value_type", "value"),
    [
        ("int", "abc"),
        ("int", 1.5),
        ("int", True),
        ("int", "1.0"),
        ("int", [1]),
        ("float", "nan"),
        ("float", "inf"),
        ("float", False),
        ("number", {"a": 1}),
        ("bool", "yes please"),
        ("bool", 2),
    ],
)
def test_value_type_cast_failures(value_type: str, value: Any) -> None:
    compiled = build(["v"], method="POST", body={"v": {"param": "v", "value_type": value_type}})
    with pytest.raises(InvalidParam) as caught:
        render(compiled, {"v": value}, {})
    assert caught.value.message == f"parameter 'v' cannot be read as {value_type}"
    assert caught.value.to_dict()["param"] == "v"


def test_object_form_with_value_type_as_header_and_param() -> None:
    r = go(
        {"n": "0042"},
        {"TOKEN": "t"},
        headers={"X-N": {"param": "n", "value_type": "int"}, "X-T": {"env": "TOKEN"}},
        params={"n": {"param": "n", "value_type": "integer"}},
    )
    assert r.headers == (("X-N", "42"), ("X-T", "t"))
    assert r.params == (("n", "42"),)


# --- form, text and XML bodies -------------------------------------------------------------


def test_form_body() -> None:
    r = go(
        {"user": "a&b=c", "tags": ["x", "y z"], "n": 3},
        {"pw": "p@ss"},
        method="POST",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        body={"user": "{{ user }}", "pw": "{{ env.pw }}", "tag": "{{ tags }}", "n": "{{ n }}"},
    )
    assert r.content == b"user=a%26b%3Dc&pw=p%40ss&tag=x&tag=y+z&n=3"
    assert parse_qsl((r.content or b"").decode()) == [
        ("user", "a&b=c"),
        ("pw", "p@ss"),
        ("tag", "x"),
        ("tag", "y z"),
        ("n", "3"),
    ]
    assert r.headers == (("Content-Type", "application/x-www-form-urlencoded"),)


def test_string_body_is_sent_as_is() -> None:
    r = go(
        {"name": "Zoë", "n": 5},
        method="PUT",
        headers={"Content-Type": "text/plain"},
        body="hello {{ name }}, you are {{ n }}",
    )
    assert r.content == "hello Zoë, you are 5".encode()
    assert r.headers == (("Content-Type", "text/plain"),)
    assert r.method == "PUT"


def test_string_body_without_content_type_gets_none_added() -> None:
    r = go({"x": "1"}, method="POST", body="x={{ x }}")
    assert r.headers == ()
    assert r.content == b"x=1"


def test_xml_body_escapes_inserted_values() -> None:
    r = go(
        {"id": '</Id><Admin>true</Admin><Id a="\'">'},
        method="POST",
        headers={"Content-Type": "application/soap+xml; charset=utf-8"},
        body={"xml": "<Get><Id>{{ id }}</Id></Get>"},
    )
    assert r.content == (
        b"<Get><Id>&lt;/Id&gt;&lt;Admin&gt;true&lt;/Admin&gt;&lt;Id a=&quot;&apos;&quot;&gt;"
        b"</Id></Get>"
    )


def test_xml_string_body_escapes_too() -> None:
    r = go({"q": "a & b"}, method="POST", headers={"Content-Type": "text/xml"}, body="<q>{{q}}</q>")
    assert r.content == b"<q>a &amp; b</q>"


def test_xml_key_without_xml_content_type_is_json() -> None:
    r = go(method="POST", body={"xml": "<a/>"})
    assert r.content == b'{"xml":"<a/>"}'
    assert ("Content-Type", "application/json") in r.headers


def test_json_text_body_escapes_inserted_values() -> None:
    r = go(
        {"name": 'x", "admin": true, "y": "'},
        method="POST",
        headers={"Content-Type": "application/json"},
        body='{"name": "{{ name }}"}',
    )
    assert orjson.loads(r.content or b"") == {"name": 'x", "admin": true, "y": "'}


def test_form_text_body_encodes_inserted_values() -> None:
    r = go(
        {"u": "a&admin=1"},
        method="POST",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        body="user={{ u }}",
    )
    assert r.content == b"user=a%26admin%3D1"


# --- query params --------------------------------------------------------------------------


def test_params_keep_order_and_become_text() -> None:
    r = go(
        {"ids": [1, "b"], "page": 2, "flag": True, "q": "x y", "obj": {"a": 1}},
        {"key": "K"},
        params={
            "z": "lit",
            "ids": "{{ ids }}",
            "page": "{{ page }}",
            "flag": "{{ flag }}",
            "search": "q={{ q }}&more",
            "key": "{{ env.key }}",
            "obj": "{{ obj }}",
            "const_list": [1, 2],
            "num": 5,
            "mixed": ["{{ page }}", "x"],
        },
    )
    assert r.params == (
        ("z", "lit"),
        ("ids", "1"),
        ("ids", "b"),
        ("page", "2"),
        ("flag", "true"),
        ("search", "q=x y&more"),
        ("key", "K"),
        ("obj", '{"a":1}'),
        ("const_list", "1"),
        ("const_list", "2"),
        ("num", "5"),
        ("mixed", "2"),
        ("mixed", "x"),
    )
    url = to_httpx(r).url
    assert url.params.get_list("ids") == ["1", "b"]
    assert url.params["search"] == "q=x y&more"


def test_url_query_template_is_encoded() -> None:
    r = go(
        {"q": "a&b=c#d", "n": 1}, {"v": "x/y"}, url="https://a.example/s?q={{ q }}&v={{v}}&n={{n}}"
    )
    assert r.url == "https://a.example/s?q=a%26b%3Dc%23d&v=x%2Fy&n=1"
    assert dict(to_httpx(r).url.params) == {"q": "a&b=c#d", "v": "x/y", "n": "1"}


# --- URL injection -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        ("evil.com/", "evil.com%2F"),
        ("@evil.com", "%40evil.com"),
        ("//evil", "%2F%2Fevil"),
        ("%2f", "%252f"),
        ("a\r\nX-Evil: 1", "a%0D%0AX-Evil%3A%201"),
        ("?admin=1#x", "%3Fadmin%3D1%23x"),
        ("../..", "..%2F.."),
        ("...", "..."),
        (":8080", "%3A8080"),
    ],
)
def test_runtime_param_stays_in_its_path_segment(value: str, encoded: str) -> None:
    r = go({"id": value}, url="https://api.example.com/users/{{ id }}/posts")
    assert r.url == f"https://api.example.com/users/{encoded}/posts"
    url = to_httpx(r).url
    assert (url.scheme, url.host, url.port) == ("https", "api.example.com", None)
    assert url.raw_path.startswith(b"/users/")
    assert url.raw_path.endswith(b"/posts")


@pytest.mark.parametrize("value", [".", ".."])
def test_dot_segments_are_refused(value: str) -> None:
    compiled = build(["id"], url="https://api.example.com/users/{{ id }}")
    with pytest.raises(InvalidParam) as caught:
        render(compiled, {"id": value}, {})
    assert caught.value.message == "parameter 'id' would climb out of its path segment"


def test_dots_in_the_query_are_harmless() -> None:
    assert go({"q": ".."}, url="https://a.example/s?q={{ q }}").url == "https://a.example/s?q=.."


def test_variables_in_the_path_may_hold_slashes() -> None:
    r = go({"id": "1"}, {"base": "v2/api x"}, url="https://a.example/{{ env.base }}/{{ id }}")
    assert r.url == "https://a.example/v2/api%20x/1"


def test_variables_may_set_host_port_and_userinfo() -> None:
    r = go(
        {"id": "1"},
        {"user": "u", "host": "h.example", "port": 8443},
        url="https://{{ env.user }}@{{ env.host }}:{{ env.port }}/{{ id }}",
    )
    assert r.url == "https://u@h.example:8443/1"


def test_origin_check_is_defence_in_depth() -> None:
    """Encoding already keeps params out of the origin; the check catches a broken template."""
    compiled = build(["id"], url="https://api.example.com/{{ id }}")
    broken = dataclasses.replace(compiled, path=compiled.path[1:])  # drop the "/" literal
    with pytest.raises(InvalidParam) as caught:
        render(broken, {"id": "evil.com"}, {})
    assert caught.value.message == "parameter 'id' would change the URL's scheme, host or port"


# --- header injection ----------------------------------------------------------------------


@pytest.mark.parametrize("value", ["a\r\nX-Evil: 1", "a\nb", "a\rb", "a\x00b", "a\x1bb", "\x7f"])
def test_header_injection_is_refused(value: str) -> None:
    compiled = build(["who"], headers={"X-Who": "user {{ who }}"})
    with pytest.raises(InvalidParam) as caught:
        render(compiled, {"who": value}, {})
    assert caught.value.message == "parameter 'who' would inject a header"


def test_header_injection_through_a_variable_names_it() -> None:
    compiled = build([], ["TOKEN"], headers={"Authorization": {"env": "TOKEN"}})
    with pytest.raises(InvalidParam) as caught:
        render(compiled, {}, {"TOKEN": "t\r\nX: y"})
    assert caught.value.to_dict()["param"] == "TOKEN"
    assert "t\r\n" not in caught.value.message


def test_header_non_ascii_is_refused() -> None:
    compiled = build(["who"], headers={"X-Who": "{{ who }}"})
    with pytest.raises(InvalidParam, match="'who' is not ASCII"):
        render(compiled, {"who": "Zoë"}, {})


def test_header_tab_is_allowed() -> None:
    assert go({"v": "a\tb"}, headers={"X": "{{ v }}"}).headers == (("X", "a\tb"),)


def test_header_scalar_literals_become_text() -> None:
    r = go(headers={"X-N": 5, "X-B": True})
    assert r.headers == (("X-N", "5"), ("X-B", "true"))


# --- checking a call's values --------------------------------------------------------------


def test_missing_params_are_named_together() -> None:
    compiled = build(
        ["a", "b", "c"], ["V"], url="https://x.example/{{ a }}/{{ b }}", body={"c": "{{ c }}"}
    )
    with pytest.raises(MissingParams) as caught:
        check(compiled, {"b": 1}, {"V": "v"})
    assert caught.value.to_dict()["params"] == ["a", "c"]


def test_declared_params_are_required_even_where_no_template_uses_them() -> None:
    with pytest.raises(MissingParams) as caught:
        check(build(["id", "unused"], url="https://x.example/{{ id }}"), {"id": 1}, {})
    assert caught.value.to_dict()["params"] == ["unused"]


def test_undeclared_params_are_refused() -> None:
    with pytest.raises(UnknownParams) as caught:
        check(build(["id"], url="https://x.example/{{ id }}"), {"id": 1, "debug": True}, {})
    assert caught.value.to_dict()["params"] == ["debug"]


def test_missing_variables() -> None:
    compiled = build(
        ["id"], ["TOKEN", "OTHER"], headers={"A": "{{ env.TOKEN }}", "B": "{{ OTHER }}"}
    )
    with pytest.raises(MissingVariables) as caught:
        check(compiled, {"id": 1}, {"OTHER": ""})
    assert caught.value.to_dict()["variables"] == ["TOKEN"]


def test_checked_values_render() -> None:
    compiled = build(["id"], ["TOKEN"], url="https://x.example/{{ id }}?k={{ TOKEN }}")
    check(compiled, {"id": 1}, {"TOKEN": "t"})
    assert render(compiled, {"id": 1}, {"TOKEN": "t"}).url == "https://x.example/1?k=t"


def test_empty_values_are_values() -> None:
    r = go({"id": ""}, {"T": ""}, url="https://x.example/u/{{ id }}", headers={"A": "x{{ T }}"})
    assert r.url == "https://x.example/u/"
    assert r.headers == (("A", "x"),)


def test_rendering_twice_gives_fresh_results() -> None:
    compiled = build(
        ["id"], url="https://x.example/{{ id }}", method="POST", body={"i": "{{ id }}"}
    )
    first, second = render(compiled, {"id": 1}, {}), render(compiled, {"id": 2}, {})
    assert (first.url, first.content) == ("https://x.example/1", b'{"i":1}')
    assert (second.url, second.content) == ("https://x.example/2", b'{"i":2}')


# --- compile errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("runtime_params", "variables", "source", "message"),
    [
        ([], [], {"url": "https://x.example/{{ who }}"}, "'who' in url is neither"),
        ([], [], {"headers": {"A": "{{ who }}"}}, "'who' in header 'A' is neither"),
        ([], [], {"params": {"p": {"param": "who"}}}, "'who' in param 'p' is neither"),
        ([], [], {"body": {"a": [{"b": "{{ who }}"}]}}, "'who' in body is neither"),
        (
            ["tok"],
            [],
            {"headers": {"A": "{{ env.tok }}"}},
            "env.tok in header 'A' is not a declared",
        ),
        ([], [], {"body": {"a": {"env": "prod"}}}, "env.prod in body is not a declared variable"),
        (["x"], ["x"], {}, "declared both as runtime param and variable: x"),
        (["h"], [], {"url": "https://{{ h }}/x"}, "runtime param 'h' can't set the URL's"),
        (["p"], [], {"url": "https://a.example:{{ p }}/x"}, "runtime param 'p' can't set"),
        (["u"], [], {"url": "http://{{ u }}@a.example"}, "runtime param 'u' can't set"),
        ([], ["B"], {"url": "{{ B }}/x"}, "url must start with http:// or https://"),
        ([], [], {"url": "ftp://a.example/x"}, "url must start with http:// or https://"),
        ([], [], {"url": "a.example/x"}, "url must start with http:// or https://"),
        ([], [], {"url": "https:///x"}, "url has no host"),
        ([], [], {"headers": {"X\r\nY": "v"}}, "header 'X\\r\\nY' holds control"),
        ([], [], {"headers": {"X": "a\r\nY: b"}}, "header 'X' holds control"),
        ([], [], {"headers": {"X": "a\x00"}}, "header 'X' holds control"),
        ([], [], {"headers": {"X": {"a": 1}}}, "header 'X' must be a string"),
        ([], [], {"headers": {"X": ["a"]}}, "header 'X' must be a string"),
        (["n"], [], {"body": {"n": {"param": "n", "value_type": "date"}}}, "unknown value_type"),
        (["n"], [], {"params": {"n": {"param": "n", "value_type": 3}}}, "unknown value_type"),
        ([], [], {"body": {"n": {"param": 5}}}, "an object form in body needs a string name"),
        ([], [], {"url": "https://x.example/{{ a b }}"}, "in url does not hold a valid name"),
        ([], [], {"body": "{{ 1 + 2 }}"}, "in body does not hold a valid name"),
        ([], [], {"url": "https://x.example/{{ a/b }}"}, "in url does not hold a valid name"),
    ],
)
def test_compile_errors(
    runtime_params: list[str], variables: list[str], source: dict[str, Any], message: str
) -> None:
    with pytest.raises(TemplateError, match=re.escape(message)) as caught:
        build(runtime_params, variables, **source)
    assert isinstance(caught.value, ValueError)


def test_compile_error_never_carries_a_value() -> None:
    with pytest.raises(TemplateError) as caught:
        build(headers={"Authorization": "Bearer sk_live_123\r\n"})
    assert "sk_live" not in str(caught.value)


def test_variables_anywhere_in_the_origin_are_fine() -> None:
    compiled = build(["id"], ["HOST"], url="https://{{ HOST }}/users/{{ id }}")
    assert render(compiled, {"id": 1}, {"HOST": "h.example"}).url == "https://h.example/users/1"


def test_scheme_is_case_insensitive() -> None:
    assert go(url="HTTPS://a.example/x").url == "HTTPS://a.example/x"


# --- scan_names ----------------------------------------------------------------------------


def test_scan_names() -> None:
    source = HTTPSource(
        url="https://{{ env.HOST }}/u/{{ user_id }}?q={{q}}",
        headers={"Authorization": "Bearer {{ api_token }}", "X-K": {"env": "KEY"}},
        params={"a": {"param": "page", "value_type": "int"}, "b": ["{{ env.B }}", "lit"]},
        body={"deep": [{"x": "{{ x }} and {{ env.Y }}"}], "obj": {"param": "p2"}, "n": 1},
    )
    assert scan_names(source) == Names(
        params=frozenset({"user_id", "q", "api_token", "page", "x", "p2"}),
        env=frozenset({"HOST", "KEY", "B", "Y"}),
    )


def test_scan_names_string_body_and_nothing() -> None:
    assert scan_names(HTTPSource(url="https://a.example", body="<a>{{ v }}</a>")) == Names(
        frozenset({"v"}), frozenset()
    )
    assert scan_names(HTTPSource(url="https://a.example")) == Names(frozenset(), frozenset())


def test_scan_names_ignores_malformed_placeholders() -> None:
    names = scan_names(HTTPSource(url="https://a.example/{{ a b }}", body={"p": {"param": 5}}))
    assert names == Names(frozenset(), frozenset())


def test_scan_names_agrees_with_compile_on_the_seed_example() -> None:
    names = scan_names(HTTPSource(**SEED_SECTION_5))
    assert names == Names(frozenset({"user_id", "api_token"}), frozenset())
    compile_source(HTTPSource(**SEED_SECTION_5), ["user_id"], ["api_token"])


def test_url_query_and_params_together_through_httpx() -> None:
    """httpx 0.28 replaces a URL's query when ``params=`` is given (encode/httpx#3433);
    merging keeps both, which is what a fetcher must do when the template has a query."""
    r = go({"q": "a&b"}, url="https://a.example/s?q={{ q }}", params={"page": "2"})
    assert (r.url, r.params) == ("https://a.example/s?q=a%26b", (("page", "2"),))
    url = httpx.URL(r.url).copy_merge_params(list(r.params))
    assert str(url) == "https://a.example/s?q=a%26b&page=2"


def test_content_type_kind_ignores_placeholder_names() -> None:
    r = go(
        None,
        {"xml_flavour": "text/plain"},
        method="POST",
        headers={"Content-Type": "{{ env.xml_flavour }}"},
        body="<a>{{ xml_flavour }}</a>",
    )
    assert r.content == b"<a>text/plain</a>"
    assert r.headers == (("Content-Type", "text/plain"),)
