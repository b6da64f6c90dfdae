"""The server in this process on 127.0.0.1 with real TLS and real SQLite:
flow control under a slow peer, and half-close through our TLS transport."""

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater

from helpers import EchoAfterEOF

from mtop import wire
from mtop.tls import client_context
from mtop.tlstransport import client_tls_factory

CHUNK = b"\xa5" * (256 * 1024)
LIMIT = 1 << 20


class Source(Protocol):
    """Writes as fast as the peer takes it, up to a cap; counts."""

    def __init__(self, cap=256 << 20):
        self.sent = 0
        self.cap = cap
        self.paused = False
        self.received = 0
        self.stopped = False

    def connectionMade(self):
        self.transport.registerProducer(self, True)
        self._pump()

    def _pump(self):
        if self.paused or self.stopped or self.sent >= self.cap:
            return
        self.transport.write(CHUNK)
        self.sent += len(CHUNK)
        reactor.callLater(0, self._pump)

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        if self.paused:
            self.paused = False
            self._pump()

    def stopProducing(self):
        self.stopped = True

    def dataReceived(self, data):
        self.received += len(data)


class Tunnel(Protocol):
    """A client: auth message, wait for the reply, then behave as told."""

    def __init__(self, request, on_reply=None):
        self.request = request
        self.reply = Deferred()
        self.buffer = b""
        self.received = 0
        self.on_reply = on_reply

    def connectionMade(self):
        self.transport.write(wire.encode_auth(self.request))

    def dataReceived(self, data):
        if not self.reply.called:
            self.buffer += data
            if len(self.buffer) >= 2:
                reply, rest = self.buffer[:2], self.buffer[2:]
                self.received += len(rest)
                self.reply.callback(reply)
            return
        self.received += len(data)

    def connectionLost(self, reason):
        if not self.reply.called:
            self.reply.errback(reason)


async def open_tunnel(port, paths, host, target_port, atyp=wire.ATYP_IPV4):
    """A tunnel as alice to ``target_port`` (named ``host``), once the server
    has replied 01 00."""
    client = connect_tunnel(
        port, paths, wire.AuthRequest("alice", "pw", host, target_port.getHost().port, atyp)
    )
    assert await client.reply == b"\x01\x00"
    return client


async def send_and_half_close(client, data):
    """Send ``data``, half-close, and return all that arrives until the
    connection ends."""
    closed = Deferred()
    client.connectionLost = lambda reason: closed.callback(None)
    chunks = []
    client.dataReceived = chunks.append
    client.transport.write(data)
    client.transport.loseWriteConnection()
    await closed
    return b"".join(chunks)


def buffered(tcp_transport):
    return len(tcp_transport.dataBuffer) - tcp_transport.offset + tcp_transport._tempDataLen


def listen_target(protocol):
    factory = Factory.forProtocol(lambda: protocol)
    return reactor.listenTCP(0, factory, interface="127.0.0.1")


def connect_tunnel(port, paths, request):
    client = Tunnel(request)
    tls = client_tls_factory(
        Factory.forProtocol(lambda: client), client_context(paths.ca_crt), "127.0.0.1"
    )
    reactor.connectTCP("127.0.0.1", port, tls)
    return client


@pytest_twisted.ensureDeferred
async def test_client_that_stops_reading_bounds_server_memory(server):
    factory, port, paths = server
    source = Source()
    target_port = listen_target(source)
    try:
        client = await open_tunnel(port, paths, "127.0.0.1", target_port)
        client.transport.pauseProducing()  # the client stops reading
        await deferLater(reactor, 1.5, lambda: None)
        sent_before = source.sent
        await deferLater(reactor, 1.0, lambda: None)
        (tunnel,) = factory.tunnels
        held = buffered(tunnel.transport.transport) + buffered(tunnel.relay.target.tcp)
        assert held <= LIMIT, f"server holds {held} bytes for a client that does not read"
        assert source.sent == sent_before, "the target was not paused"
        assert source.sent < 64 << 20
        # Once the client reads again, everything arrives.
        client.transport.resumeProducing()
        source.cap = source.sent + 4 * len(CHUNK)
        source.resumeProducing()
        for _ in range(100):
            if client.received == source.sent:
                break
            await deferLater(reactor, 0.05, lambda: None)
        assert client.received == source.sent
        client.transport.loseConnection()
    finally:
        target_port.stopListening()


class Sink(Protocol):
    def connectionMade(self):
        self.transport.pauseProducing()  # never reads


@pytest_twisted.ensureDeferred
async def test_target_that_stops_reading_bounds_server_memory(server):
    factory, port, paths = server
    target_port = listen_target(Sink())
    try:
        client = await open_tunnel(port, paths, "127.0.0.1", target_port)
        pusher = Source(cap=64 << 20)
        pusher.transport = client.transport
        client.transport.registerProducer(pusher, True)
        pusher._pump()
        await deferLater(reactor, 1.5, lambda: None)
        sent_before = pusher.sent
        await deferLater(reactor, 1.0, lambda: None)
        (tunnel,) = factory.tunnels
        held = buffered(tunnel.transport.transport) + buffered(tunnel.relay.target.tcp) + len(tunnel._early)
        assert held <= LIMIT, f"server holds {held} bytes for a target that does not read"
        assert pusher.sent == sent_before, "the client was not paused"
        pusher.stopped = True
        client.transport.unregisterProducer()
        client.transport.loseConnection()
    finally:
        target_port.stopListening()


@pytest_twisted.ensureDeferred
async def test_half_close_through_our_tls_transport_on_both_ends(server):
    factory, port, paths = server
    target_port = listen_target(EchoAfterEOF())
    try:
        client = await open_tunnel(port, paths, "127.0.0.1", target_port)
        assert await send_and_half_close(client, b"hello") == b"got:hello"
    finally:
        target_port.stopListening()


@pytest.mark.parametrize(
    "interface,host,atyp",
    [("::1", "::1", wire.ATYP_IPV6), ("127.0.0.1", "localhost", wire.ATYP_DOMAIN)],
)
@pytest_twisted.ensureDeferred
async def test_ipv6_and_domain_targets(server, interface, host, atyp):
    factory, port, paths = server
    target = EchoAfterEOF()
    target_port = reactor.listenTCP(0, Factory.forProtocol(lambda: target), interface=interface)
    try:
        client = await open_tunnel(port, paths, host, target_port, atyp)
        assert await send_and_half_close(client, b"v6?") == b"got:v6?"
    finally:
        target_port.stopListening()
