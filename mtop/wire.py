"""MTop protocol v1 wire codec: pure functions, no I/O.

Client auth message::

    VER(0x01) METHOD(0x01 CONNECT) ULEN USERNAME PLEN PASSWORD ATYP ADDR PORT

``ATYP`` is 0x01 (IPv4, 4 bytes), 0x03 (domain: 1 length byte + 1-255 bytes) or
0x04 (IPv6, 16 bytes); ``PORT`` is two bytes big-endian.  The server answers
``VER STATUS``; only ``01 00`` (success) is sent by the original server, which
otherwise just closes.

`parse_auth` is incremental: it returns ``None`` while the buffer holds a
strict prefix of a valid message, a `ParsedAuth` once it holds a whole one
(plus how many bytes it used, so leftovers are never lost), or raises exactly
one `WireError` subclass.  A message is at most `MAX_AUTH_LENGTH` bytes, so a
caller never needs to buffer more than that before a verdict.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from typing import NamedTuple

VERSION = 0x01
METHOD_CONNECT = 0x01

ATYP_IPV4 = 0x01
ATYP_DOMAIN = 0x03
ATYP_IPV6 = 0x04

STATUS_SUCCESS = 0x00
STATUS_UNSUPPORTED_VERSION = 0x01
STATUS_AUTH_FAILURE = 0x02
STATUS_CONNECTION_FAILURE = 0x03

#: VER METHOD ULEN 255 PLEN 255 ATYP DLEN 255 PORT(2)
MAX_AUTH_LENGTH = 1 + 1 + 1 + 255 + 1 + 255 + 1 + 1 + 255 + 2


class WireError(ValueError):
    """A byte string that can never become a valid MTop message.

    ``status`` is the reply status a server sends for it when it is configured
    to tell clients why it closes.
    """

    status = STATUS_UNSUPPORTED_VERSION


class UnsupportedVersion(WireError):
    """The first byte is not protocol version 1."""


class UnknownMethod(WireError):
    """The method byte is not CONNECT (0x01)."""


class UnknownAddressType(WireError):
    """The address type is not IPv4, domain or IPv6."""


class EmptyField(WireError):
    """A length-prefixed field (username or domain) has length zero."""


class BadEncoding(WireError):
    """A text field is not valid UTF-8."""


class BadReply(WireError):
    """A server reply that is not ``01 xx``."""


@dataclass(frozen=True)
class AuthRequest:
    """One client auth message.  ``host`` is text: an IPv4 or IPv6 literal
    for address types 1 and 4, a domain name for type 3."""

    username: str
    password: str
    host: str
    port: int
    address_type: int = ATYP_DOMAIN

    def __repr__(self) -> str:  # never show the password
        return (
            f"AuthRequest(username={self.username!r}, password=<hidden>, "
            f"host={self.host!r}, port={self.port}, "
            f"address_type={self.address_type})"
        )

    @property
    def target(self) -> str:
        """``host:port`` for logs, with brackets around IPv6 literals."""
        return format_hostport(self.host, self.port)


class ParsedAuth(NamedTuple):
    request: AuthRequest
    consumed: int


def format_hostport(host: str, port: int) -> str:
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def format_address(address: object) -> str:
    """``host:port`` for a Twisted address object (IPv4Address,
    IPv6Address), or its ``str`` for other kinds."""
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is None or port is None:
        return str(address)
    return format_hostport(host, port)


@functools.lru_cache(maxsize=4096)
def ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``host`` as an IP address (`ipaddress.ip_address`), or None for
    anything else (a name).  Cached: tunnels name the same hosts over and
    over, and `ipaddress` parses in Python (a few microseconds a time, and
    climber asked up to nine times per tunnel)."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def address_type_for(host: str) -> int:
    """The address type an encoder uses for ``host``: IP literals travel as
    addresses, everything else as a domain name; an IPv4-mapped IPv6
    literal (``::ffff:a.b.c.d``) travels as the IPv4 address, as the
    original implementation sends it."""
    ip = ip_literal(host)
    if ip is None:
        return ATYP_DOMAIN
    return ATYP_IPV4 if ip.version == 4 or ip.ipv4_mapped is not None else ATYP_IPV6


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadEncoding(f"{what} is not valid UTF-8") from None


def parse_auth(buf: bytes) -> ParsedAuth | None:
    """Parse one auth message from the start of ``buf``.

    Returns ``None`` if ``buf`` is a strict prefix of a valid message,
    otherwise a `ParsedAuth`; raises a `WireError` subclass as soon as the
    bytes seen so far cannot start a valid message.
    """
    n = len(buf)
    if n < 1:
        return None
    if buf[0] != VERSION:
        raise UnsupportedVersion(f"version {buf[0]:#04x} not supported")
    if n < 2:
        return None
    if buf[1] != METHOD_CONNECT:
        raise UnknownMethod(f"method {buf[1]:#04x} not supported")
    if n < 3:
        return None
    ulen = buf[2]
    if ulen == 0:
        raise EmptyField("empty username")
    pos = 3 + ulen
    if n < pos + 1:
        return None
    plen = buf[pos]
    ppos = pos + 1
    pos = ppos + plen
    if n < pos + 1:
        return None
    atyp = buf[pos]
    pos += 1
    if atyp == ATYP_IPV4:
        end = pos + 4
    elif atyp == ATYP_IPV6:
        end = pos + 16
    elif atyp == ATYP_DOMAIN:
        if n < pos + 1:
            return None
        dlen = buf[pos]
        if dlen == 0:
            raise EmptyField("empty domain name")
        pos += 1
        end = pos + dlen
    else:
        raise UnknownAddressType(f"address type {atyp:#04x} not supported")
    if n < end + 2:
        return None
    raw_addr = bytes(buf[pos:end])
    if atyp == ATYP_IPV4:
        host = str(ipaddress.IPv4Address(raw_addr))
    elif atyp == ATYP_IPV6:
        host = str(ipaddress.IPv6Address(raw_addr))
    else:
        host = _text(raw_addr, "domain name")
    request = AuthRequest(
        username=_text(bytes(buf[3 : 3 + ulen]), "username"),
        password=_text(bytes(buf[ppos : ppos + plen]), "password"),
        host=host,
        port=int.from_bytes(buf[end : end + 2], "big"),
        address_type=atyp,
    )
    return ParsedAuth(request, end + 2)


def without_password(message: bytes) -> bytes:
    """``message``, one whole auth message (the bytes `parse_auth` consumed),
    with its password replaced by as many ``*``: the same length and
    framing with nothing secret in it, for handing a refused client's bytes
    on (to a fallback web server, whose logs may keep them)."""
    password_at = 3 + message[2]
    length = message[password_at]
    start = password_at + 1
    return bytes(message[:start]) + b"*" * length + bytes(message[start + length :])


def _field(value: str, what: str, allow_empty: bool = False) -> bytes:
    raw = value.encode("utf-8")
    if len(raw) > 255:
        raise ValueError(f"{what} is {len(raw)} bytes long; at most 255 fit")
    if not raw and not allow_empty:
        raise ValueError(f"{what} must not be empty")
    return bytes([len(raw)]) + raw


def encode_auth(request: AuthRequest) -> bytes:
    """The wire bytes of ``request``.  Raises ``ValueError`` for values the
    protocol cannot carry (a field over 255 bytes, an empty username, a port
    outside 0-65535, a host that does not match its address type)."""
    if not 0 <= request.port <= 0xFFFF:
        raise ValueError(f"port {request.port} is outside 0-65535")
    atyp = request.address_type
    if atyp == ATYP_IPV4:
        ip = ip_literal(request.host)
        if ip is None:
            raise ValueError(f"{request.host!r} is not an IPv4 address")
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip.version != 4:
            raise ValueError(f"{request.host!r} is not an IPv4 address")
        addr = ip.packed
    elif atyp == ATYP_IPV6:
        ip = ip_literal(request.host)
        if ip is None or ip.version != 6:
            raise ValueError(f"{request.host!r} is not an IPv6 address")
        addr = ip.packed
    elif atyp == ATYP_DOMAIN:
        addr = _field(request.host, "domain name")
    else:
        raise ValueError(f"address type {atyp} not supported")
    return b"".join(
        (
            bytes([VERSION, METHOD_CONNECT]),
            _field(request.username, "username"),
            _field(request.password, "password", allow_empty=True),
            bytes([atyp]),
            addr,
            request.port.to_bytes(2, "big"),
        )
    )


def encode_reply(status: int) -> bytes:
    """The server's two-byte reply."""
    return bytes([VERSION, status])


REPLY_SUCCESS = encode_reply(STATUS_SUCCESS)
REPLY_LENGTH = 2


def parse_reply(buf: bytes) -> int | None:
    """Parse the server reply: ``None`` if fewer than two bytes are there,
    otherwise the status byte.  Raises `BadReply` for a wrong version."""
    if len(buf) < 1:
        return None
    if buf[0] != VERSION:
        raise BadReply(f"reply version {buf[0]:#04x} is not 0x01")
    if len(buf) < REPLY_LENGTH:
        return None
    return buf[1]
