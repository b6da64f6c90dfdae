"""The destination ACL: which targets a tunnel may reach.

By default a tunnel may not reach the server's own network neighbourhood:
loopback, RFC 1918 private ranges, link-local, CGNAT (100.64.0.0/10),
unique-local IPv6 (fc00::/7), multicast, unspecified, reserved and
documentation ranges, and the server's own addresses.  IPv6 forms that carry
an IPv4 address (IPv4-mapped ``::ffff:a.b.c.d``, IPv4-compatible
``::a.b.c.d``, NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``) are judged by
the IPv4 address they carry as well.

The check is made on resolved addresses (see `mtop.dialer`), so a name that
resolves to 127.0.0.1 is refused like 127.0.0.1 itself.

Configured ``allow`` and ``deny`` networks override the built-in defaults;
between configured entries the most specific network wins, and ``deny``
wins a tie.  Ports: a port in ``deny_ports`` is refused; with
``allow_ports`` only those ports are allowed.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Iterable, Union

from mtop.redact import shown

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

#: Networks refused unless configured otherwise, with the reason logged.
DEFAULT_DENY: tuple[tuple[str, str], ...] = (
    ("0.0.0.0/8", "unspecified"),
    ("10.0.0.0/8", "private"),
    ("100.64.0.0/10", "shared (CGNAT)"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("172.16.0.0/12", "private"),
    ("192.0.0.0/24", "IETF protocol assignments"),
    ("192.0.2.0/24", "documentation"),
    ("192.168.0.0/16", "private"),
    ("198.18.0.0/15", "benchmarking"),
    ("198.51.100.0/24", "documentation"),
    ("203.0.113.0/24", "documentation"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved"),
    ("::/128", "unspecified"),
    ("::1/128", "loopback"),
    ("100::/64", "discard-only"),
    ("2001:db8::/32", "documentation"),
    ("fc00::/7", "unique-local"),
    ("fe80::/10", "link-local"),
    ("fec0::/10", "site-local"),
    ("ff00::/8", "multicast"),
)

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SIXTOFOUR = ipaddress.ip_network("2002::/16")
_COMPATIBLE = ipaddress.ip_network("::/96")


class ACLError(ValueError):
    """A network or port range that cannot be parsed."""


def parse_network(text: str) -> IPNetwork:
    """A CIDR network, or a single address (as /32 or /128)."""
    try:
        return ipaddress.ip_network(str(text).strip(), strict=False)
    except ValueError:
        raise ACLError(f"{text!r} is not a network; use CIDR like '192.0.2.0/24' or '2001:db8::/32'") from None


def parse_port_range(value: object) -> tuple[int, int]:
    """A port (``443``) or an inclusive range (``"8000-8999"``)."""
    if isinstance(value, int) and not isinstance(value, bool):
        low = high = value
    elif isinstance(value, str):
        low_text, sep, high_text = value.strip().partition("-")
        try:
            low = int(low_text)
            high = int(high_text) if sep else low
        except ValueError:
            raise ACLError(f"{value!r} is not a port or a range like '8000-8999'") from None
    else:  # any YAML value: a bounded repr (an alias bomb's full repr is gigabytes)
        raise ACLError(f"{shown(value)} is not a port or a range like '8000-8999'")
    if not (1 <= low <= high <= 65535):
        raise ACLError(f"{value!r} is not a port from 1 to 65535 or a rising range of them")
    return low, high


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, compatible, NAT64,
    6to4), or ``None``."""
    if address.version != 6:
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    packed = address.packed
    if address in _NAT64 or (address in _COMPATIBLE and int(address) > 1):
        return ipaddress.IPv4Address(packed[12:])
    if address in _SIXTOFOUR:
        return ipaddress.IPv4Address(packed[2:6])
    return None


@functools.lru_cache(maxsize=4096)
def parse_address(text: str) -> IPAddress | None:
    """An IP address from text (a zone index ``%eth0`` is dropped), or
    ``None`` for a name.  Cached, as `mtop.wire.ip_literal` is: every
    tunnel's target is judged, and the same targets come again and again."""
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None


@dataclass(frozen=True)
class DestinationACL:
    """Decides whether a tunnel may connect to an address and port."""

    allow: tuple[IPNetwork, ...] = ()
    deny: tuple[IPNetwork, ...] = ()
    allow_ports: tuple[tuple[int, int], ...] = ()
    deny_ports: tuple[tuple[int, int], ...] = ()
    #: The server's own addresses, refused unless allowed.
    own: frozenset = field(default_factory=frozenset)
    defaults: tuple[tuple[IPNetwork, str], ...] = field(
        default=tuple((ipaddress.ip_network(net), why) for net, why in DEFAULT_DENY), repr=False
    )

    @classmethod
    def allow_all(cls) -> "DestinationACL":
        """No restriction at all (for tests of other things)."""
        return cls(allow=(ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")))

    def port_refusal(self, port: int) -> str | None:
        """Why ``port`` is refused, or ``None``."""
        if any(low <= port <= high for low, high in self.deny_ports):
            return f"port {port} is denied"
        if self.allow_ports and not any(low <= port <= high for low, high in self.allow_ports):
            return f"port {port} is not allowed"
        return None

    def address_refusal(self, address: IPAddress) -> str | None:
        """Why ``address`` is refused, or ``None``.  An IPv6 address carrying
        an IPv4 address is refused if either form is, unless the IPv6 form
        itself is explicitly allowed."""
        why, explicit = self._judge(address)
        if why is None and not explicit:
            inner = embedded_ipv4(address)
            if inner is not None:
                why, _ = self._judge(inner)
                if why is not None:
                    why = f"{address} carries {inner}: {why}"
        return why

    def _judge(self, address: IPAddress) -> tuple[str | None, bool]:
        """(why refused or None, whether a configured entry decided)."""
        best: tuple[int, bool] | None = None  # (prefix length, denied)
        for nets, denied in ((self.allow, False), (self.deny, True)):
            for net in nets:
                if net.version == address.version and address in net:
                    candidate = (net.prefixlen, denied)
                    if best is None or candidate > best:
                        best = candidate
        if best is not None:
            return (f"{address} is denied by the ACL" if best[1] else None), True
        if address in self.own:
            return f"{address} is this server's own address", False
        for net, why in self.defaults:
            if net.version == address.version and address in net:
                return f"{address} is {why} ({net})", False
        return None, False

    def refusal(self, host: str, port: int) -> str | None:
        """Why ``host`` (an address literal) and ``port`` are refused, or
        ``None``; names are not judged here (their addresses are)."""
        why = self.port_refusal(port)
        if why is None:
            address = parse_address(host)
            if address is not None:
                why = self.address_refusal(address)
        return why

    def with_own(self, addresses: Iterable[str]) -> "DestinationACL":
        own = set(self.own)
        for text in addresses:
            address = parse_address(text)
            if address is not None:
                own.add(address)
        return DestinationACL(self.allow, self.deny, self.allow_ports, self.deny_ports, frozenset(own), self.defaults)


def destination_acl(config: object) -> DestinationACL:
    """The ACL of an `mtop.config.Config`, with this server's own addresses
    (the machine's and the listen addresses) refused unless allowed."""
    own = local_addresses() | {item.listen.host for item in config.listeners if item.listen.host}
    return config.acl.with_own(own)


def local_addresses() -> set[str]:
    """This machine's own addresses, as far as Linux's /proc and the host
    name tell (no extra dependency)."""
    found: set[str] = set()
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                hexaddr = line.split()[0]
                found.add(str(ipaddress.IPv6Address(bytes.fromhex(hexaddr))))
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/proc/net/fib_trie") as f:
            previous = ""
            for line in f:
                stripped = line.strip()
                if stripped == "/32 host LOCAL" and previous.startswith("|-- "):
                    found.add(previous[4:])
                previous = stripped
    except OSError:
        pass
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            found.add(str(info[4][0]))
    except OSError:
        pass
    return found
