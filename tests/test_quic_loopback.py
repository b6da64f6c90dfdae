"""MTop over QUIC in this process: the adapter's server listener with the
server's own `TunnelFactory`, and climber's QUIC connector, on 127.0.0.1
(real QUIC via aioquic, real SQLite).  The adapter is sans-IO on a Twisted
UDP port, so these run on the test reactor."""

import hashlib

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread

from helpers import EchoAfterEOF, send_half_close_read

from climber.config import ServerEntry
from climber.forward import ForwardConnection
from climber.frontend import Climber, LocalFactory
from climber.pool import ServerPool
from climber.tunnel import TunnelError, TunnelOpener
from mtop.quic.server import QuicServerProtocol, server_configuration


def sleep(seconds):
    d = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


@pytest.fixture
def quic_server(server):
    """The in-process server's tunnel factory also served over QUIC on a
    UDP port; yields (factory, UDP port number, certificate paths, protocol)."""
    factory, _, paths = server
    protocol = QuicServerProtocol(reactor, factory, server_configuration(paths.server_crt, paths.server_key, "mtop", 30), 5)
    port = reactor.listenUDP(0, protocol, interface="127.0.0.1")
    yield factory, port.getHost().port, paths, protocol
    protocol.close_all()
    port.stopListening()


def quic_entry(port, paths, **kw):
    values = dict(host="127.0.0.1", port=port, username="alice", password="pw", ca=paths.ca_crt, type="quic")
    values.update(kw)
    return ServerEntry(**values)


@pytest.fixture
def echo_target():
    port = reactor.listenTCP(0, Factory.forProtocol(EchoAfterEOF), interface="127.0.0.1")
    yield port.getHost().port
    port.stopListening()


class Forward:
    """A climber port forward to ``target`` through a QUIC server."""

    def __init__(self, entry, target_port):
        pool = ServerPool((entry,), "failover", reactor)
        self.opener = TunnelOpener(reactor, pool, 30)
        self.climber = Climber(self.opener, reactor, idle_timeout=30, handshake_timeout=5)
        self.listening = reactor.listenTCP(
            0, LocalFactory(ForwardConnection, self.climber, timeout=5, host="127.0.0.1", port=target_port),
            interface="127.0.0.1",
        )
        self.port = self.listening.getHost().port

    @property
    def connections(self):
        return self.opener.connectors[id(self.opener.pool.servers[0])].pool.connections

    def close(self):
        self.climber.close_all()
        self.opener.close()
        return self.listening.stopListening()


@pytest.fixture
def make_forward():
    made = []

    def make(entry, target_port):
        forward = Forward(entry, target_port)
        made.append(forward)
        return forward

    yield make
    for forward in made:
        forward.close()


@pytest_twisted.ensureDeferred
async def test_tunnel_over_quic_with_half_close(quic_server, echo_target, make_forward):
    _, port, paths, _ = quic_server
    forward = make_forward(quic_entry(port, paths), echo_target)
    answer = await deferToThread(send_half_close_read, forward.port, b"hello over quic")
    assert answer == b"got:hello over quic"


@pytest_twisted.ensureDeferred
async def test_many_tunnels_share_one_connection_up_to_the_cap(quic_server, echo_target, make_forward):
    _, port, paths, _ = quic_server
    forward = make_forward(quic_entry(port, paths, max_streams=4), echo_target)
    first = await deferToThread(send_half_close_read, forward.port, b"one")
    assert first == b"got:one"
    assert len(forward.connections) == 1

    # Ten at once: at most four streams per connection.  (Blocking clients
    # in threads: leave threads for the server's name resolution.)
    reactor.suggestThreadPoolSize(30)
    results = await _gather([deferToThread(send_half_close_read, forward.port, b"n%d" % i) for i in range(10)])
    assert sorted(results) == sorted(b"got:n%d" % i for i in range(10))
    assert 3 <= len(forward.connections) <= 4


@pytest_twisted.ensureDeferred
async def test_megabytes_both_ways(quic_server, echo_target, make_forward):
    _, port, paths, _ = quic_server
    forward = make_forward(quic_entry(port, paths), echo_target)
    data = hashlib.sha256(b"seed").digest() * (8 << 15)  # 8 MiB
    answer = await deferToThread(send_half_close_read, forward.port, data, 60)
    assert len(answer) == len(data) + 4 and answer[4:] == data


@pytest_twisted.ensureDeferred
async def test_wrong_alpn_is_refused(quic_server, echo_target, make_forward):
    _, port, paths, _ = quic_server
    forward = make_forward(quic_entry(port, paths, proto="not-mtop"), echo_target)
    d = forward.opener.open("127.0.0.1", echo_target, 5)
    with pytest.raises(TunnelError) as info:
        await d
    assert info.value.kind == "unreachable"
    assert "ALPN" in info.value.reason or "application protocol" in info.value.reason.lower()


@pytest_twisted.ensureDeferred
async def test_wrong_password_closes_the_stream_only(quic_server, echo_target, make_forward):
    _, port, paths, _ = quic_server
    forward = make_forward(quic_entry(port, paths, password="nope"), echo_target)
    with pytest.raises(TunnelError) as info:
        await forward.opener.open("127.0.0.1", echo_target, 5)
    assert info.value.kind == "refused"
    assert len(forward.connections) == 1  # the connection stays for other tunnels


async def _gather(deferreds):
    from twisted.internet.defer import gatherResults

    return await gatherResults(deferreds, consumeErrors=True)
