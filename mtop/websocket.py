"""MTop over WebSocket: for CDNs and reverse proxies that forward only
HTTP(S) and WebSocket.

A ``ws`` or ``wss`` listener (the latter after TLS) reads one HTTP/1.1
request head; a WebSocket upgrade on its ``path`` is answered ``101`` and
the connection then carries exactly the MTop v1 byte stream (the auth
message, the reply, the tunnel's bytes) in binary messages.  One tunnel per
WebSocket connection.  Anything else is handed to the fallback web server
when one is configured (the port then looks like a web site), or answered
with a plain ``404``.

WebSocket has no half-close; this transport's convention, which both of
our ends follow, is an **empty text message**: "no more data from me"
(TCP's FIN).  Data is never sent as text, so it cannot be mistaken for
one.  Once both ends have sent it (or a tunnel ends otherwise), the end
that closes sends a close frame (1000) and closes the connection; a close
frame or the connection's end without the marker is taken as the end of
the peer's data too.  A text message with anything in it is a protocol
error (close 1003).

Framing is wsproto's (a sans-I/O implementation: `wsproto.WSConnection`),
driven here as an `mtop.interfaces.IStreamTransport` (`WebSocketStream`)
so that the relay, flow control and the tunnel ends are the same as over
TLS and QUIC: pausing the stream pauses the TCP (or TLS) connection under
it, and a producer registered on it is paused by that connection's write
buffer.  wsproto hands over a frame's payload as it arrives (it never
buffers a whole frame or message), so what one tunnel holds is bounded by
what one read brings, whatever frame sizes a peer announces.  Each end
pings every ``ping_interval`` (shorter than CDNs' idle limits: Cloudflare
closes after 100 s without a byte) and closes a connection from which
nothing at all arrived over a whole interval after a ping (a dead peer).

The client address comes from ``Forwarded`` / ``X-Forwarded-For`` only
when the request's peer is one of the listener's ``trusted_proxies``
(`forwarded_client`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError
from zope.interface import implementer

from mtop.interfaces import IStreamTransport
from mtop.relay import no_delay
from mtop.streams import as_stream
from mtop.timers import cancel

#: The longest HTTP request (or response) head read before the upgrade.
MAX_HEAD = 8192
#: Seconds between pings (``server.ws_ping_interval``, climber's
#: ``ping_interval``): under the 100 s idle limit of common CDNs.
PING_INTERVAL = 30.0
#: Close codes (RFC 6455, 7.4.1).
CLOSE_NORMAL = 1000
CLOSE_UNSUPPORTED_DATA = 1003
#: The answer to a request that is not this listener's upgrade, with no
#: fallback web server configured.
NOT_FOUND = (
    b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 10\r\n"
    b"Connection: close\r\n\r\nNot Found\n"
)


@implementer(IStreamTransport)
class WebSocketStream:
    """One WebSocket connection as an `IStreamTransport`: binary messages
    carry the bytes written; the protocol over it (``protocol``, given to
    `attach`) gets their payloads, the half-close marker as
    ``readConnectionLost`` and the connection's end as ``connectionLost``.

    ``lower`` is the `IStreamTransport` it runs on (TLS or TCP); ``ws`` the
    wsproto connection, past the handshake (``opened`` ``True``) or, on
    the client, before the server's answer: what is written until then is
    queued and goes when `open` is called."""

    kind = "ws"
    protocol: Any = None

    def __init__(self, lower: Any, ws: WSConnection, clock: Any, ping_interval: float, peer: Any = None, opened: bool = True):
        self.lower = lower
        self.ws = ws
        self.clock = clock
        self.ping_interval = ping_interval
        self._peer = peer
        self.opened = opened
        self._queued: list[bytes] = []
        self._queued_eof = False
        self.sent_eof = False
        self.got_eof = False
        self.lost = False
        #: Something arrived since the last ping (``_pinged``: one was sent).
        self._heard = False
        self._pinged = False
        self._ping_call: Any = None
        if opened:
            self._start_pings()

    # The lower connection's side

    def attach(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self)

    def open(self) -> None:
        """The client's upgrade was accepted: send what was queued."""
        self.opened = True
        queued, self._queued = self._queued, []
        if queued:
            self.write(b"".join(queued))
        if self._queued_eof:
            self.loseWriteConnection()
        self._start_pings()

    def receive(self, data: bytes | None) -> None:
        """Bytes from the lower connection (``None``: nothing new, only what
        wsproto already holds, such as frames that came with the handshake)."""
        self._heard = True
        ws = self.ws
        if data:
            try:
                ws.receive_data(data)
            except LocalProtocolError:
                return  # closed already: what still arrives is dropped
        for event in ws.events():
            if self.lost:
                return
            if isinstance(event, BytesMessage):
                if event.data and not self.got_eof:
                    payload = event.data
                    self.protocol.dataReceived(payload if type(payload) is bytes else bytes(payload))
            elif isinstance(event, TextMessage):
                if event.data or self.got_eof:
                    self._close(CLOSE_UNSUPPORTED_DATA, "text data")
                    return
                if event.message_finished:
                    self._peer_done()
            elif isinstance(event, Ping):
                self._send(event.response())
            elif isinstance(event, CloseConnection):
                # The peer's close frame (answered), or a frame wsproto
                # could not parse (the state is still open: closed with
                # the code it names, 1002 or 1007).
                self._peer_done()
                if ws.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
                    self._send(event.response())
                self.lower.loseConnection()
                return
            elif isinstance(event, Pong):
                pass

    def lower_eof(self) -> None:
        """The lower connection's input ended (without a close frame)."""
        self._peer_done()

    def lower_lost(self, reason: Failure | None) -> None:
        if self.lost:
            return
        self.lost = True
        cancel(self._ping_call)
        self._ping_call = None
        if self.protocol is not None:
            self.protocol.connectionLost(reason)

    def _peer_done(self) -> None:
        if not self.got_eof:
            self.got_eof = True
            if self.protocol is not None and not self.lost:
                self.protocol.readConnectionLost()

    def _send(self, event: Any) -> None:
        try:
            data = self.ws.send(event)
        except LocalProtocolError:
            return  # the WebSocket is closing: nothing more goes out
        self.lower.write(data)

    def _close(self, code: int, reason: str) -> None:
        self._send(CloseConnection(code=code, reason=reason))
        self.lower.loseConnection()

    # Keep-alive

    def _start_pings(self) -> None:
        if self.ping_interval > 0 and self._ping_call is None and not self.lost:
            self._ping_call = self.clock.callLater(self.ping_interval, self._ping)

    def _ping(self) -> None:
        self._ping_call = None
        if self.lost:
            return
        if self._pinged and not self._heard:
            # Nothing, not even a pong, for a whole interval after a ping.
            self.lower.abortConnection()
            return
        self._heard = False
        self._pinged = True
        self._send(Ping())
        self._ping_call = self.clock.callLater(self.ping_interval, self._ping)

    # IStreamTransport

    @property
    def tcp(self) -> Any:
        return self.lower.tcp

    @property
    def tls(self) -> Any:
        return self.lower.tls

    @property
    def disconnecting(self) -> bool:
        return self.lower.disconnecting

    def write(self, data: bytes) -> None:
        if not data or self.sent_eof:
            return
        if not self.opened:
            self._queued.append(data)
            return
        self._send(BytesMessage(data=data))

    def writeSequence(self, data: Iterable[bytes]) -> None:
        self.write(b"".join(data))

    def loseWriteConnection(self) -> None:
        """Half-close: the empty text message (see the module docstring)."""
        if not self.opened:
            self._queued_eof = True
            return
        if not self.sent_eof:
            self._send(TextMessage(data=""))
            self.sent_eof = True

    def loseConnection(self) -> None:
        if self.opened:
            self._send(CloseConnection(code=CLOSE_NORMAL))
        self.lower.loseConnection()

    def abortConnection(self) -> None:
        self.lower.abortConnection()

    def getPeer(self) -> Any:
        return self._peer if self._peer is not None else self.lower.getPeer()

    def getHost(self) -> Any:
        return self.lower.getHost()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.lower.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.lower.unregisterProducer()

    def pauseProducing(self) -> None:
        self.lower.pauseProducing()

    def resumeProducing(self) -> None:
        self.lower.resumeProducing()

    def stopProducing(self) -> None:
        self.lower.stopProducing()


# The client address behind trusted proxies


def parse_networks(values: Iterable[str]) -> tuple[Any, ...]:
    return tuple(ipaddress.ip_network(value, strict=False) for value in values)


def _in(host: str, networks: tuple[Any, ...]) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def _forwarded_for(value: str) -> list[str]:
    """The ``for=`` nodes of a ``Forwarded`` header (RFC 7239), in order."""
    nodes = []
    for element in value.split(","):
        for pair in element.split(";"):
            name, _, node = pair.strip().partition("=")
            if name.strip().lower() == "for":
                nodes.append(node.strip().strip('"'))
    return nodes


def _node_host(node: str) -> str | None:
    """The IP address of a ``Forwarded`` node or ``X-Forwarded-For`` entry
    (``1.2.3.4``, ``1.2.3.4:5``, ``[2001:db8::1]:5``, ``2001:db8::1``), or
    ``None`` (``unknown``, an obfuscated name, junk)."""
    node = node.strip()
    if node.startswith("["):
        node = node[1:].partition("]")[0]
    elif node.count(":") == 1:
        node = node.partition(":")[0]
    try:
        return str(ipaddress.ip_address(node))
    except ValueError:
        return None


def forwarded_client(headers: Iterable[tuple[bytes, bytes]], peer_host: str, trusted: tuple[Any, ...]) -> str | None:
    """The client's address that the request's proxies name, when its peer
    (``peer_host``) is one of ``trusted``; else ``None`` (the peer is the
    client).  ``Forwarded`` is preferred to ``X-Forwarded-For``; the chain
    is read from the nearest proxy back, past every trusted one, so a
    client cannot name itself someone else by sending the header too."""
    if not trusted or not _in(peer_host, trusted):
        return None
    forwarded: list[str] = []
    x_forwarded: list[str] = []
    for name, value in headers:
        name = name.lower()
        if name == b"forwarded":
            forwarded += _forwarded_for(value.decode("latin-1"))
        elif name == b"x-forwarded-for":
            x_forwarded += value.decode("latin-1").split(",")
    chain = forwarded or x_forwarded
    client = None
    for node in reversed(chain):
        host = _node_host(node)
        if host is None:
            break
        client = host
        if not _in(host, trusted):
            break
    return client


def _address(host: str, port: int) -> Any:
    return (IPv6Address if ":" in host else IPv4Address)("TCP", host, port)


# The server's side


@implementer(IHalfCloseableProtocol)
class WebSocketAccept(Protocol):
    """The protocol of one connection to a ``ws`` or ``wss`` listener: the
    HTTP request head under a deadline, then either a tunnel over a
    `WebSocketStream` or (not this listener's upgrade) the tunnel
    factory's protocol on the raw connection, which sends it to the
    fallback or answers `NOT_FOUND`."""

    def __init__(self, factory: "WebSocketFactory", addr: Any):
        self.factory = factory
        self.addr = addr
        self._head = b""
        self._deadline: Any = None
        self.stream: WebSocketStream | None = None
        #: The tunnel on the raw connection (not a WebSocket request).
        self.raw: Any = None

    def connectionMade(self) -> None:
        no_delay(self.transport)
        self._deadline = self.factory.clock.callLater(self.factory.handshake_timeout(), self._expired)

    def _expired(self) -> None:
        self._deadline = None
        self.factory.tunnels.counters.inc("tunnels.handshake-timeout")
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.stream is not None:
            self.stream.receive(data)
            return
        if self.raw is not None:
            self.raw.dataReceived(data)
            return
        head = self._head + data
        end = head.find(b"\r\n\r\n")
        if end < 0:
            if len(head) > MAX_HEAD:
                self._not_websocket("request head over 8 KiB", head)
            else:
                self._head = head
            return
        if end > MAX_HEAD:
            self._not_websocket("request head over 8 KiB", head)
            return
        self._head = b""
        cancel(self._deadline)
        self._deadline = None
        ws = WSConnection(ConnectionType.SERVER)
        try:
            ws.receive_data(head)
            request = next((event for event in ws.events() if isinstance(event, Request)), None)
        except RemoteProtocolError as e:
            self._not_websocket(f"not a WebSocket upgrade: {e}", head)
            return
        if request is None:
            self._not_websocket("not a WebSocket upgrade", head)
            return
        path = request.target.partition("?")[0]
        if path != self.factory.path:
            self._not_websocket("WebSocket upgrade on another path", head)
            return
        self._upgrade(ws, request)

    def _client_address(self, request: Request | None) -> Any:
        peer = self.transport.getPeer()
        if request is None:
            return peer
        host = forwarded_client(request.extra_headers, getattr(peer, "host", ""), self.factory.trusted_proxies)
        return peer if host is None else _address(host, 0)

    def _upgrade(self, ws: WSConnection, request: Request) -> None:
        address = self._client_address(request)
        tunnel = self.factory.tunnels.buildProtocol(address)
        if tunnel is None:
            self.transport.abortConnection()
            return
        self.transport.write(ws.send(AcceptConnection()))
        stream = WebSocketStream(as_stream(self.transport), ws, self.factory.clock, self.factory.ping_interval, peer=address)
        self.stream = stream
        tunnel.tls_ready = True
        stream.attach(tunnel)
        stream.receive(None)  # frames sent with the request head

    def _not_websocket(self, reason: str, head: bytes) -> None:
        cancel(self._deadline)
        self._deadline = None
        tunnel = self.factory.tunnels.buildProtocol(self.transport.getPeer())
        if tunnel is None:
            self.transport.abortConnection()
            return
        self.raw = tunnel
        tunnel.makeConnection(self.transport)
        tunnel.not_websocket(reason, head, NOT_FOUND)

    def readConnectionLost(self) -> None:
        if self.stream is not None:
            self.stream.lower_eof()
        elif self.raw is not None:
            self.raw.readConnectionLost()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure | None = None) -> None:
        cancel(self._deadline)
        self._deadline = None
        if self.stream is not None:
            self.stream.lower_lost(reason)
        elif self.raw is not None:
            self.raw.connectionLost(reason)


class WebSocketFactory(Factory):
    """The factory of a ``ws``/``wss`` listener's connections, over
    ``tunnels`` (the `mtop.server.TunnelFactory`, or a listener's
    `mtop.server.DestinationFactory`): ``path``, ``trusted_proxies`` (IP
    networks) and ``ping_interval`` are the listener's."""

    noisy = False

    def __init__(self, tunnels: Any, clock: Any, path: str, trusted_proxies: tuple[Any, ...], ping_interval: float):
        self.tunnels = tunnels
        self.clock = clock
        self.path = path
        self.trusted_proxies = trusted_proxies
        self.ping_interval = ping_interval
        #: Present for `mtop.proxyproto.ProxyHeaderFactory` and the listeners.
        self.counters = tunnels.counters

    def handshake_timeout(self) -> float:
        return self.tunnels.settings.handshake_timeout

    def buildProtocol(self, addr: Any) -> WebSocketAccept | None:
        """A connection from a trusted proxy is judged once its request
        names the client; any other one now, like a TLS listener's."""
        host = getattr(addr, "host", "")
        if not _in(host, self.trusted_proxies) and self.tunnels.admission_refusal(addr) is not None:
            return None
        return WebSocketAccept(self, addr)


# The client's side


@implementer(IHalfCloseableProtocol, IHandshakeListener)
class WebSocketDial(Protocol):
    """climber's connection to a ``wss`` server (under TLS): sends the
    upgrade request (``host``: its Host header; ``path``), runs
    ``protocol`` over a `WebSocketStream` from the start (what it writes
    waits for the ``101``), and tells it ``handshakeCompleted`` once the
    upgrade is accepted.  An answer other than ``101`` is passed to
    ``refused`` (with a line saying what it was, and the status) and the connection closed."""

    def __init__(
        self, protocol: Any, host: str, path: str, clock: Any, ping_interval: float,
        refused: Callable[[str, int | None], None],
    ):
        self.protocol = protocol
        self.host = host
        self.path = path
        self.clock = clock
        self.ping_interval = ping_interval
        self.refused = refused
        self._head = b""
        self.stream: WebSocketStream | None = None

    def connectionMade(self) -> None:
        ws = WSConnection(ConnectionType.CLIENT)
        lower = as_stream(self.transport)
        lower.write(ws.send(Request(host=self.host, target=self.path)))
        self.stream = WebSocketStream(lower, ws, self.clock, self.ping_interval, opened=False)
        self.stream.attach(self.protocol)

    def handshakeCompleted(self) -> None:
        pass  # the tunnel hears it once the upgrade is accepted

    def dataReceived(self, data: bytes) -> None:
        stream = self.stream
        if stream.opened:
            stream.receive(data)
            return
        head = self._head + data
        if head.find(b"\r\n\r\n") < 0:
            if len(head) > MAX_HEAD:
                self._refuse("answered the WebSocket upgrade with over 8 KiB of headers", None)
            else:
                self._head = head
            return
        self._head = b""
        try:
            stream.ws.receive_data(head)
            answer = next((e for e in stream.ws.events() if isinstance(e, (AcceptConnection, RejectConnection))), None)
        except RemoteProtocolError as e:
            self._refuse(f"answered the WebSocket upgrade with a bad response ({e})", None)
            return
        if isinstance(answer, RejectConnection):
            status = answer.status_code
            hint = " (wrong path or Host?)" if 400 <= status < 500 else ""
            self._refuse(f"answered the WebSocket upgrade with HTTP {status}{hint}", status)
            return
        if answer is None:
            self._refuse("answered the WebSocket upgrade with an incomplete response", None)
            return
        stream.open()
        if IHandshakeListener.providedBy(self.protocol):
            self.protocol.handshakeCompleted()
        stream.receive(None)

    def _refuse(self, detail: str, status: int | None) -> None:
        self.refused(detail, status)
        self.transport.loseConnection()

    def readConnectionLost(self) -> None:
        if self.stream is not None and self.stream.opened:
            self.stream.lower_eof()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.stream is not None:
            self.stream.lower_lost(reason)
