"""The PROXY protocol (HAProxy's, versions 1 and 2) on TCP listeners.

Behind HAProxy, nginx (``proxy_protocol on``) or a cloud load balancer, a
listener with ``proxy_protocol: true`` reads the header the proxy sends
before anything else and uses the client address it names for limits,
throttling and logs.  The header is required on such a listener: a
connection without a valid one is closed.

`parse_header` is a pure incremental parser (need more / header plus bytes
used / `ProxyHeaderError`).  `ProxyHeaderFactory` wraps the factory of the
layer above (TLS): its protocol reads the header under a deadline, then
builds the upper protocol with the proxied address and steps aside (reads
and writes go straight between TCP and the upper protocol).

Twisted's own ``twisted.protocols.haproxy`` wrapper builds the upper
protocol before the header has arrived (it sees the proxy's address, so
limits could not use the client's) and refuses a header split across TCP
reads; hence this module.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer
from mtop.timers import cancel

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 line, CRLF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: Largest v2 header accepted (addresses plus TLVs such as HAProxy's).
V2_MAX = 16 + 4096


class ProxyHeaderError(ValueError):
    """Not a valid PROXY protocol header."""


@dataclass(frozen=True)
class ProxyInfo:
    """What the header says: the client's and the proxy's listening
    address as ``(host, port)``, or ``None`` (``UNKNOWN``, ``LOCAL``,
    non-IP families): then the connection's own addresses stand."""

    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    #: A v2 ``LOCAL`` command: the proxy's own connection (a health check).
    local: bool = False


def parse_header(data: bytes) -> tuple[ProxyInfo, int] | None:
    """Parse a PROXY header at the start of ``data``: ``None`` while more
    bytes are needed, else the info and the number of bytes it took."""
    if data[:1] == b"\r":
        return _parse_v2(data)
    return _parse_v1(data)


def starts_like_header(data: bytes) -> bool:
    """Whether ``data`` (at least one byte) is, or may become, the start of
    a PROXY header: for listeners where it is optional (an HTTP request
    never starts like one)."""
    return V1_PREFIX.startswith(data[:6]) or V2_SIGNATURE.startswith(data[:12])


def _parse_v1(data: bytes) -> tuple[ProxyInfo, int] | None:
    if not V1_PREFIX.startswith(data[:6]):
        raise ProxyHeaderError("no PROXY protocol header")
    end = data.find(b"\r\n", 0, V1_MAX)
    newline = data.find(b"\n", 0, V1_MAX)
    if newline >= 0 and newline != end + 1:
        raise ProxyHeaderError("PROXY v1 header not ended by CRLF")
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError("PROXY v1 header longer than 107 bytes")
        return None
    fields = data[:end].split(b" ")
    if len(fields) < 2 or fields[0] != b"PROXY":
        raise ProxyHeaderError("malformed PROXY v1 header")
    if fields[1] == b"UNKNOWN":
        return ProxyInfo(None, None), end + 2
    if fields[1] not in (b"TCP4", b"TCP6") or len(fields) != 6:
        raise ProxyHeaderError("malformed PROXY v1 header")
    version = 4 if fields[1] == b"TCP4" else 6
    try:
        source = _address(fields[2].decode("ascii"), version)
        destination = _address(fields[3].decode("ascii"), version)
        sport, dport = _port(fields[4]), _port(fields[5])
    except (UnicodeDecodeError, ValueError):
        raise ProxyHeaderError("malformed address in PROXY v1 header") from None
    return ProxyInfo((source, sport), (destination, dport)), end + 2


def _address(text: str, version: int) -> str:
    address = ipaddress.ip_address(text)
    if address.version != version:
        raise ValueError(text)
    return str(address)


def _port(text: bytes) -> int:
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[:1] == b"0") or int(text) > 65535:
        raise ValueError(text)
    return int(text)


def _parse_v2(data: bytes) -> tuple[ProxyInfo, int] | None:
    if not V2_SIGNATURE.startswith(data[:12]):
        raise ProxyHeaderError("no PROXY protocol header")
    if len(data) < 16:
        return None
    version_command, family, length = data[12], data[13], struct.unpack("!H", data[14:16])[0]
    if version_command >> 4 != 2 or version_command & 0x0F > 1:
        raise ProxyHeaderError("unsupported PROXY v2 version or command")
    if 16 + length > V2_MAX:
        raise ProxyHeaderError(f"PROXY v2 header of {16 + length} bytes is too long")
    total = 16 + length
    if len(data) < total:
        return None
    body = data[16:total]
    if version_command & 0x0F == 0:  # LOCAL: the proxy's own health check
        return ProxyInfo(None, None, local=True), total
    address_family, transport = family >> 4, family & 0x0F
    if transport > 2 or address_family > 3:
        raise ProxyHeaderError("unsupported PROXY v2 address family")
    if address_family == 1:
        if len(body) < 12:
            raise ProxyHeaderError("PROXY v2 IPv4 addresses truncated")
        src, dst = ipaddress.IPv4Address(body[0:4]), ipaddress.IPv4Address(body[4:8])
        sport, dport = struct.unpack("!HH", body[8:12])
    elif address_family == 2:
        if len(body) < 36:
            raise ProxyHeaderError("PROXY v2 IPv6 addresses truncated")
        src, dst = ipaddress.IPv6Address(body[0:16]), ipaddress.IPv6Address(body[16:32])
        sport, dport = struct.unpack("!HH", body[32:36])
    else:  # UNSPEC or UNIX: nothing usable
        return ProxyInfo(None, None), total
    return ProxyInfo((str(src), sport), (str(dst), dport)), total


def _twisted_address(hostport: tuple[str, int]) -> Any:
    host, port = hostport
    return (IPv6Address if ":" in host else IPv4Address)("TCP", host, port)


@implementer(IHalfCloseableProtocol)
class ProxyHeaderProtocol(Protocol):
    """Reads the PROXY header, then hands the connection to the protocol
    the wrapped factory builds for the proxied client address; from then
    on it is that protocol's transport (with the proxied addresses) and
    forwards everything without work of its own."""

    upper: Any = None
    _peer: Any = None
    _host: Any = None
    #: The header was a v2 ``LOCAL`` (the proxy's health check).
    proxy_local = False

    def __init__(self, factory: "ProxyHeaderFactory"):
        self.factory = factory
        self._buffer = b""
        self._deadline: Any = None

    def connectionMade(self) -> None:
        self._deadline = self.factory.clock.callLater(self.factory.timeout, self._expired)

    def _expired(self) -> None:
        self._deadline = None
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        if self.factory.optional and not starts_like_header(self._buffer):
            parsed: tuple[ProxyInfo, int] | None = (ProxyInfo(None, None), 0)
        else:
            try:
                parsed = parse_header(self._buffer)
            except ProxyHeaderError:
                self._buffer = b""
                self.factory.counters.inc("refused.proxy-header")
                self.transport.abortConnection()
                return
        if parsed is None:
            return
        info, used = parsed
        rest, self._buffer = self._buffer[used:], b""
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        tcp = self.transport
        self.proxy_local = info.local
        self._peer = _twisted_address(info.source) if info.source else tcp.getPeer()
        self._host = _twisted_address(info.destination) if info.destination else tcp.getHost()
        upper = self.factory.wrapped_factory.buildProtocol(self._peer)
        if upper is None:
            tcp.loseConnection()
            return
        self.upper = upper
        # Step aside: TCP's events reach the upper protocol directly and its
        # writes go straight to TCP.
        self.dataReceived = upper.dataReceived
        for name in ("write", "writeSequence", "pauseProducing", "resumeProducing", "stopProducing"):
            setattr(self, name, getattr(tcp, name))
        upper.makeConnection(self)
        if rest:
            upper.dataReceived(rest)

    def readConnectionLost(self) -> None:
        if self.upper is None:
            self.transport.loseConnection()
        elif IHalfCloseableProtocol.providedBy(self.upper):
            self.upper.readConnectionLost()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        if self.upper is not None and IHalfCloseableProtocol.providedBy(self.upper):
            self.upper.writeConnectionLost()

    def connectionLost(self, reason: Failure = None) -> None:
        cancel(self._deadline)
        self._deadline = None
        upper, self.upper = self.upper, None
        if upper is not None:
            upper.connectionLost(reason)

    # The transport of the upper protocol (until `dataReceived` steps aside,
    # then only what is not replaced by the TCP transport's own methods).

    def getPeer(self) -> Any:
        return self._peer

    def getHost(self) -> Any:
        return self._host

    def loseConnection(self) -> None:
        self.transport.loseConnection()

    def loseWriteConnection(self) -> None:
        self.transport.loseWriteConnection()

    def abortConnection(self) -> None:
        self.transport.abortConnection()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.transport.unregisterProducer()

    def __getattr__(self, name: str) -> Any:
        # setTcpNoDelay, getHandle, ...: the TCP transport's.
        transport = self.__dict__.get("transport")
        if transport is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(transport, name)


class ProxyHeaderFactory(Factory):
    """Wraps ``wrapped_factory`` (e.g. the TLS factory) so every connection
    starts with a PROXY header (unless ``optional``), read within
    ``timeout`` seconds."""

    noisy = False
    protocol = ProxyHeaderProtocol

    def __init__(self, wrapped_factory: Any, clock: Any, timeout: float, counters: Any, optional: bool = False):
        """``optional``: a connection may also start without a header (then
        its own addresses stand); the health listener's, which load
        balancers check with or without one."""
        self.wrapped_factory = wrapped_factory
        self.clock = clock
        self.timeout = timeout
        self.counters = counters
        self.optional = optional

    def buildProtocol(self, addr: Any) -> ProxyHeaderProtocol:
        return ProxyHeaderProtocol(self)

    def doStart(self) -> None:
        self.wrapped_factory.doStart()

    def doStop(self) -> None:
        self.wrapped_factory.doStop()
