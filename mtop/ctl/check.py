"""``mtopctl check``: open one tunnel through a server with a share link
and report the TLS version (or QUIC), ALPN and timings, or why it failed.

TLS links use a blocking TLS socket from the standard library; WebSocket
(``wss``) links the same, with the upgrade (wsproto) before the auth
message.  QUIC links
use the project's own QUIC client (`mtop.quic.client`), the one climber
uses, on a reactor this command runs for the one check: the QUIC adapter
drives aioquic from a Twisted UDP port, so the default reactor serves.
"""

from __future__ import annotations

import argparse
import logging
import socket
import ssl
import time
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from mtop import wire
from mtop.config import ConfigError, parse_listen
from mtop.ctl.common import CommandError, Commands
from mtop.urls import ServerLink, URLError, parse_url

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
    try:
        target = parse_listen(args.target, "--target")
    except ConfigError as e:
        raise CommandError(str(e)) from None
    if target.host is None:
        raise CommandError("--target needs a host: HOST:PORT")
    request = wire.AuthRequest(
        link.username, link.password, target.host, target.port, wire.address_type_for(target.host)
    )
    if link.type == "quic":
        version, alpn, handshake_ms, total_ms, reply = _exchange_quic(link, request, args)
    elif link.type == "wss":
        version, alpn, handshake_ms, total_ms, reply = _exchange_wss(link, request, args)
    else:
        version, alpn, handshake_ms, total_ms, reply = _exchange_tls(link, request, args)
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


def _exchange_tls(
    link: ServerLink, request: wire.AuthRequest, args: argparse.Namespace
) -> tuple[str, str, float, float, bytes]:
    """(TLS version, ALPN, handshake ms, ms to the reply, the reply) of one
    tunnel over TLS."""
    ctx = _tls_context(link.proto, args)
    started = time.monotonic()
    try:
        with socket.create_connection((link.host, link.port), timeout=args.timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname=link.sni or link.host) as tls:
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
    return version, alpn, handshake_ms, total_ms, reply


def _tls_context(alpn: str, args: argparse.Namespace) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=args.ca) if args.ca else ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols([alpn])
    if args.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _exchange_wss(
    link: ServerLink, request: wire.AuthRequest, args: argparse.Namespace
) -> tuple[str, str, float, float, bytes]:
    """(``TLS version + WebSocket``, ALPN, ms to the upgrade, ms to the
    reply, the reply) of one tunnel over WebSocket."""
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, RejectConnection, Request

    from mtop.listeners import WSS_ALPN

    name = link.sni or link.host
    host = link.ws_host or (f"[{name}]" if ":" in name else name) + ("" if link.port == 443 else f":{link.port}")
    ws = WSConnection(ConnectionType.CLIENT)
    ctx = _tls_context(WSS_ALPN, args)
    started = time.monotonic()
    reply = b""
    try:
        with socket.create_connection((link.host, link.port), timeout=args.timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname=name) as tls:
                tls.sendall(ws.send(Request(host=host, target=link.path)))
                upgraded = False
                while len(reply) < wire.REPLY_LENGTH:
                    data = tls.recv(65536)
                    if not data:
                        break
                    ws.receive_data(data)
                    for event in ws.events():
                        if isinstance(event, AcceptConnection):
                            upgraded = True
                            handshake_ms = (time.monotonic() - started) * 1000
                            tls.sendall(ws.send(BytesMessage(data=wire.encode_auth(request))))
                        elif isinstance(event, RejectConnection):
                            raise CommandError(
                                f"{link.host}:{link.port}: the WebSocket upgrade on {link.path} (Host {host}) was "
                                f"answered with HTTP {event.status_code}: a wrong path or Host, or no wss listener"
                            )
                        elif isinstance(event, BytesMessage):
                            reply += event.data
                        elif isinstance(event, CloseConnection):
                            break
                if not upgraded:
                    raise CommandError(f"{link.host}:{link.port}: the server closed before answering the WebSocket upgrade")
                version, alpn = tls.version(), tls.selected_alpn_protocol()
    except (OSError, ssl.SSLError) as e:
        raise CommandError(f"{link.host}:{link.port}: {e}") from None
    except Exception as e:  # wsproto's RemoteProtocolError: not a WebSocket server
        if isinstance(e, CommandError):
            raise
        raise CommandError(f"{link.host}:{link.port}: not a WebSocket answer ({e})") from None
    total_ms = (time.monotonic() - started) * 1000
    return f"{version} + WebSocket {link.path}", alpn or "none", handshake_ms, total_ms, reply[: wire.REPLY_LENGTH]


class _ReplyReader(Protocol):
    """One tunnel's stream: sends the auth message, and `reply` fires with
    the server's reply (fewer bytes when the stream ended first)."""

    def __init__(self, auth: bytes):
        self.auth = auth
        self.received = b""
        self.reply: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.auth)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if len(self.received) >= wire.REPLY_LENGTH and not self.reply.called:
            self.reply.callback(self.received[: wire.REPLY_LENGTH])

    def connectionLost(self, reason: Failure) -> None:
        if not self.reply.called:
            self.reply.callback(self.received)


def _exchange_quic(
    link: ServerLink, request: wire.AuthRequest, args: argparse.Namespace
) -> tuple[str, str, float, float, bytes]:
    """(``QUIC``, ALPN, handshake ms, ms to the reply, the reply) of one
    tunnel over QUIC: one connection, one stream, on a reactor run here."""
    try:
        from mtop.quic.client import QuicClientConnection, QuicConnectError, client_configuration
    except ImportError:
        raise CommandError("checking a QUIC link needs the aioquic package: pip install 'mtop[quic]'") from None
    from twisted.internet import reactor

    # aioquic logs a failed handshake through the standard library's
    # logging, which would print it as a second line; the reason is in
    # the one line this command prints.
    logging.getLogger("quic").addHandler(logging.NullHandler())
    if reactor.running:  # called from code that runs a reactor already (tests)
        raise CommandError("check over QUIC runs its own reactor; run mtopctl as a process of its own")

    class CheckConnection(QuicClientConnection):
        """A client connection that remembers the ALPN protocol agreed."""

        alpn = ""

        def handshake_completed(self, event: Any) -> None:
            self.alpn = event.alpn_protocol or ""
            super().handshake_completed(event)

    async def exchange() -> tuple[str, str, float, float, bytes]:
        configuration = client_configuration(link.host, link.proto, args.ca, args.insecure, args.timeout)
        started = time.monotonic()
        connection = CheckConnection(
            reactor, configuration, link.host, link.port, args.timeout, lambda _: None, lambda _: None
        )
        try:
            try:
                await connection.when_ready()
            except QuicConnectError as e:
                raise CommandError(f"{link.host}:{link.port}: {e}") from None
            handshake_ms = (time.monotonic() - started) * 1000
            reader = _ReplyReader(wire.encode_auth(request))
            connection.reserved += 1
            connection.open_stream(reader)
            reply = await reader.reply.addTimeout(args.timeout, reactor, lambda *_: reader.received)
            total_ms = (time.monotonic() - started) * 1000
        finally:
            connection.shut("check done")
        return "QUIC", connection.alpn, handshake_ms, total_ms, reply

    outcome: list[Any] = []

    def finished(result: Any) -> None:
        outcome.append(result)
        reactor.stop()

    reactor.callWhenRunning(lambda: ensureDeferred(exchange()).addBoth(finished))
    reactor.run()
    if not outcome:  # the reactor stopped on SIGINT or SIGTERM
        raise KeyboardInterrupt
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    return outcome[0]


def register(commands: Commands) -> None:
    """Add ``check``."""
    check = commands.add_parser("check", help="open one tunnel with an mtop:// link and report")
    check.add_argument("url", help="mtop://user:password@host:port/tls?proto=... (or .../quic?...)")
    check.add_argument("--target", required=True, help="HOST:PORT the tunnel should reach")
    check.add_argument("--ca", help="CA certificate to trust (default: the system store)")
    check.add_argument("--insecure", action="store_true", help="do not verify the server certificate")
    check.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    check.set_defaults(func=cmd_check)
