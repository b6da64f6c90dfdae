"""``mtopctl check``: open one tunnel through a server with a share link
(a blocking TLS socket from the standard library) and report the TLS
version, ALPN and timings, or why it failed."""

from __future__ import annotations

import argparse
import socket
import ssl
import time

from mtop import wire
from mtop.config import ConfigError, parse_listen
from mtop.ctl.common import CommandError, Commands
from mtop.urls import URLError, parse_url

_STATUS_TEXT = {
    wire.STATUS_UNSUPPORTED_VERSION: "version or request not supported",
    wire.STATUS_AUTH_FAILURE: "authentication failed",
    wire.STATUS_CONNECTION_FAILURE: "the server could not connect to the target",
}


def cmd_check(args: argparse.Namespace) -> None:
    """Open one tunnel with a share link and report how it went."""
    try:
        link = parse_url(args.url)
    except URLError as e:
        raise CommandError(str(e)) from None
    if link.type != "tls":
        raise CommandError("check speaks TLS only; this link is for QUIC")
    try:
        target = parse_listen(args.target, "--target")
    except ConfigError as e:
        raise CommandError(str(e)) from None
    if target.host is None:
        raise CommandError("--target needs a host: HOST:PORT")
    ctx = ssl.create_default_context(cafile=args.ca) if args.ca else ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols([link.proto])
    if args.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    request = wire.AuthRequest(
        link.username, link.password, target.host, target.port, wire.address_type_for(target.host)
    )
    started = time.monotonic()
    try:
        with socket.create_connection((link.host, link.port), timeout=args.timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname=link.host) as tls:
                handshake_ms = (time.monotonic() - started) * 1000
                tls.sendall(wire.encode_auth(request))
                reply = b""
                while len(reply) < wire.REPLY_LENGTH:
                    chunk = tls.recv(wire.REPLY_LENGTH - len(reply))
                    if not chunk:
                        break
                    reply += chunk
                version, alpn = tls.version(), tls.selected_alpn_protocol()
    except (OSError, ssl.SSLError) as e:
        raise CommandError(f"{link.host}:{link.port}: {e}") from None
    total_ms = (time.monotonic() - started) * 1000
    if len(reply) < wire.REPLY_LENGTH:
        raise CommandError(
            "the server closed the connection without a reply: wrong user or password, or the target "
            "is unreachable (servers with server.reply_errors: true say which)"
        )
    if reply != wire.REPLY_SUCCESS:
        raise CommandError(f"the server refused: {_STATUS_TEXT.get(reply[1], f'status {reply[1]:#04x}')}")
    print(
        f"OK: {version}, ALPN {alpn}, handshake {handshake_ms:.1f} ms; "
        f"tunnel to {target} open after {total_ms:.1f} ms"
    )


def register(commands: Commands) -> None:
    """Add ``check``."""
    check = commands.add_parser("check", help="open one tunnel with an mtop:// link and report")
    check.add_argument("url", help="mtop://user:password@host:port/tls?proto=...")
    check.add_argument("--target", required=True, help="HOST:PORT the tunnel should reach")
    check.add_argument("--ca", help="CA certificate to trust (default: the system store)")
    check.add_argument("--insecure", action="store_true", help="do not verify the server certificate")
    check.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    check.set_defaults(func=cmd_check)
