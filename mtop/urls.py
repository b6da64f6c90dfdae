"""``mtop://`` share links, shared by ``mtopctl url`` and climber.

Format (the original control tool's)::

    mtop://USER:PASSWORD@HOST:PORT/TYPE?proto=ALPN

with user and password percent-encoded as URL userinfo, IPv6 hosts in
brackets, ``TYPE`` one of ``tls`` or ``quic``; and for WebSocket
(``wss``, usually through a CDN or reverse proxy)::

    mtop://USER:PASSWORD@HOST:PORT/wss?path=/tunnel&sni=NAME&host=NAME

with the upgrade's request path, the TLS server name and the Host header
(each left out when it is the default: ``/``, the link's host).  ``sni``
may come with any type.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, quote, unquote, urlsplit

TRANSPORTS = ("tls", "quic", "wss")
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
    #: WebSocket: the upgrade's path and Host header (``None``: the host).
    path: str = "/"
    ws_host: str | None = None
    #: The TLS server name, when not the host.
    sni: str | None = None

    def __repr__(self) -> str:
        extra = ""
        if self.type == "wss":
            extra = f", path={self.path!r}, ws_host={self.ws_host!r}"
        if self.sni:
            extra += f", sni={self.sni!r}"
        return (
            f"ServerLink(username={self.username!r}, password=<hidden>, "
            f"host={self.host!r}, port={self.port}, type={self.type!r}, "
            f"proto={self.proto!r}{extra})"
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
    query = f"proto={quote(link.proto, safe='')}"
    if link.type == "wss":
        _check_path(link.path)
        query = ""
        if link.path != "/":
            query += f"&path={quote(link.path, safe='/')}"
        if link.ws_host:
            query += f"&host={quote(link.ws_host, safe=':[]')}"
    if link.sni:
        query += f"&sni={quote(link.sni, safe='')}"
    return f"mtop://{userinfo}@{host}:{link.port}/{link.type}?{query.lstrip('&')}".rstrip("?")


def _check_path(path: str) -> None:
    if not path.startswith("/") or any(c in path for c in "?# ") or not path.isascii():
        raise URLError(f"path {path!r} is not a request path (it starts with '/', no spaces, '?' or '#')")


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
    path = query.get("path", ["/"])[-1] or "/"
    if transport == "wss":
        _check_path(path)
    username, password = unquote(parts.username), unquote(parts.password)
    _check_credentials(username, password)
    return ServerLink(
        username=username,
        password=password,
        host=parts.hostname,
        port=port,
        type=transport,
        proto=proto,
        path=path,
        ws_host=query.get("host", [None])[-1] or None,
        sni=query.get("sni", [None])[-1] or None,
    )
