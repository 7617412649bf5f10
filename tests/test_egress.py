"""proxy.egress: the pure policy, then the dialer through the real shared client and broker.

Only loopback is ever contacted: the ``dialled`` guard records every address
``proxy.egress.dial`` is asked for and refuses any other, so the tests that
name 169.254.169.254 prove no connection to it was ever attempted.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import uuid
from collections.abc import AsyncIterator, Iterable
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import Request
from starlette.responses import Response

from proxy import egress
from proxy.app import create_app
from proxy.egress import DEFAULT_DENY, DENY_VARIABLE, EgressDialer, EgressPolicy, Rules
from proxy.errors import EgressDenied, UpstreamHTTPError
from proxy.lifecycle import forbidden_changes
from proxy.retry import Retrying
from proxy.settings import Settings
from proxy.source_spec import DataSourceSpec
from proxy.templates import RenderedRequest
from proxy.upstream import MAX_REDIRECTS, Fetched, Upstream, create_client
from tests.conftest import Broker
from tests.servers import Upstream as UpstreamServer
from tests.servers import serve_in_thread
from tests.test_flow import rows

METADATA_URL = "http://169.254.169.254/latest/meta-data"
RETRY_3 = Retrying(max_retries=3, backoff_factor=0.01)
DEFAULT = EgressPolicy.parse()


def denied(policy: EgressPolicy, address: str) -> bool:
    try:
        policy.check_address(address)
    except EgressDenied:
        return True
    return False


# --- the policy: addresses -----------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "169.254.169.254",  # AWS, GCP, Azure, OCI metadata
        "169.254.0.1",
        "fd00:ec2::254",  # AWS metadata over IPv6
        "100.100.100.200",  # Alibaba metadata
        "fe80::1",
        "::ffff:169.254.169.254",  # the IPv4-mapped form reaches the same host
        "::ffff:100.100.100.200",
        "0.0.0.0",  # connect() to it reaches the host itself
        "::",
    ],
)
def test_defaults_deny_link_local_and_metadata(address: str) -> None:
    assert denied(DEFAULT, address)


@pytest.mark.parametrize(
    "address",
    ["127.0.0.1", "::1", "10.1.2.3", "172.16.0.9", "192.168.1.20", "fd12::1", "93.184.216.34"],
)
def test_defaults_allow_loopback_private_and_public(address: str) -> None:
    assert not denied(DEFAULT, address)
    assert DEFAULT.check_host(address) is False  # nothing decided by the name: resolve and check


def test_deny_loopback_by_listing_it() -> None:
    policy = EgressPolicy.parse(deny="127.0.0.0/8")
    assert denied(policy, "127.0.0.1")
    assert denied(policy, "127.9.9.9")
    assert denied(policy, "::ffff:127.0.0.1")  # an IPv4 rule also catches the mapped form
    assert not denied(policy, "::1")  # IPv6 loopback is a rule of its own
    assert not denied(policy, "10.0.0.1")
    assert denied(policy, "169.254.169.254")  # the built-in denies stay


def test_deny_private_ranges() -> None:
    policy = EgressPolicy.parse(deny="10.0.0.0/8, 172.16.0.0/12,192.168.0.0/16 ,fc00::/7")
    for address in ("10.0.0.1", "172.31.255.255", "192.168.1.1", "fd12::1"):
        assert denied(policy, address), address
    assert not denied(policy, "172.32.0.1")


def test_allow_wins_over_deny() -> None:
    policy = EgressPolicy.parse(deny="10.0.0.0/8", allow="10.0.0.5, 169.254.169.254/32")
    assert not denied(policy, "10.0.0.5")
    assert denied(policy, "10.0.0.6")
    assert not denied(policy, "169.254.169.254")  # even over a built-in deny
    assert denied(policy, "169.254.169.253")
    assert policy.check_host("10.0.0.5") is True


def test_allowing_all_ipv6_does_not_open_mapped_ipv4_metadata() -> None:
    """::ffff:169.254.169.254 goes on the wire as 169.254.169.254: ALLOW judges that."""
    policy = EgressPolicy.parse(allow="::/0")
    assert not denied(policy, "fd00:ec2::254")
    assert denied(policy, "::ffff:169.254.169.254")


def test_denial_names_the_rule_never_the_host() -> None:
    with pytest.raises(EgressDenied) as caught:
        EgressPolicy.parse(deny="127.0.0.0/8").check_address("127.0.0.1", "localhost")
    error = caught.value
    assert (error.status, error.code) == (403, "EGRESS_DENIED")
    assert error.host == "localhost"  # for the caller's own use; never in the answer
    assert error.to_dict() == {
        "code": "EGRESS_DENIED",
        "message": "egress refused: the host resolves into denied range 127.0.0.0/8",
    }


# --- the policy: host names ----------------------------------------------------------------


def test_host_names_match_exactly_case_insensitively() -> None:
    policy = EgressPolicy.parse(deny="Internal.Example.com")
    for host in ("internal.example.com", "INTERNAL.example.COM", "internal.example.com."):
        with pytest.raises(EgressDenied):
            policy.check_host(host)
    assert policy.check_host("api.internal.example.com") is False
    assert policy.check_host("example.com") is False


def test_dot_suffix_matches_subdomains() -> None:
    policy = EgressPolicy.parse(deny=".corp.example")
    for host in ("a.corp.example", "b.a.CORP.example"):
        with pytest.raises(EgressDenied) as caught:
            policy.check_host(host)
        assert caught.value.host == host
        assert "'.corp.example'" in caught.value.message
    assert policy.check_host("corp.example") is False  # the suffix, not the domain itself
    assert policy.check_host("notcorp.example") is False


def test_allowed_host_wins_over_denied_names_and_addresses() -> None:
    policy = EgressPolicy.parse(deny=".corp.example,10.0.0.0/8", allow="vault.corp.example")
    assert policy.check_host("vault.corp.example") is True  # its addresses are not checked
    with pytest.raises(EgressDenied):
        policy.check_host("db.corp.example")


# --- settings ------------------------------------------------------------------------------


def test_rules_parse_cidrs_addresses_and_names() -> None:
    rules = Rules.parse(" 10.0.0.0/8, 192.168.1.7 ,fd00::/8,,api.Example.com,.corp.example.", "X")
    assert rules.networks == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.168.1.7/32"),
        ipaddress.ip_network("fd00::/8"),
    )
    assert rules.hosts == frozenset({"api.example.com"})
    assert rules.suffixes == (".corp.example",)
    assert Rules.parse("", "X") == Rules()


def test_settings_default_to_the_built_in_denies() -> None:
    policy = EgressPolicy.from_settings(Settings())
    assert policy.deny.networks == DEFAULT_DENY
    assert policy.allow == Rules()


def test_settings_are_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABROKER_EGRESS_DENY", "127.0.0.0/8,.corp.example")
    monkeypatch.setenv("DATABROKER_EGRESS_ALLOW", "127.0.0.2")
    policy = EgressPolicy.from_settings(Settings())
    assert denied(policy, "127.0.0.1")
    assert not denied(policy, "127.0.0.2")
    with pytest.raises(EgressDenied):
        policy.check_host("x.corp.example")


@pytest.mark.parametrize(
    "entry",
    [
        "10.0.0.0/33",
        "300.1.1.1",
        "10.0.0.1/8",  # host bits set: refused, not silently widened
        "10.0.0",
        "fe80::zz",
        "http://example.com",
        "*.example.com",
        "exa mple.com",
        "bücher.example",
    ],
)
@pytest.mark.parametrize("field", ["egress_deny", "egress_allow"])
def test_a_bad_entry_fails_at_start_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, field: str, entry: str
) -> None:
    variable = f"DATABROKER_{field.upper()}"
    monkeypatch.setenv(variable, f"10.0.0.0/8,{entry}")
    with pytest.raises(ValidationError) as caught:
        Settings()
    [error] = caught.value.errors()
    assert error["loc"] == (field,)
    assert variable in error["msg"]
    assert repr(entry) in error["msg"]


def test_the_policy_is_built_from_the_rules_the_settings_parsed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABROKER_EGRESS_DENY", "10.0.0.0/8,.corp.example")
    monkeypatch.setenv("DATABROKER_EGRESS_ALLOW", "10.1.2.3")
    settings = Settings()
    assert settings.egress_deny == Rules.parse("10.0.0.0/8,.corp.example", DENY_VARIABLE)
    policy = EgressPolicy.from_settings(settings)
    policy.check_address("10.1.2.3")
    for refused in ("10.0.0.1", "169.254.169.254"):  # the deployment's deny, a built-in one
        with pytest.raises(EgressDenied):
            policy.check_address(refused)
    with pytest.raises(EgressDenied):
        policy.check_host("api.corp.example")


# --- the spec ------------------------------------------------------------------------------


def test_follow_redirects_is_off_by_default_and_fixed_once_published() -> None:
    spec = DataSourceSpec.model_validate({"name": "s", "source": {"url": "http://h/"}})
    assert not spec.source.follow_redirects
    following = DataSourceSpec.model_validate(
        {"name": "s", "source": {"url": "http://h/", "follow_redirects": True}}
    )
    assert forbidden_changes(spec, following) == ["source.follow_redirects"]


# --- the dialer, through the shared client -------------------------------------------------


@pytest.fixture(autouse=True)
def dialled(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every address the dialer connects to, in this process.

    Only loopback is really dialled: should the policy ever let another address
    through, the test fails on a refused connection instead of touching the network.
    """
    hosts: list[str] = []
    dial = egress.dial

    async def recording(address: egress.Address, port: int) -> socket.socket:
        hosts.append(str(address))
        if not address.is_loopback:
            raise ConnectionRefusedError(f"test guard: {address} is not loopback")
        return await dial(address, port)

    monkeypatch.setattr(egress, "dial", recording)
    return hosts


def client_for(deny: str = "", allow: str = "") -> httpx.AsyncClient:
    return create_client(EgressPolicy.parse(deny, allow))


async def fetch(
    client: httpx.AsyncClient,
    url: str,
    *,
    retrying: Retrying = RETRY_3,
    follow_redirects: bool = False,
) -> Fetched:
    request = RenderedRequest(method="GET", url=url, headers=(), params=(), content=None)
    # Generous timeout: a refusal must come from the policy, never from waiting on a connect.
    return await Upstream(client).fetch(
        request, timeout=30, retrying=retrying, max_bytes=1 << 20, follow_redirects=follow_redirects
    )


def on_port(url: str, host: str) -> str:
    return url.replace("127.0.0.1", host, 1)


async def test_loopback_upstream_is_reachable_by_default(
    upstream: UpstreamServer, dialled: list[str]
) -> None:
    url = upstream.answer("/ok", b'{"ok": true}')
    async with create_client() as client:
        fetched = await fetch(client, url)
    assert fetched.content == b'{"ok": true}'
    assert dialled == ["127.0.0.1"]


async def test_denied_address_is_refused_before_connecting_and_not_retried(
    upstream: UpstreamServer, dialled: list[str]
) -> None:
    url = upstream.answer("/ok", b"{}")
    async with client_for(deny="127.0.0.0/8") as client:
        with pytest.raises(EgressDenied) as caught:
            await fetch(client, url)
    assert caught.value.host == "127.0.0.1"
    assert upstream.received == []
    assert dialled == []


async def test_host_name_is_refused_after_resolution(
    upstream: UpstreamServer, dialled: list[str]
) -> None:
    url = on_port(upstream.answer("/ok", b"{}"), "localhost")
    async with client_for(deny="127.0.0.0/8,::1/128") as client:
        with pytest.raises(EgressDenied) as caught:
            await fetch(client, url)
    assert caught.value.host == "localhost"
    assert "the host resolves into" in caught.value.message  # judged on the address, not the name
    assert upstream.received == []
    assert dialled == []


async def test_numeric_host_forms_are_judged_by_what_they_resolve_to(dialled: list[str]) -> None:
    """2852039166 is 169.254.169.254 to the resolver: the name alone would not tell."""
    async with create_client() as client:
        with pytest.raises(EgressDenied) as caught:
            await fetch(client, "http://2852039166/latest/meta-data")
    assert "169.254.0.0/16" in caught.value.message
    assert dialled == []


async def test_allowed_host_name_is_reached(upstream: UpstreamServer, dialled: list[str]) -> None:
    url = on_port(upstream.answer("/ok", b"{}"), "localhost")
    async with client_for(deny="127.0.0.0/8", allow="localhost") as client:
        assert (await fetch(client, url)).content == b"{}"  # only a 2xx is returned
    assert dialled == ["127.0.0.1"]


# --- the backend: one resolution, every address checked ------------------------------------


class Resolver:
    """Stands in for the event loop's getaddrinfo: answers ``answers`` in turn."""

    def __init__(self, *answers: Iterable[str]) -> None:
        self.answers = [list(a) for a in answers]
        self.calls = 0

    async def __call__(self, host: str, port: int, **_: Any) -> list[Any]:
        addresses = self.answers[min(self.calls, len(self.answers) - 1)]
        self.calls += 1
        return [
            (socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
            for a in addresses
        ]


@pytest.fixture
async def resolver(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Resolver]:
    fake = Resolver()
    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", fake)
    yield fake


async def test_every_resolved_address_is_checked(
    resolver: Resolver, upstream: UpstreamServer, dialled: list[str]
) -> None:
    """A name answering one good and one metadata address is refused whole."""
    resolver.answers = [["127.0.0.1", "169.254.169.254"]]
    url = on_port(upstream.answer("/ok", b"{}"), "mixed.test")
    async with create_client() as client:
        with pytest.raises(EgressDenied) as caught:
            await fetch(client, url)
    assert caught.value.host == "mixed.test"
    assert dialled == []
    assert upstream.received == []


async def test_the_checked_address_is_the_one_dialled(
    resolver: Resolver, upstream: UpstreamServer, dialled: list[str]
) -> None:
    """DNS rebinding: a second lookup would answer the metadata address. There is none."""
    resolver.answers = [["127.0.0.1"], ["169.254.169.254"]]
    url = on_port(upstream.answer("/ok", b"{}"), "rebind.test")
    async with create_client() as client:
        assert (await fetch(client, url)).content == b"{}"  # only a 2xx is returned
    assert resolver.calls == 1
    assert dialled == ["127.0.0.1"]  # the address, never the name
    assert upstream.received[0]["headers"]["host"].startswith("rebind.test:")


async def test_next_address_is_tried_when_one_refuses(
    resolver: Resolver, upstream: UpstreamServer, dialled: list[str]
) -> None:
    resolver.answers = [["::1", "127.0.0.1"]]  # the test upstream listens on 127.0.0.1 only
    url = on_port(upstream.answer("/ok", b"{}"), "dual.test")
    async with create_client() as client:
        assert (await fetch(client, url)).content == b"{}"  # only a 2xx is returned
    assert dialled == ["::1", "127.0.0.1"]


async def test_dialer_refuses_before_dialling(monkeypatch: pytest.MonkeyPatch) -> None:
    """The dialer alone, with a dial that fails the test if ever called."""

    async def forbidden(address: egress.Address, port: int) -> socket.socket:
        raise AssertionError("connected despite the policy")

    monkeypatch.setattr(egress, "dial", forbidden)
    with pytest.raises(EgressDenied):
        await EgressDialer(EgressPolicy.parse()).connect_tcp("169.254.169.254", 80)


# --- redirects -----------------------------------------------------------------------------


def redirect(server: UpstreamServer, path: str, location: str) -> str:
    async def handler(_: Request) -> Response:
        return Response(b"", 302, headers={"Location": location})

    return server.on(path, handler)


async def test_redirect_to_metadata_is_an_answer_or_refused_before_connecting(
    upstream: UpstreamServer, dialled: list[str]
) -> None:
    url = redirect(upstream, "/moved", METADATA_URL)
    async with create_client() as client:
        with pytest.raises(UpstreamHTTPError) as answered:
            await fetch(client, url)  # not followed by default: the 302 is the answer
        with pytest.raises(EgressDenied) as refused:
            await fetch(client, url, follow_redirects=True)
    assert answered.value.upstream_status == 302
    assert refused.value.host == "169.254.169.254"
    assert upstream.hits("/moved") == 2  # once each: the refusal is not retried
    assert set(dialled) == {"127.0.0.1"}  # never 169.254.169.254


async def test_followed_redirect_to_an_allowed_host(
    upstream: UpstreamServer, dialled: list[str]
) -> None:
    target = upstream.answer("/target", b'{"here": 1}')
    url = redirect(upstream, "/moved", on_port(target, "localhost"))
    async with create_client() as client:
        fetched = await fetch(client, url, follow_redirects=True)
    assert fetched.content == b'{"here": 1}'
    assert upstream.hits("/moved") == upstream.hits("/target") == 1


async def test_followed_redirect_to_a_denied_name_is_refused(
    upstream: UpstreamServer, dialled: list[str]
) -> None:
    target = upstream.answer("/target", b"{}")
    url = redirect(upstream, "/moved", on_port(target, "localhost"))
    async with client_for(deny="localhost") as client:
        with pytest.raises(EgressDenied) as caught:
            await fetch(client, url, follow_redirects=True)
    assert caught.value.host == "localhost"
    assert upstream.hits("/target") == 0


async def test_redirects_stop_after_five_hops(upstream: UpstreamServer) -> None:
    url = redirect(upstream, "/loop", "/loop")
    async with create_client() as client:
        with pytest.raises(UpstreamHTTPError) as caught:
            await fetch(client, url, retrying=Retrying(), follow_redirects=True)
    assert caught.value.upstream_status == 302
    assert upstream.hits("/loop") == 1 + MAX_REDIRECTS


# --- through the running broker ------------------------------------------------------------


async def test_broker_answers_403_egress_denied_and_audits_it(
    settings: Settings, db: AsyncEngine, upstream: UpstreamServer
) -> None:
    url = upstream.answer("/users/1", b'{"id": 1}')
    run_id = uuid.uuid4()
    denying = settings.model_copy(update={"egress_deny": Rules.parse("127.0.0.0/8", DENY_VARIABLE)})
    with serve_in_thread(create_app(denying)) as base:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:
            broker = Broker(base, denying, client)
            source = await broker.register(
                {"name": "internal_api", "source": {"url": url, "response_type": "JSON"}}
            )
            answer = await broker.call("internal_api", run_id=run_id)
    # Leaving the block stopped the app, which flushed its outbox: the audit row is written.
    assert answer.status_code == 403, answer.text
    body = answer.json()
    assert body["value"] is None
    assert body["origin"] == "REQUEST"
    assert body["error"] == {
        "code": "EGRESS_DENIED",
        "message": "egress refused: the address is in denied range 127.0.0.0/8",
    }
    assert upstream.received == []
    [audit] = await rows(db, "SELECT * FROM run_data_request WHERE run_id = :r", r=run_id)
    assert str(audit["data_source_id"]) == source["data_source_id"]
    assert audit["data_object_id"] is None
    assert audit["error"] == body["error"]


async def test_broker_refuses_a_redirect_hop_to_metadata(
    broker: Broker, upstream: UpstreamServer, dialled: list[str]
) -> None:
    url = redirect(upstream, "/moved", METADATA_URL)
    for name, follow in (("stays", False), ("follows", True)):
        await broker.register({"name": name, "source": {"url": url, "follow_redirects": follow}})
    stays = await broker.call("stays")
    assert stays.status_code == 502
    assert stays.json()["error"]["upstream_status"] == 302
    follows = await broker.call("follows")
    assert follows.status_code == 403
    assert follows.json()["error"]["code"] == "EGRESS_DENIED"
    assert "169.254.169.254" not in dialled


async def test_only_host_names_go_through_the_resolver(
    upstream: UpstreamServer, dialled: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resolution is a hop to a thread pool: an IP address in the URL needs none, and a
    kept-alive connection none either. Counted: one per new connection to a name only."""
    loop = asyncio.get_running_loop()
    resolved: list[str] = []
    getaddrinfo = loop.getaddrinfo

    async def counting(host: str, *args: Any, **kwargs: Any) -> Any:
        resolved.append(host)
        return await getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(loop, "getaddrinfo", counting)
    url = upstream.answer("/ok", b"{}")
    async with create_client() as client:
        for _ in range(3):
            await fetch(client, url)
            await fetch(client, on_port(url, "localhost"))
    assert resolved == ["localhost"]
    # One connection per origin, kept alive (localhost may try ::1 first).
    assert dialled[0] == "127.0.0.1"
    assert dialled[1:] in (["127.0.0.1"], ["::1", "127.0.0.1"])
