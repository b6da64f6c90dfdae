"""climber's `TunnelOpener` in memory: the order of attempts, which errors
move on to the next server, timeouts, cancellation and the pool's health
bookkeeping, with fake connectors, `StringTransport`s and a `Clock`."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectingCancelledError, ConnectionRefusedError, DNSLookupError
from twisted.internet.protocol import DatagramProtocol, Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from mtop.interfaces import IStreamTransport

from climber.config import ServerEntry
from climber.pool import ServerPool
from climber.tunnel import ServerTunnel, TunnelError, TunnelOpener
from mtop import wire

TIMEOUT = 5.0


class FakeConnector:
    """Stands in for `ServerConnector`/`QuicConnector`: records each connect
    and lets the test play the network's part."""

    def __init__(self, name: str, cancel_error: type[Exception] = ConnectingCancelledError):
        self.name = name
        self.attempts: list[Attempt] = []
        self.cancel_error = cancel_error
        self.sessions: list = []

    def connect(self, reactor, protocol, timeout):
        attempt = Attempt(self, protocol, timeout)
        self.attempts.append(attempt)
        return attempt.connecting

    def save_session(self, tls):
        self.sessions.append(tls)

    def close(self):
        pass


@implementer(IStreamTransport)
class FakeStream(StringTransport):
    """A TLS stream as climber's tunnel sees it, with no SSL connection
    behind it (no session to resume)."""

    kind = "tls"
    tcp = None
    tls = None

    def loseWriteConnection(self):
        self.loseConnection()

    def abortConnection(self):
        self.loseConnection()


class Attempt:
    """One connect through a `FakeConnector`."""

    def __init__(self, connector: FakeConnector, protocol, timeout: float):
        self.protocol = protocol
        self.timeout = timeout
        self.cancelled = False
        self.transport: StringTransport | None = None

        def cancel(d: Deferred) -> None:
            # As an endpoint (or the QUIC pool) does: give back what the
            # attempt reserved and fail with its own cancellation error.
            self.cancelled = True
            d.errback(connector.cancel_error("cancelled"))

        self.connecting: Deferred = Deferred(cancel)

    def connect(self) -> StringTransport:
        """The TCP connection is made (the TLS handshake starts)."""
        self.transport = FakeStream()
        self.protocol.makeConnection(self.transport)
        self.connecting.callback(self.protocol)
        return self.transport

    def handshake(self) -> None:
        self.protocol.handshakeCompleted()

    def reply(self, data: bytes = b"\x01\x00") -> None:
        self.protocol.dataReceived(data)

    def close(self, reason=None) -> None:
        self.protocol.connectionLost(reason)


def make_opener(n: int = 2, strategy: str = "failover", **entry_settings):
    clock = Clock()
    entries = tuple(
        ServerEntry(f"s{i}.example", 443, "alice", "pw", **entry_settings) for i in range(n)
    )
    pool = ServerPool(entries, strategy, clock)
    opener = TunnelOpener(clock, pool)
    connectors = []
    for state in pool.servers:
        connector = FakeConnector(state.name)
        opener.connectors[id(state)] = connector
        connectors.append(connector)
    return opener, connectors, clock


_results: dict[int, list] = {}


def watch(d: Deferred) -> Deferred:
    """Record what ``d`` fires with, for `outcome`."""
    results: list = []
    _results[id(d)] = results
    d.addBoth(results.append)
    return d


def outcome(d: Deferred):
    """What ``d`` has fired with so far: a result, a Failure, or None."""
    results = _results[id(d)]
    return results[0] if results else None


def open_tunnel(opener):
    return watch(opener.open("target.example", 80, TIMEOUT))


def test_first_server_answers():
    opener, (c0, c1), clock = make_opener()
    d = open_tunnel(opener)
    (attempt,) = c0.attempts
    assert attempt.timeout == TIMEOUT
    transport = attempt.connect()
    address_type = wire.address_type_for("target.example")
    expected = wire.encode_auth(wire.AuthRequest("alice", "pw", "target.example", 80, address_type))
    assert transport.value() == expected
    clock.advance(0.25)
    attempt.handshake()
    assert outcome(d) is None
    attempt.reply(b"\x01\x00early")
    tunnel = outcome(d)
    assert isinstance(tunnel, ServerTunnel)
    assert tunnel is attempt.protocol
    assert tunnel.server is opener.pool.servers[0]
    assert tunnel.handshake_time is not None
    s0 = opener.pool.servers[0]
    assert s0.opened == 1 and s0.handshake_time is not None and not s0.down
    assert c1.attempts == []
    assert opener.pool.failovers == 0
    # Bytes that came with the reply go to the owner first.
    got = []
    tunnel.attach(got.append, lambda: None, lambda: None)
    assert got == [b"early"]
    # The attempt's timer is gone.
    assert clock.getDelayedCalls() == []


def test_unreachable_server_is_marked_down_and_the_next_is_tried():
    opener, (c0, c1), clock = make_opener()
    d = open_tunnel(opener)
    c0.attempts[0].connecting.errback(ConnectionRefusedError("refused"))
    s0, s1 = opener.pool.servers
    assert s0.down and s0.failures == 1 and s0.unreachable == 1
    assert opener.pool.failovers == 1
    attempt = c1.attempts[0]
    attempt.connect()
    attempt.handshake()
    attempt.reply()
    assert outcome(d) is attempt.protocol
    assert s1.opened == 1 and s0.opened == 0


def test_unresolvable_server_names_the_host():
    opener, (c0,), clock = make_opener(n=1)
    d = open_tunnel(opener)
    c0.attempts[0].connecting.errback(DNSLookupError("nope"))
    failure = outcome(d)
    assert failure.check(TunnelError)
    assert failure.value.kind == "unreachable"
    assert "cannot resolve s0.example" in failure.value.message
    assert opener.pool.servers[0].down


def test_close_without_reply_moves_on_and_keeps_the_server_up():
    opener, (c0, c1), clock = make_opener()
    d = open_tunnel(opener)
    first = c0.attempts[0]
    first.connect()
    first.handshake()
    first.close()
    s0, s1 = opener.pool.servers
    assert not s0.down and s0.handshake_time is not None
    assert opener.pool.failovers == 1
    second = c1.attempts[0]
    second.connect()
    second.handshake()
    second.close()
    failure = outcome(d)
    assert failure.value.kind == "refused"
    assert "no server could open a tunnel to target.example:80" in failure.value.message


def test_close_during_the_tls_handshake_is_unreachable():
    opener, (c0,), clock = make_opener(n=1)
    d = open_tunnel(opener)
    c0.attempts[0].connect()
    c0.attempts[0].close()
    failure = outcome(d)
    assert failure.value.kind == "unreachable"
    assert opener.pool.servers[0].down


@pytest.mark.parametrize(
    "reply, kind",
    [(b"\x01\x02", "auth"), (b"\x01\x03", "target"), (b"\x01\x07", "protocol"), (b"\x05\x00", "protocol")],
)
def test_explicit_refusals_are_final(reply, kind):
    opener, (c0, c1), clock = make_opener()
    d = open_tunnel(opener)
    attempt = c0.attempts[0]
    transport = attempt.connect()
    attempt.handshake()
    attempt.reply(reply)
    assert transport.disconnecting
    attempt.close()
    failure = outcome(d)
    assert failure.value.kind == kind
    assert failure.value.server == "s0.example:443"
    assert c1.attempts == []
    assert opener.pool.failovers == 0
    # A refusal says nothing bad about the server.
    assert not opener.pool.servers[0].down


def test_timeout_while_connecting_cancels_the_connect_and_moves_on():
    opener, (c0, c1), clock = make_opener()
    d = open_tunnel(opener)
    clock.advance(TIMEOUT)
    assert c0.attempts[0].cancelled
    s0 = opener.pool.servers[0]
    assert s0.down
    assert len(c1.attempts) == 1
    clock.advance(TIMEOUT)
    failure = outcome(d)
    assert failure.value.kind == "timeout"
    assert "no answer within 5s" in failure.value.message


def test_timeout_waiting_for_the_reply_aborts_the_connection():
    opener, (c0, c1), clock = make_opener()
    d = open_tunnel(opener)
    first = c0.attempts[0]
    transport = first.connect()
    first.handshake()
    clock.advance(TIMEOUT - 0.001)
    assert not transport.disconnecting
    clock.advance(0.001)
    assert transport.disconnecting
    first.close()  # the abort's connectionLost
    assert opener.pool.servers[0].down
    second = c1.attempts[0]
    second.connect()
    second.handshake()
    second.reply()
    assert outcome(d) is second.protocol


def test_cancel_while_connecting_cancels_the_connect_only():
    for error in (ConnectingCancelledError, CancelledError):
        opener, (c0, c1), clock = make_opener()
        c0.cancel_error = error  # an endpoint's, or the QUIC pool's
        d = open_tunnel(opener)
        d.cancel()
        assert c0.attempts[0].cancelled
        assert outcome(d).check(CancelledError)
        assert c1.attempts == []
        # The caller left: that says nothing about the server.
        assert not opener.pool.servers[0].down
        assert clock.getDelayedCalls() == []


def test_cancel_while_waiting_for_the_reply_aborts_the_connection():
    opener, (c0, c1), clock = make_opener()
    d = open_tunnel(opener)
    attempt = c0.attempts[0]
    transport = attempt.connect()
    attempt.handshake()
    d.cancel()
    assert transport.disconnecting
    attempt.close()
    assert outcome(d).check(CancelledError)
    assert c1.attempts == []
    assert not opener.pool.servers[0].down
    assert clock.getDelayedCalls() == []


def test_pipelining_hands_the_tunnel_over_after_the_tls_handshake():
    opener, (c0, c1), clock = make_opener(pipelining=True)
    d = open_tunnel(opener)
    attempt = c0.attempts[0]
    attempt.connect()
    assert outcome(d) is None
    attempt.handshake()
    tunnel = outcome(d)
    assert tunnel is attempt.protocol
    got = []
    tunnel.attach(got.append, lambda: None, lambda: None)
    attempt.reply(b"\x01\x00hello")
    assert got == [b"hello"]


def test_a_name_too_long_fails_before_any_server_is_chosen():
    opener, (c0, c1), clock = make_opener(strategy="round_robin")
    failure = outcome(watch(opener.open("x" * 256, 80, TIMEOUT)))
    assert failure.value.kind == "target"
    assert c0.attempts == [] and c1.attempts == []
    # The round-robin turn was not used up.
    open_tunnel(opener)
    assert len(c0.attempts) == 1


def test_round_robin_starts_each_tunnel_one_server_further():
    opener, connectors, clock = make_opener(n=3, strategy="round_robin")
    for _ in range(3):
        open_tunnel(opener)
    assert [len(c.attempts) for c in connectors] == [1, 1, 1]
    # The third tunnel started on s2; it fails over to s0 next.
    connectors[2].attempts[0].connecting.errback(ConnectionRefusedError())
    assert len(connectors[0].attempts) == 2


# The real connectors on loopback: a server that never answers.


@pytest.fixture
def silent_tcp():
    """A TCP port that accepts and says nothing (no TLS handshake); yields
    (port, the accepted connections)."""
    accepted: list[Protocol] = []

    class Silent(Protocol):
        lost = False

        def connectionMade(self):
            accepted.append(self)

        def connectionLost(self, reason=None):
            self.lost = True

    port = reactor.listenTCP(0, Factory.forProtocol(Silent), interface="127.0.0.1")
    yield port.getHost().port, accepted
    for protocol in accepted:
        if not protocol.lost:
            protocol.transport.abortConnection()
    port.stopListening()


@pytest.fixture
def silent_udp():
    """A UDP port that drops every datagram (no QUIC handshake)."""
    port = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")
    yield port.getHost().port
    port.stopListening()


def real_opener(entries):
    return TunnelOpener(reactor, ServerPool(tuple(entries), "failover", reactor))


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_cancelling_during_the_tls_handshake_drops_the_connection(silent_tcp):
    port, accepted = silent_tcp
    opener = real_opener([ServerEntry("127.0.0.1", port, "alice", "pw", insecure=True)])
    d = opener.open("127.0.0.1", 80, TIMEOUT)
    while not accepted:
        await sleep(0.01)
    d.cancel()
    with pytest.raises(CancelledError):
        await d
    for _ in range(100):
        if accepted[0].lost:
            break
        await sleep(0.01)
    assert accepted[0].lost
    assert not opener.pool.servers[0].down


@pytest_twisted.ensureDeferred
async def test_a_silent_tls_server_times_out_and_is_marked_down(silent_tcp):
    port, accepted = silent_tcp
    opener = real_opener([ServerEntry("127.0.0.1", port, "alice", "pw", insecure=True)])
    with pytest.raises(TunnelError) as info:
        await opener.open("127.0.0.1", 80, 0.2)
    assert info.value.kind == "timeout"
    assert "no answer within 0.2s" in info.value.message
    assert opener.pool.servers[0].down


@pytest_twisted.ensureDeferred
async def test_cancelling_while_a_quic_connection_is_made_gives_its_stream_back(quic_backend, silent_udp):
    opener = real_opener([ServerEntry("127.0.0.1", silent_udp, "alice", "pw", type="quic", insecure=True)])
    try:
        (connector,) = opener.connectors.values()
        d = opener.open("127.0.0.1", 80, TIMEOUT)
        (connection,) = connector.pool.connections
        assert connection.reserved == 1
        d.cancel()
        with pytest.raises(CancelledError):
            await d
        assert connection.reserved == 0
        assert not opener.pool.servers[0].down
    finally:
        opener.close()
        await sleep(0.6)  # the UDP port goes after the CONNECTION_CLOSE
