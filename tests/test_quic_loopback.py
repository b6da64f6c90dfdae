"""MTop over QUIC in this process: the adapter's server listener with the
server's own `TunnelFactory`, and climber's QUIC connector, on 127.0.0.1
(real QUIC, real SQLite).  The adapter is sans-IO on a Twisted UDP port,
so these run on the test reactor.  Every test runs once per QUIC library
(``quic_backend``: qh3 and aioquic)."""

import hashlib
import socket

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory
from twisted.internet.threads import deferToThread

from helpers import EchoAfterEOF, send_half_close_read

from climber.config import ServerEntry
from climber.forward import ForwardConnection
from climber.frontend import Climber, LocalFactory
from climber.pool import ServerPool
from climber.tunnel import TunnelError, TunnelOpener
from mtop.quic.server import QuicServerProtocol, server_configuration

pytestmark = pytest.mark.usefixtures("quic_backend")


def sleep(seconds):
    d = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


async def eventually(predicate, seconds=5.0):
    """Wait until ``predicate()`` is true (or the time is up)."""
    for _ in range(int(seconds / 0.05)):
        if predicate():
            return True
        await sleep(0.05)
    return predicate()


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


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
@pytest_twisted.ensureDeferred
async def test_tunnel_over_quic_with_half_close(quic_server, echo_target, make_forward, host):
    _, port, paths, _ = quic_server
    forward = make_forward(quic_entry(port, paths, host=host), echo_target)
    answer = await deferToThread(send_half_close_read, forward.port, b"hello over quic")
    assert answer == b"got:hello over quic"


async def open_error(quic_server, echo_target, make_forward, **entry):
    """The `TunnelError` of opening a tunnel through a server entry with
    ``entry`` changed; returns it and the forward."""
    _, port, paths, _ = quic_server
    forward = make_forward(quic_entry(port, paths, **entry), echo_target)
    with pytest.raises(TunnelError) as info:
        await forward.opener.open("127.0.0.1", echo_target, 5)
    return info.value, forward


@pytest_twisted.ensureDeferred
async def test_unresolvable_server_is_unreachable(quic_server, echo_target, make_forward):
    error, _ = await open_error(quic_server, echo_target, make_forward, host="no-such-host.invalid")
    assert error.kind == "unreachable" and "cannot resolve no-such-host.invalid" in error.reason


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
    error, _ = await open_error(quic_server, echo_target, make_forward, proto="not-mtop")
    assert error.kind == "unreachable" and "ALPN" in error.reason


@pytest_twisted.ensureDeferred
async def test_wrong_password_closes_the_stream_only(quic_server, echo_target, make_forward):
    error, forward = await open_error(quic_server, echo_target, make_forward, password="nope")
    assert error.kind == "refused"
    assert len(forward.connections) == 1  # the connection stays for other tunnels


async def _gather(deferreds):
    from twisted.internet.defer import gatherResults

    return await gatherResults(deferreds, consumeErrors=True)


def collect_tunnel(tunnel):
    """Attach to an open tunnel; returns (received chunks, a Deferred fired
    when it is lost)."""
    received, lost = [], Deferred()
    tunnel.attach(received.append, lambda: None, lambda: lost.callback(None))
    return received, lost


@pytest_twisted.ensureDeferred
async def test_a_stream_reset_closes_that_tunnel_only(quic_server, echo_target, make_forward):
    factory, port, paths, _ = quic_server
    forward = make_forward(quic_entry(port, paths), echo_target)
    first = await forward.opener.open("127.0.0.1", echo_target, 5)
    second = await forward.opener.open("127.0.0.1", echo_target, 5)
    assert first.transport.driver is second.transport.driver  # one connection
    _, first_lost = collect_tunnel(first)
    received, second_lost = collect_tunnel(second)
    await sleep(0.2)
    assert len(factory.tunnels) == 2

    first.transport.abortConnection()  # RESET_STREAM + STOP_SENDING
    await first_lost
    assert await eventually(lambda: len(factory.tunnels) == 1)

    second.transport.write(b"still here")
    second.transport.loseWriteConnection()
    await second_lost
    assert b"".join(received) == b"got:still here"


@pytest_twisted.ensureDeferred
async def test_new_connections_resume_the_session(quic_server, echo_target, make_forward, monkeypatch):
    from mtop.quic.client import QuicClientPool

    _, port, paths, _ = quic_server
    early_data_offered = []
    keep_ticket = QuicClientPool._keep_ticket

    def spy(pool, ticket):
        early_data_offered.append(ticket.max_early_data_size)
        keep_ticket(pool, ticket)

    monkeypatch.setattr(QuicClientPool, "_keep_ticket", spy)
    forward = make_forward(quic_entry(port, paths), echo_target)
    first = await forward.opener.open("127.0.0.1", echo_target, 5)
    assert first.resumed is False
    first.transport.abortConnection()
    await sleep(0.2)  # the session ticket arrives after the handshake
    connector = forward.opener.connectors[id(forward.opener.pool.servers[0])]
    assert connector.pool.ticket is not None and connector.pool.ticket.max_early_data_size is None
    connector.close()
    second = await forward.opener.open("127.0.0.1", echo_target, 5)
    assert second.resumed is True
    second.transport.abortConnection()
    assert early_data_offered and set(early_data_offered) == {None}  # no 0-RTT


@pytest_twisted.ensureDeferred
async def test_server_shutdown_closes_tunnels(quic_server, echo_target, make_forward):
    factory, port, paths, protocol = quic_server
    forward = make_forward(quic_entry(port, paths), echo_target)
    tunnel = await forward.opener.open("127.0.0.1", echo_target, 5)
    _, lost = collect_tunnel(tunnel)
    protocol.close_all()  # CONNECTION_CLOSE to the client
    await lost
    assert await eventually(lambda: not factory.tunnels)
    assert not forward.connections


@pytest.fixture
def log_failures():
    """Log events carrying a failure (tracebacks) while the test runs."""
    from twisted.logger import globalLogPublisher

    failures = []

    def observe(event):
        if "log_failure" in event:
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    yield failures
    globalLogPublisher.removeObserver(observe)


@pytest_twisted.ensureDeferred
async def test_junk_datagrams_are_dropped_quietly(quic_server, echo_target, make_forward, log_failures):
    import os

    _, port, paths, protocol = quic_server
    junk = [b"", b"\x00", os.urandom(40), b"\xc0\x00\x00\x00\x01" + os.urandom(1300), b"\xc3\xff\x00\x00\x1d" + os.urandom(1300)]
    junk += [bytes([0xC0]) + b"\x00\x00\x00\x01\x08" + os.urandom(8) + b"\x08" + os.urandom(8) + os.urandom(1200) for _ in range(20)]
    junk += [b"\x40" + os.urandom(100) for _ in range(20)]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for datagram in junk:
            s.sendto(datagram, ("127.0.0.1", port))
    await sleep(0.3)
    forward = make_forward(quic_entry(port, paths), echo_target)
    answer = await deferToThread(send_half_close_read, forward.port, b"after junk")
    assert answer == b"got:after junk"
    assert not log_failures


@pytest_twisted.ensureDeferred
async def test_handshake_deadline(server, log_failures):
    """A client that starts a handshake and goes silent is dropped after
    the handshake timeout."""
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    factory, _, paths = server
    protocol = QuicServerProtocol(reactor, factory, server_configuration(paths.server_crt, paths.server_key, "mtop", 30), 0.5)
    port = reactor.listenUDP(0, protocol, interface="127.0.0.1")
    try:
        address = ("127.0.0.1", port.getHost().port)
        client = QuicConnection(configuration=QuicConfiguration(is_client=True, alpn_protocols=["mtop"]))
        client.connect(address, now=0.0)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for datagram, _ in client.datagrams_to_send(now=0.0):
                s.sendto(datagram, address)
            await sleep(0.2)
            assert len(set(protocol.connections.values())) == 1
            assert await eventually(lambda: not protocol.connections)
        assert not log_failures
    finally:
        protocol.close_all()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_banned_address_gets_no_quic_connection(quic_server, echo_target, make_forward):
    factory, port, paths, protocol = quic_server
    forward = make_forward(quic_entry(port, paths), echo_target)
    while not factory.throttle.failed("127.0.0.1"):
        pass
    answer = await deferToThread(send_half_close_read, forward.port, b"hello", 15)
    assert answer == b""
    assert protocol.connections == {}  # the Initial was dropped: no handshake
    assert factory.counters["refused.banned"] >= 1


@pytest_twisted.ensureDeferred
async def test_quic_connections_without_a_tunnel_are_held_to_the_budget_and_the_deadline(server, events):
    """300 QUIC connections from one address that finish their handshake
    but never open a stream: at most the per-address pre-login budget of
    them exists at any moment, each is closed at the handshake deadline
    with an outcome line, and none is left 2 s after it."""
    from mtop.config import LimitsConfig
    from mtop.limits import ConnectionLimits, limit_settings
    from mtop.quic.client import QuicClientConnection, client_configuration

    factory, _, paths = server
    settings = limit_settings(LimitsConfig())
    factory.limits = ConnectionLimits(settings, factory.counters)
    deadline = 1.5
    protocol = QuicServerProtocol(reactor, factory, server_configuration(paths.server_crt, paths.server_key, "mtop", 30), deadline)
    port = reactor.listenUDP(0, protocol, interface="127.0.0.1")
    clients = []
    try:
        configuration = client_configuration("localhost", "mtop", paths.ca_crt, False, 30)
        for _ in range(300):
            # Clients give up their own handshake after 1 s (before a
            # retransmitted Initial could be admitted once slots free up).
            clients.append(
                QuicClientConnection(reactor, configuration, "127.0.0.1", port.getHost().port, 1.0, lambda c: None, lambda t: None)
            )
        from mtop.metrics import server_registry

        registry = server_registry(factory, [protocol])
        most = ready = 0
        in_metrics = []
        for _ in range(int((deadline + 2.0) / 0.05)):
            open_now = set(protocol.connections.values())
            most = max(most, len(open_now))
            ready = max(ready, sum(1 for c in clients if c.handshake_complete))
            if open_now and all(c.state == "login" for c in open_now):
                in_metrics.append((len(open_now), registry.get_sample_value("mtop_quic_connections", {"state": "login"})))
            await sleep(0.05)
        assert in_metrics and all(count == value for count, value in in_metrics), in_metrics
        assert registry.get_sample_value("mtop_refused_total", {"reason": "max-handshakes-per-client"}) >= 300 - 64
        assert registry.get_sample_value("mtop_evicted_total") == 0
        assert ready >= settings.max_handshakes_per_client // 2  # real handshakes happened
        assert most <= settings.max_handshakes_per_client == 64
        assert not protocol.connections
        assert factory.limits.open == 0 and factory.limits.handshaking == 0
        closed = [e for e in events if e.get("quic_outcome") == "no-tunnel"]
        assert len(closed) == ready
        assert factory.counters["refused.max-handshakes-per-client"] >= 300 - 64
    finally:
        for client in clients:
            client.shut("test over")
        protocol.close_all()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_quic_connection_lingers_briefly_after_its_last_tunnel(quic_server, echo_target, make_forward, events, monkeypatch):
    import mtop.quic.server as quic_server_module

    monkeypatch.setattr(quic_server_module, "QUIC_LINGER", 0.5)
    factory, port, paths, protocol = quic_server
    forward = make_forward(quic_entry(port, paths), echo_target)
    assert await deferToThread(send_half_close_read, forward.port, b"hi") == b"got:hi"
    (connection,) = set(protocol.connections.values())
    assert connection.logged_in and factory.limits.handshaking == 0
    assert await eventually(lambda: not protocol.connections, 5)
    assert [e["quic_outcome"] for e in events if e.get("quic_outcome")] == ["idle"]
    # The next tunnel opens a new connection.
    assert await deferToThread(send_half_close_read, forward.port, b"again") == b"got:again"
