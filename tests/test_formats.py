"""proxy.formats: upstream bodies of each response_type become JSON values or a ParseError."""

from __future__ import annotations

import csv
import io

import orjson
import pytest

from proxy.errors import ParseError
from proxy.formats import charset_of, format_body, parse_body
from proxy.types import ResponseType

# --- charset_of ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("application/json; charset=ISO-8859-1", "iso-8859-1"),
        ('text/csv; charset="UTF-8"', "utf-8"),
        ("text/xml;Charset = windows-1252 ; boundary=x", "windows-1252"),
        ("application/json", None),
        ("application/json; charset=", None),
        ("", None),
        (None, None),
    ],
)
def test_charset_of(header: str | None, expected: str | None) -> None:
    assert charset_of(header) == expected


# --- JSON ----------------------------------------------------------------------------------


def test_json_object_and_array() -> None:
    body = b'{"applicant": {"id": 42, "score": 712.5, "flags": [true, false, null]}}'
    assert parse_body(body, "JSON") == {
        "applicant": {"id": 42, "score": 712.5, "flags": [True, False, None]}
    }
    assert parse_body(b' [1, "two", {"three": 3}]\n', "JSON") == [1, "two", {"three": 3}]


def test_json_unicode_and_bom() -> None:
    value = {"name": "Zoë Ångström", "city": "東京", "emoji": "🚀"}
    body = orjson.dumps(value)
    assert parse_body(body, "JSON") == value
    assert parse_body(b"\xef\xbb\xbf" + body, "JSON") == value
    assert parse_body(b"\xef\xbb\xbf" + body, "JSON", "utf-8") == value


def test_json_latin1_charset() -> None:
    body = '{"name": "José Muñoz"}'.encode("latin-1")
    assert parse_body(body, "JSON", charset_of("application/json; charset=ISO-8859-1")) == {
        "name": "José Muñoz"
    }


@pytest.mark.parametrize(
    "body", [b'{"a": 1', b"{'a': 1}", b"[1] trailing", b"NaN", b'{"a": NaN}', b"1e400"]
)
def test_json_invalid(body: bytes) -> None:
    with pytest.raises(ParseError, match=r"^JSON body does not parse: "):
        parse_body(body, "JSON")


def test_json_deep_nesting_fails_fast() -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(ParseError) as info:
        parse_body(body, "JSON")
    assert len(info.value.message) < 300


# --- XML -----------------------------------------------------------------------------------

_ACCOUNT = """
      <bur:Account type="{type}" status="open">
        <bur:Creditor>Bank {n}</bur:Creditor>
        <bur:Balance currency="EUR">{balance}.00</bur:Balance>
        <bur:Limit currency="EUR"/>
        <bur:Opened>2019-0{month}-15</bur:Opened>
        <bur:Payments>
          <bur:Month code="ok">01</bur:Month>
          <bur:Month code="late">02</bur:Month>
          <bur:Month code="ok">03</bur:Month>
        </bur:Payments>
      </bur:Account>"""

_REPORT = """<?xml version="1.0" encoding="UTF-8"?>
<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/"
               xmlns:bur="urn:bureau:report:v2">
  <soap:Header>
    <bur:RequestId>req-7f3a</bur:RequestId>
  </soap:Header>
  <soap:Body>
    <bur:CreditReport version="2.1" generated="2024-05-01T10:00:00Z">
      <bur:Subject id="S-1">
        <bur:Name>Zoë Ångström</bur:Name>
        <bur:Birth/>
        <bur:Address kind="current">
          <bur:Street>Main St 1</bur:Street>
          <bur:City>Malmö</bur:City>
        </bur:Address>
        <bur:Address kind="previous">
          <bur:Street>Old Rd 9</bur:Street>
          <bur:City>Lund</bur:City>
        </bur:Address>
      </bur:Subject>
      <bur:Score model="v5">712</bur:Score>
      <bur:Note>
        mixed content
        <bur:Ref>R1</bur:Ref>
      </bur:Note>
      <bur:Accounts>{accounts}
      </bur:Accounts>
    </bur:CreditReport>
  </soap:Body>
</soap:Envelope>
"""

_SOAP = "{http://schemas.xmlsoap.org/soap/envelope/}"
_BUR = "{urn:bureau:report:v2}"


def _report(accounts: int) -> bytes:
    rows = "".join(
        _ACCOUNT.format(type="loan" if n % 2 else "card", n=n, balance=n * 100, month=n % 9 + 1)
        for n in range(accounts)
    )
    return _REPORT.format(accounts=rows).encode()


def test_xml_bureau_report() -> None:
    body = _report(40)
    assert body.count(b"<bur:") > 300
    result = parse_body(body, "XML")

    assert set(result) == {f"{_SOAP}Header", f"{_SOAP}Body"}  # root dropped
    assert result[f"{_SOAP}Header"] == {f"{_BUR}RequestId": "req-7f3a"}
    report = result[f"{_SOAP}Body"][f"{_BUR}CreditReport"]
    assert report["version"] == "2.1"  # attributes of a parent are plain keys
    assert report["generated"] == "2024-05-01T10:00:00Z"

    subject = report[f"{_BUR}Subject"]
    assert subject["id"] == "S-1"
    assert subject[f"{_BUR}Name"] == "Zoë Ångström"
    assert subject[f"{_BUR}Birth"] is None  # leaf without text
    assert subject[f"{_BUR}Address"] == [
        {"kind": "current", f"{_BUR}Street": "Main St 1", f"{_BUR}City": "Malmö"},
        {"kind": "previous", f"{_BUR}Street": "Old Rd 9", f"{_BUR}City": "Lund"},
    ]
    assert report[f"{_BUR}Score"] == {"model": "v5", "text": "712"}  # leaf with attributes
    note = report[f"{_BUR}Note"]
    assert note["text"].strip() == "mixed content" and note[f"{_BUR}Ref"] == "R1"

    accounts = report[f"{_BUR}Accounts"][f"{_BUR}Account"]
    assert len(accounts) == 40
    third = accounts[3]
    assert third["type"] == "loan" and third["status"] == "open"
    assert third[f"{_BUR}Creditor"] == "Bank 3"
    assert third[f"{_BUR}Balance"] == {"currency": "EUR", "text": "300.00"}
    assert third[f"{_BUR}Limit"] == {"currency": "EUR"}  # no "text" key when empty
    assert third[f"{_BUR}Payments"][f"{_BUR}Month"] == [
        {"code": "ok", "text": "01"},
        {"code": "late", "text": "02"},
        {"code": "ok", "text": "03"},
    ]
    assert [a[f"{_BUR}Creditor"] for a in accounts] == [f"Bank {n}" for n in range(40)]
    orjson.dumps(result)  # the result is serialisable as is


def test_xml_root_without_children() -> None:
    assert parse_body(b"<status>OK</status>", "XML") == "OK"
    assert parse_body(b'<status code="7">OK</status>', "XML") == {"code": "7", "text": "OK"}
    assert parse_body(b"<status/>", "XML") is None


def test_xml_billion_laughs_is_refused() -> None:
    body = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [
  <!ENTITY lol "lol">
  <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
  <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
  <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
  <!ENTITY lol9 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
<lolz>&lol9;</lolz>"""
    with pytest.raises(ParseError, match=r"^XML body does not parse: forbidden XML"):
        parse_body(body, "XML")


def test_xml_external_entity_is_refused_without_echoing_it() -> None:
    body = b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><x>&e;</x>'
    with pytest.raises(ParseError) as info:
        parse_body(body, "XML")
    assert "passwd" not in info.value.message
    with pytest.raises(ParseError):
        parse_body(body, "XML", "utf-8")


def test_xml_encoding_declaration_honoured_for_bytes() -> None:
    body = '<?xml version="1.0" encoding="ISO-8859-1"?><r><name>Müller</name></r>'
    assert parse_body(body.encode("latin-1"), "XML") == {"name": "Müller"}


def test_xml_charset_argument_overrides_declaration() -> None:
    body = '<?xml version="1.0" encoding="ISO-8859-1"?><r><name>Müller</name></r>'.encode(
        "windows-1252"
    )
    assert parse_body(body, "XML", "windows-1252") == {"name": "Müller"}
    utf8 = '<?xml version="1.0" encoding="ISO-8859-1"?><r><n>Łódź</n></r>'.encode()
    assert parse_body(utf8, "XML", "utf-8") == {"n": "Łódź"}
    assert parse_body(b"\xef\xbb\xbf<r><n>x</n></r>", "XML", "utf-8") == {"n": "x"}


@pytest.mark.parametrize(
    "body", [b"<r><a></r>", b"not xml", b"<r/><r/>", b'<?xml encoding="bogus"?><r/>']
)
def test_xml_invalid(body: bytes) -> None:
    with pytest.raises(ParseError, match=r"^XML body does not parse: "):
        parse_body(body, "XML")


def test_xml_deep_nesting_is_refused() -> None:
    body = b"<a>" * 100_000 + b"</a>" * 100_000
    with pytest.raises(ParseError, match="nested deeper"):
        parse_body(body, "XML")
    ok = b"<a>" * 50 + b"x" + b"</a>" * 50
    orjson.dumps(parse_body(ok, "XML"))


# --- CSV -----------------------------------------------------------------------------------


def test_csv_thousand_rows() -> None:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["id", "name", "amount"])
    writer.writerows([n, f"name {n}", f"{n * 1.5:.2f}"] for n in range(1000))
    rows = parse_body(out.getvalue().encode(), "CSV")
    assert len(rows) == 1000
    assert rows[0] == {"id": "0", "name": "name 0", "amount": "0.00"}
    assert rows[999] == {"id": "999", "name": "name 999", "amount": "1498.50"}


def test_csv_quoting_and_ragged_rows() -> None:
    body = (
        b'id,comment,city\r\n1,"Smith, John","Line 1\r\nLine 2"\r\n'
        b'2,"He said ""hi"""\r\n3,a,b,extra1,extra2\r\n'
    )
    assert parse_body(body, "CSV") == [
        {"id": "1", "comment": "Smith, John", "city": "Line 1\r\nLine 2"},
        {"id": "2", "comment": 'He said "hi"', "city": None},
        {"id": "3", "comment": "a", "city": "b", "_extra": ["extra1", "extra2"]},
    ]


def test_csv_field_over_limit() -> None:
    body = b'id,blob\n1,"' + b"x" * 200_000 + b'"\n'
    with pytest.raises(ParseError, match=r"^CSV body does not parse: field larger") as info:
        parse_body(body, "CSV")
    assert len(info.value.message) < 300


def test_csv_latin1() -> None:
    body = "name,city\nFrançois,Besançon\n".encode("latin-1")
    assert parse_body(body, "CSV", "iso-8859-1") == [{"name": "François", "city": "Besançon"}]


# --- PLAIN_TEXT, empty bodies, decoding ----------------------------------------------------


def test_plain_text() -> None:
    assert parse_body("Grüße\n".encode("cp1252"), "PLAIN_TEXT", "windows-1252") == "Grüße\n"
    assert parse_body(b"\xef\xbb\xbfhello", "PLAIN_TEXT") == "hello"


@pytest.mark.parametrize(
    ("response_type", "body", "expected"),
    [
        ("JSON", b"", None),
        ("JSON", b" \r\n\t", None),
        ("XML", b"", None),
        ("XML", b"\n  \n", None),
        ("XML", b"  ", None),
        ("CSV", b"", []),
        ("PLAIN_TEXT", b"", ""),
    ],
)
def test_empty_bodies(response_type: ResponseType, body: bytes, expected: object) -> None:
    assert parse_body(body, response_type) == expected
    assert parse_body(body, response_type, "utf-8") == expected


@pytest.mark.parametrize("response_type", ["JSON", "CSV", "PLAIN_TEXT"])
def test_non_utf8_without_charset(response_type: ResponseType) -> None:
    body = '{"name": "José"}'.encode("latin-1")
    with pytest.raises(ParseError) as info:
        parse_body(body, response_type)
    assert info.value.message == f"{response_type} body does not parse: not valid utf-8 at byte 13"
    assert info.value.code == "PARSE_ERROR" and info.value.status == 500


def test_non_utf8_xml_without_declaration() -> None:
    with pytest.raises(ParseError):
        parse_body("<r>José</r>".encode("latin-1"), "XML")


@pytest.mark.parametrize("charset", ["klingon-8", "base64", "rot13"])
@pytest.mark.parametrize("response_type", ["JSON", "XML", "CSV", "PLAIN_TEXT"])
def test_unknown_charset(response_type: ResponseType, charset: str) -> None:
    with pytest.raises(ParseError, match="unknown charset") as info:
        parse_body(b"{}", response_type, charset)
    assert charset not in info.value.message  # the upstream's text is never quoted


def test_format_body_answers_the_parsed_value_as_json_bytes() -> None:
    assert format_body(b'{"b": [1, 2.5, "\xc3\xa9"]}', "JSON") == '{"b":[1,2.5,"é"]}'.encode()
    assert format_body(b"a,b\n1,2\n", "CSV") == b'[{"a":"1","b":"2"}]'


def test_format_body_refuses_json_too_deep_to_answer() -> None:
    # 300 levels parse (orjson reads 1024) but cannot be written back (254).
    with pytest.raises(ParseError, match="JSON body does not parse"):
        format_body(b"[" * 300 + b"]" * 300, "JSON")
