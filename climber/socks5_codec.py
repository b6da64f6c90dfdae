"""SOCKS5 (RFC 1928) and username/password auth (RFC 1929) codec: pure
functions, no I/O.

The local SOCKS5 front end (`climber.socks5`) uses the server-side half::

    greeting   client: VER(05) NMETHODS METHODS...      server: VER(05) METHOD
    userpass   client: VER(01) ULEN UNAME PLEN PASSWD   server: VER(01) STATUS
    request    client: VER(05) CMD RSV(00) ATYP DST.ADDR DST.PORT
    reply      server: VER(05) REP RSV(00) ATYP BND.ADDR BND.PORT

``ATYP`` is 0x01 (IPv4, 4 bytes), 0x03 (domain: 1 length byte + 1-255
bytes) or 0x04 (IPv6, 16 bytes); ports are two bytes big-endian.  The
client-side half (encoders for what a client sends, parsers for what a
server answers) exists for tests and tools.

Every ``parse_*`` function is incremental, like `mtop.wire.parse_auth`: it
returns ``None`` while the buffer holds a strict prefix of a valid message,
the message plus how many bytes it used once the buffer holds a whole one
(bytes after it are never consumed), or raises exactly one `SocksError`
subclass as soon as the bytes seen so far cannot start a valid message.
Each message has a hard size cap (`MAX_GREETING`, `MAX_USERPASS`,
`MAX_REQUEST`), so a caller never buffers more than that before a verdict.

Encoders raise ``ValueError`` for values the format cannot carry (a field
over 255 bytes, a port outside 0-65535, a byte value outside 0-255).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from mtop.wire import ip_literal

# SOCKS5 and MTop v1 number their address types alike (1 IPv4, 3 domain,
# 4 IPv6), so MTop's choice of type for a host serves here too.

VERSION = 0x05
#: Version byte of the RFC 1929 username/password subnegotiation.
USERPASS_VERSION = 0x01

METHOD_NO_AUTH = 0x00
METHOD_USERPASS = 0x02
METHOD_NONE_ACCEPTABLE = 0xFF

CMD_CONNECT = 0x01
CMD_BIND = 0x02
CMD_UDP_ASSOCIATE = 0x03

ATYP_IPV4 = 0x01
ATYP_DOMAIN = 0x03
ATYP_IPV6 = 0x04


def address_type_for(host: str) -> int:
    """SOCKS5's address type for ``host``: IP literals travel as addresses
    (an IPv4-mapped IPv6 literal as IPv6, as written), everything else as a
    domain name.  (MTop's own encoder sends a mapped address as IPv4, as
    the original does: `mtop.wire.address_type_for`.)"""
    ip = ip_literal(host)
    if ip is None:
        return ATYP_DOMAIN
    return ATYP_IPV4 if ip.version == 4 else ATYP_IPV6

REP_SUCCEEDED = 0x00
REP_GENERAL_FAILURE = 0x01
REP_NOT_ALLOWED = 0x02
REP_NETWORK_UNREACHABLE = 0x03
REP_HOST_UNREACHABLE = 0x04
REP_CONNECTION_REFUSED = 0x05
REP_TTL_EXPIRED = 0x06
REP_COMMAND_NOT_SUPPORTED = 0x07
REP_ADDRESS_TYPE_NOT_SUPPORTED = 0x08

USERPASS_SUCCESS = 0x00
USERPASS_FAILURE = 0x01

#: VER NMETHODS METHODS(255)
MAX_GREETING = 1 + 1 + 255
#: VER ULEN UNAME(255) PLEN PASSWD(255)
MAX_USERPASS = 1 + 1 + 255 + 1 + 255
#: VER CMD RSV ATYP DLEN DOMAIN(255) PORT(2)
MAX_REQUEST = 1 + 1 + 1 + 1 + 1 + 255 + 2

_ADDRESS_LENGTHS = {ATYP_IPV4: 4, ATYP_IPV6: 16}


class SocksError(ValueError):
    """Input that can never become a valid SOCKS5 message.

    ``reply`` is the REP code a server sends before closing when the error
    is found at the request stage, or ``None``: just close.
    """

    reply: int | None = None


class BadVersion(SocksError):
    """The version byte is not 5 (greeting, request, method choice, reply)
    or not 1 (username/password subnegotiation)."""


class MalformedMessage(SocksError):
    """A structural error: no methods offered, a reserved byte that is not
    zero, an empty username or domain, text that is not valid UTF-8."""

    reply = REP_GENERAL_FAILURE


class UnsupportedCommand(SocksError):
    """A request for any command other than CONNECT (BIND, UDP ASSOCIATE or
    an unknown code).  ``command`` is the byte the client sent."""

    reply = REP_COMMAND_NOT_SUPPORTED

    def __init__(self, command: int, message: str | None = None) -> None:
        self.command = command
        super().__init__(message or f"command {command:#04x} not supported")

    def __reduce__(self) -> tuple[type[UnsupportedCommand], tuple[int, str]]:
        # Exceptions pickle as cls(*args); ours takes the command first.
        return (type(self), (self.command, str(self)))


class UnsupportedAddressType(SocksError):
    """An address type other than IPv4 (1), domain (3) or IPv6 (4)."""

    reply = REP_ADDRESS_TYPE_NOT_SUPPORTED


@dataclass(frozen=True)
class SocksRequest:
    """One client request.  ``host`` is a dotted IPv4 address, a compressed
    IPv6 address (as `ipaddress` prints it) or a domain name, according to
    ``address_type``."""

    command: int
    host: str
    port: int
    address_type: int


# -- parsing helpers ---------------------------------------------------------


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedMessage(f"{what} is not valid UTF-8") from None


def _parse_address(buf: bytes, pos: int, what: str) -> tuple[int, str, int, int] | None:
    """Parse ``ATYP ADDR PORT`` starting at ``buf[pos]`` (the ATYP byte).

    Returns ``(address_type, host, port, end)`` with ``end`` the offset just
    after the port, ``None`` if more bytes are needed, or raises
    `UnsupportedAddressType` / `MalformedMessage`.
    """
    n = len(buf)
    if n <= pos:
        return None
    atyp = buf[pos]
    pos += 1
    if atyp in _ADDRESS_LENGTHS:
        end = pos + _ADDRESS_LENGTHS[atyp]
    elif atyp == ATYP_DOMAIN:
        if n <= pos:
            return None
        dlen = buf[pos]
        if dlen == 0:
            raise MalformedMessage(f"{what} has an empty domain name")
        pos += 1
        end = pos + dlen
    else:
        raise UnsupportedAddressType(f"{what} has address type {atyp:#04x}; only 1, 3 and 4 exist")
    if n < end + 2:
        return None
    raw = bytes(buf[pos:end])
    if atyp == ATYP_IPV4:
        host = str(ipaddress.IPv4Address(raw))
    elif atyp == ATYP_IPV6:
        host = str(ipaddress.IPv6Address(raw))
    else:
        host = _text(raw, f"{what} domain name")
    port = int.from_bytes(buf[end : end + 2], "big")
    return atyp, host, port, end + 2


# -- encoding helpers --------------------------------------------------------


def _byte(value: int, what: str) -> int:
    if not isinstance(value, int) or not 0 <= value <= 0xFF:
        raise ValueError(f"{what} {value!r} is not a byte value (0-255)")
    return value


def _field(value: str, what: str, allow_empty: bool = False) -> bytes:
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} cannot be encoded as UTF-8") from None
    if len(raw) > 255:
        raise ValueError(f"{what} is {len(raw)} bytes long; at most 255 fit")
    if not raw and not allow_empty:
        raise ValueError(f"{what} must not be empty")
    return bytes([len(raw)]) + raw


def _encode_address(host: str, port: int) -> bytes:
    """``ATYP ADDR PORT`` for ``host``, choosing ATYP with `address_type_for`."""
    if not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port!r} is outside 0-65535")
    atyp = address_type_for(host)
    if atyp == ATYP_DOMAIN:
        addr = _field(host, "domain name")
    else:
        ip = ip_literal(host)
        if getattr(ip, "scope_id", None):
            raise ValueError(f"address {host!r} has a scope id, which SOCKS5 cannot carry")
        addr = ip.packed
    return bytes([atyp]) + addr + port.to_bytes(2, "big")


# -- server side: parse what a client sends ----------------------------------


def parse_greeting(buf: bytes) -> tuple[tuple[int, ...], int] | None:
    """Parse the client's method-selection message from the start of ``buf``.

    Returns ``(methods, consumed)``, or ``None`` if more bytes are needed.
    Raises `BadVersion` or `MalformedMessage` (no methods offered).
    """
    n = len(buf)
    if n < 1:
        return None
    if buf[0] != VERSION:
        raise BadVersion(f"greeting version {buf[0]:#04x} is not 0x05")
    if n < 2:
        return None
    nmethods = buf[1]
    if nmethods == 0:
        raise MalformedMessage("greeting offers no authentication methods")
    end = 2 + nmethods
    if n < end:
        return None
    return tuple(buf[2:end]), end


def parse_userpass(buf: bytes) -> tuple[str, str, int] | None:
    """Parse an RFC 1929 username/password message from the start of ``buf``.

    Returns ``(username, password, consumed)``, or ``None`` if more bytes are
    needed.  The username has 1-255 bytes, the password 0-255, both UTF-8.
    Raises `BadVersion` (not subnegotiation version 1) or `MalformedMessage`.
    """
    n = len(buf)
    if n < 1:
        return None
    if buf[0] != USERPASS_VERSION:
        raise BadVersion(f"username/password version {buf[0]:#04x} is not 0x01")
    if n < 2:
        return None
    ulen = buf[1]
    if ulen == 0:
        raise MalformedMessage("empty username")
    upos = 2
    plen_pos = upos + ulen
    if n < plen_pos + 1:
        return None
    ppos = plen_pos + 1
    end = ppos + buf[plen_pos]
    if n < end:
        return None
    username = _text(bytes(buf[upos:plen_pos]), "username")
    password = _text(bytes(buf[ppos:end]), "password")
    return username, password, end


def parse_request(buf: bytes) -> tuple[SocksRequest, int] | None:
    """Parse a client request from the start of ``buf``.

    Returns ``(request, consumed)``, or ``None`` if more bytes are needed.
    Only CONNECT is accepted.  Errors are raised as soon as the byte that
    proves them has arrived, checked in wire order: `BadVersion` (byte 0),
    `UnsupportedCommand` (byte 1), `MalformedMessage` for a non-zero
    reserved byte (byte 2), `UnsupportedAddressType` (byte 3), then
    `MalformedMessage` for an empty or non-UTF-8 domain name.
    """
    n = len(buf)
    if n < 1:
        return None
    if buf[0] != VERSION:
        raise BadVersion(f"request version {buf[0]:#04x} is not 0x05")
    if n < 2:
        return None
    command = buf[1]
    if command != CMD_CONNECT:
        raise UnsupportedCommand(command)
    if n < 3:
        return None
    if buf[2] != 0x00:
        raise MalformedMessage(f"request reserved byte is {buf[2]:#04x}, not 0x00")
    parsed = _parse_address(buf, 3, "request")
    if parsed is None:
        return None
    atyp, host, port, end = parsed
    return SocksRequest(command=command, host=host, port=port, address_type=atyp), end


# -- server side: encode answers ---------------------------------------------


def encode_method_choice(method: int) -> bytes:
    """The server's answer to a greeting: ``VER METHOD``."""
    return bytes([VERSION, _byte(method, "method")])


def encode_userpass_status(ok: bool) -> bytes:
    """The server's answer to a username/password message."""
    return bytes([USERPASS_VERSION, USERPASS_SUCCESS if ok else USERPASS_FAILURE])


def encode_reply(rep: int, host: str = "0.0.0.0", port: int = 0) -> bytes:
    """The server's answer to a request: ``VER REP RSV ATYP BND.ADDR
    BND.PORT``, with ATYP chosen from ``host`` (IPv4 or IPv6 literal,
    otherwise a domain name)."""
    return bytes([VERSION, _byte(rep, "reply code"), 0x00]) + _encode_address(host, port)


# -- client side: encode what a client sends ---------------------------------


def encode_greeting(methods: Sequence[int]) -> bytes:
    """A client greeting offering ``methods`` (1-255 method codes)."""
    codes = [_byte(m, "method") for m in methods]
    if not 1 <= len(codes) <= 255:
        raise ValueError(f"a greeting offers 1-255 methods, not {len(codes)}")
    return bytes([VERSION, len(codes), *codes])


def encode_userpass(username: str, password: str) -> bytes:
    """A client RFC 1929 message; the username must not be empty."""
    return (
        bytes([USERPASS_VERSION])
        + _field(username, "username")
        + _field(password, "password", allow_empty=True)
    )


def encode_request(command: int, host: str, port: int) -> bytes:
    """A client request, with ATYP chosen from ``host`` like `encode_reply`."""
    return bytes([VERSION, _byte(command, "command"), 0x00]) + _encode_address(host, port)


# -- client side: parse what a server answers --------------------------------


def parse_method_choice(buf: bytes) -> int | None:
    """Parse the server's ``VER METHOD`` answer: the chosen method, or
    ``None`` if fewer than two bytes are there.  Raises `BadVersion`."""
    if len(buf) < 1:
        return None
    if buf[0] != VERSION:
        raise BadVersion(f"method choice version {buf[0]:#04x} is not 0x05")
    if len(buf) < 2:
        return None
    return buf[1]


def parse_reply(buf: bytes) -> tuple[int, str, int, int] | None:
    """Parse the server's answer to a request.

    Returns ``(rep, host, port, consumed)``, or ``None`` if more bytes are
    needed.  Raises `BadVersion`, `MalformedMessage` (non-zero reserved
    byte, empty or non-UTF-8 domain) or `UnsupportedAddressType`.
    """
    n = len(buf)
    if n < 1:
        return None
    if buf[0] != VERSION:
        raise BadVersion(f"reply version {buf[0]:#04x} is not 0x05")
    if n < 3:
        return None
    if buf[2] != 0x00:
        raise MalformedMessage(f"reply reserved byte is {buf[2]:#04x}, not 0x00")
    parsed = _parse_address(buf, 3, "reply")
    if parsed is None:
        return None
    _atyp, host, port, end = parsed
    return buf[1], host, port, end
