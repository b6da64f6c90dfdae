"""``mtop://`` share links, shared by ``mtopctl url`` and climber.

Format (the original control tool's)::

    mtop://USER:PASSWORD@HOST:PORT/TYPE?proto=ALPN

with user and password percent-encoded as URL userinfo, IPv6 hosts in
brackets, ``TYPE`` one of ``tls`` or ``quic``.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, quote, unquote, urlsplit

TRANSPORTS = ("tls", "quic")
DEFAULT_PROTO = "mtop"


class URLError(ValueError):
    """A string that is not a usable ``mtop://`` link."""


@dataclass(frozen=True)
class ServerLink:
    username: str
    password: str
    host: str
    port: int
    type: str = "tls"
    proto: str = DEFAULT_PROTO

    def __repr__(self) -> str:
        return (
            f"ServerLink(username={self.username!r}, password=<hidden>, "
            f"host={self.host!r}, port={self.port}, type={self.type!r}, "
            f"proto={self.proto!r})"
        )


def _check_credentials(username: str, password: str) -> None:
    """The MTop auth message carries a 1-255 byte username and a 0-255 byte
    password, UTF-8; a link whose user cannot log in is refused up front
    rather than failing every tunnel later.  Messages never show them."""
    try:
        user_bytes, password_bytes = len(username.encode("utf-8")), len(password.encode("utf-8"))
    except UnicodeEncodeError:
        raise URLError("the link's user or password is not valid Unicode text") from None
    if not 0 < user_bytes <= 255:
        raise URLError(f"the link's user name is {user_bytes} bytes long; MTop carries 1 to 255")
    if password_bytes > 255:
        raise URLError(f"the link's password is {password_bytes} bytes long; MTop carries at most 255")


def make_url(link: ServerLink) -> str:
    """The share link for ``link``; raises `URLError` for values a link (or
    the MTop auth message) cannot carry."""
    _check_credentials(link.username, link.password)
    if link.type not in TRANSPORTS:
        raise URLError(f"transport {link.type!r} is not one of {', '.join(TRANSPORTS)}")
    if not 0 < link.port <= 0xFFFF:
        raise URLError(f"port {link.port} is outside 1-65535")
    host = f"[{link.host}]" if ":" in link.host else link.host
    userinfo = f"{quote(link.username, safe='')}:{quote(link.password, safe='')}"
    return f"mtop://{userinfo}@{host}:{link.port}/{link.type}?proto={quote(link.proto, safe='')}"


def parse_url(url: str) -> ServerLink:
    """Parse a share link; raises `URLError` naming what is wrong."""
    if not isinstance(url, str):
        raise URLError("an mtop:// link must be a string")
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as e:
        # urlsplit's messages quote the netloc or the would-be port, which
        # hold (part of) the password when it is not percent-encoded.
        why = "bad IPv6 host" if "IPv6" in str(e) else "bad port or characters"
        raise URLError(f"not a valid mtop:// link ({why}; percent-encode '/?#@:' in user and password)") from None
    if parts.scheme != "mtop":
        raise URLError("link must start with mtop://")
    if not parts.hostname:
        raise URLError("link has no host")
    if port is None:
        raise URLError("link has no port (mtop://user:pass@host:PORT/tls)")
    if not 0 < port <= 0xFFFF:
        raise URLError(f"port {port} is outside 1-65535")
    if parts.username is None or parts.password is None:
        raise URLError("link has no user:password@ part")
    transport = parts.path.strip("/") or "tls"
    if transport not in TRANSPORTS:
        raise URLError(f"transport {transport!r} is not one of {', '.join(TRANSPORTS)}")
    query = parse_qs(parts.query, keep_blank_values=True)
    proto = query.get("proto", [DEFAULT_PROTO])[-1] or DEFAULT_PROTO
    username, password = unquote(parts.username), unquote(parts.password)
    _check_credentials(username, password)
    return ServerLink(
        username=username,
        password=password,
        host=parts.hostname,
        port=port,
        type=transport,
        proto=proto,
    )
