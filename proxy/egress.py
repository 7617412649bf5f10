"""Which destinations sources may reach, decided on the addresses actually connected to.

The policy (``EgressPolicy``) is pure: rules in, a decision or ``EgressDenied`` out.
``EgressDialer`` is the one place it meets the network: it resolves the host
itself, checks every resolved address, and connects to one of those very
addresses; ``proxy.transport`` opens every upstream connection through it.
Checking a URL's host and letting the connection resolve it again would leave a DNS-rebinding window (a name that
answers 1.2.3.4 to the check and 169.254.169.254 to the connect); here the
address checked is the address dialled. Redirect hops open connections through
the same dialer, so each hop is checked too.

Rules: built-in denies (link-local and cloud-metadata addresses) plus
``DATABROKER_EGRESS_DENY``; ``DATABROKER_EGRESS_ALLOW`` wins over both.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from proxy.errors import EgressDenied

if TYPE_CHECKING:
    from proxy.settings import Settings

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

DENY_VARIABLE = "DATABROKER_EGRESS_DENY"
ALLOW_VARIABLE = "DATABROKER_EGRESS_ALLOW"

# Always denied unless ALLOW lists them. The IPv4-mapped forms (::ffff:169.254.169.254)
# are caught by checking ``ipv4_mapped`` too. 0.0.0.0 and :: are here because a connect()
# to the unspecified address reaches the host itself: without them a deployment's
# DENY 127.0.0.0/8 could be walked around with http://0.0.0.0/.
DEFAULT_DENY: tuple[Network, ...] = tuple(
    ipaddress.ip_network(cidr)
    for cidr in (
        "169.254.0.0/16",  # IPv4 link-local: AWS, GCP, Azure, OCI metadata at 169.254.169.254
        "fe80::/10",  # IPv6 link-local
        "fd00:ec2::254/128",  # AWS metadata over IPv6
        "100.100.100.200/32",  # Alibaba Cloud metadata
        "0.0.0.0/8",  # "this host": reaches loopback
        "::/128",  # unspecified IPv6: reaches loopback
    )
)

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOST_NAME = re.compile(rf"\.?{_LABEL}(?:\.{_LABEL})*")
# Digits and dots only: meant as an IPv4 address, so a typo must fail, not become a name.
_LOOKS_NUMERIC = re.compile(r"[0-9.]+")


@dataclass(frozen=True, slots=True)
class Rules:
    """One list of a policy: networks, exact host names, and ``.suffix`` names."""

    networks: tuple[Network, ...] = ()
    hosts: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()

    @classmethod
    def parse(cls, text: str, variable: str) -> Rules:
        """Comma-separated CIDRs, IP addresses and host names; ValueError names ``variable``."""
        networks: list[Network] = []
        hosts: set[str] = set()
        suffixes: list[str] = []
        for raw in text.split(","):
            entry = raw.strip().lower()
            if not entry:
                continue
            if "/" in entry or ":" in entry or _LOOKS_NUMERIC.fullmatch(entry):
                try:
                    # strict: 10.0.0.1/8 has host bits set and is refused, not silently widened.
                    networks.append(ipaddress.ip_network(entry))
                except ValueError as exc:
                    raise ValueError(
                        f"{variable}: {raw.strip()!r} is not a valid CIDR ({exc})"
                    ) from exc
            elif _HOST_NAME.fullmatch(entry.rstrip(".")):
                name = entry.rstrip(".")
                if name.startswith("."):
                    suffixes.append(name)
                else:
                    hosts.add(name)
            else:
                raise ValueError(
                    f"{variable}: {raw.strip()!r} is neither a CIDR, an IP address nor a host "
                    "name (write .example.com for a domain and its subdomains' suffix; "
                    "IDN names in their xn-- form)"
                )
        return cls(tuple(networks), frozenset(hosts), tuple(suffixes))

    def host_rule(self, name: str) -> str | None:
        """The entry naming ``name`` (already lower-case, no trailing dot), if any."""
        if name in self.hosts:
            return name
        return next((suffix for suffix in self.suffixes if name.endswith(suffix)), None)

    def network_of(self, address: Address) -> Network | None:
        return next((net for net in self.networks if address in net), None)


class EgressPolicy:
    """ALLOW wins over DENY; DENY is the built-in list plus the deployment's entries."""

    def __init__(self, deny: Rules, allow: Rules) -> None:
        self.deny = deny
        self.allow = allow

    @classmethod
    def with_defaults(cls, deny: Rules, allow: Rules) -> EgressPolicy:
        """The deployment's rules on top of the built-in denies."""
        return cls(Rules(DEFAULT_DENY + deny.networks, deny.hosts, deny.suffixes), allow)

    @classmethod
    def parse(cls, deny: str = "", allow: str = "") -> EgressPolicy:
        return cls.with_defaults(
            Rules.parse(deny, DENY_VARIABLE), Rules.parse(allow, ALLOW_VARIABLE)
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> EgressPolicy:
        # The settings hold the rules parsed once, when they were validated.
        return cls.with_defaults(settings.egress_deny, settings.egress_allow)

    def check_host(self, host: str) -> bool:
        """Judge what the URL's host alone decides; raise EgressDenied if it is refused.

        True when ALLOW names the destination: its addresses need no check. False when
        nothing is decided yet and every resolved address must pass ``check_address``.
        """
        literal = _literal(host)
        if literal is not None:
            self.check_address(literal, host)
            return self.allow.network_of(_effective(literal)) is not None
        name = host.lower().rstrip(".")
        if self.allow.host_rule(name) is not None:
            return True
        rule = self.deny.host_rule(name)
        if rule is not None:
            raise EgressDenied(host, f"the host is denied by {rule!r}")
        return False

    def check_address(self, address: Address | str, host: str | None = None) -> None:
        """Raise EgressDenied if ``address`` (one that ``host`` resolved to) is refused."""
        ip = ipaddress.ip_address(address) if isinstance(address, str) else address
        # ALLOW judges the destination as it goes on the wire: ::ffff:169.254.169.254 is
        # 169.254.169.254, so ALLOW ::/0 does not open the IPv4 metadata address.
        if self.allow.network_of(_effective(ip)) is not None:
            return
        # DENY matches either form: a rule written as IPv4 also catches the mapped form.
        for form in dict.fromkeys((ip, _effective(ip))):
            network = self.deny.network_of(form)
            if network is not None:
                if host is None or _literal(host) == ip:
                    raise EgressDenied(host or str(ip), f"the address is in denied range {network}")
                raise EgressDenied(host, f"the host resolves into denied range {network}")


def _literal(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def _effective(ip: Address) -> Address:
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return mapped or ip


class EgressDialer:
    """Resolve, check every address, dial one of them: how every upstream connection opens."""

    def __init__(self, policy: EgressPolicy) -> None:
        self.policy = policy

    async def connect_tcp(self, host: str, port: int) -> socket.socket:
        """A connected non-blocking socket; EgressDenied, or OSError when none can be reached.

        The caller bounds the time (resolution and connection together).
        """
        trusted = self.policy.check_host(host)
        # An address written out is its own resolution: no resolver round trip (a thread
        # hop: the default executor on asyncio's loop, libuv's pool on uvloop's).
        literal = _literal(host)
        addresses = [literal] if literal is not None else await _resolve(host, port)
        if not trusted:
            # Every address, not only the one dialled: a name that resolves partly to a
            # metadata address is hostile, and the fallback below may reach any of them.
            for address in addresses:
                self.policy.check_address(address, host)
        failure: OSError | None = None
        for address in addresses:
            try:
                # The checked address itself, never the name: no second resolution. TLS keeps
                # the URL's host for SNI and certificate checks (proxy.transport).
                return await dial(address, port)
            except OSError as exc:
                # Refused on this address (say ::1 while the server listens on 127.0.0.1 only):
                # try the next, as happy eyeballs would.
                failure = exc
        assert failure is not None  # _resolve never answers an empty list
        raise failure


async def dial(address: Address, port: int) -> socket.socket:
    """A TCP connection to ``address`` itself (tests wrap this to see what is dialled)."""
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.get_running_loop().sock_connect(sock, (str(address), port))
    except BaseException:
        sock.close()
        raise
    return sock


async def _resolve(host: str, port: int) -> list[Address]:
    """The host's addresses in resolver order, without duplicates; numeric hosts included
    (the resolver also reads forms such as 2852039166, which is 169.254.169.254).
    socket.gaierror (an OSError) when the name does not resolve."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host.strip("[]"), port, type=socket.SOCK_STREAM
    )
    addresses: list[Address] = []
    for family, _, _, _, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        address = ipaddress.ip_address(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise OSError(f"{host!r} resolved to no IP address")
    return addresses
