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


def make_url(link: ServerLink) -> str:
    """The share link for ``link``."""
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
        raise URLError(f"not a valid mtop:// link: {e}") from None
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
    return ServerLink(
        username=unquote(parts.username),
        password=unquote(parts.password),
        host=parts.hostname,
        port=port,
        type=transport,
        proto=proto,
    )
