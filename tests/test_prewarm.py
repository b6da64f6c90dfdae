"""climber's prewarmed TLS connections (`climber.prewarm`), the TCP connect
without an endpoint (`climber.tunnel.connect_server`) and the ``prewarm``
config keys.

The pool's rules are checked in memory with a `Clock` and a fake network
(expiry, refills only on request, the bound on waste); what a tunnel over a
prewarmed connection does is checked against the in-process MTop server
(real TLS): it works end to end, and the server saw nothing on the
connection before the tunnel's auth message."""

from __future__ import annotations

import random
import socket

import pytest
import pytest_twisted
import yaml
from prometheus_client import generate_latest
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.python.failure import Failure
from twisted.internet.testing import MemoryReactorClock, StringTransport

from helpers import EchoAfterEOF, echo_through

from climber.config import ConfigError, ServerEntry, load_climber_data
from climber.frontend import Climber
from climber.metrics import climber_registry
from climber.pool import ServerPool
from climber.prewarm import CLOSED, EXPIRED, FAILED, PrewarmPool
from climber.tunnel import TunnelOpener, connect_server
from mtop import wire
from mtop.server import TunnelSettings
from mtop.tls import server_context
from mtop.tlstransport import server_tls_factory

SIZE = 2
MAX_AGE = 7.0
#: The simulation's time step: a binary fraction, so that clock times add
#: up exactly and a window of MAX_AGE is exactly MAX_AGE / STEP steps.
STEP = 0.125


# The pool in memory


class FakeNetwork:
    """Plays the network for a `PrewarmPool`: records each connect; the test
    (or ``instant``) completes them."""

    def __init__(self, clock: Clock, instant: bool = False, close_after: float | None = None, fail: bool = False):
        self.clock = clock
        self.instant = instant
        self.close_after = close_after
        self.fail = fail
        self.attempts: list = []

    def connect(self, protocol) -> Deferred:
        connecting: Deferred = Deferred()
        self.attempts.append((protocol, connecting))
        if self.fail:
            connecting.errback(ConnectionRefusedError("refused"))
        elif self.instant:
            self.complete(protocol, connecting)
        return connecting

    def complete(self, protocol, connecting: Deferred) -> StringTransport:
        """The TCP connection is made and the TLS handshake done."""
        transport = StringTransport()
        protocol.makeConnection(transport)
        connecting.callback(protocol)
        protocol.handshakeCompleted()
        if self.close_after is not None:
            self.clock.callLater(self.close_after, self.server_closes, protocol)
        return transport

    def server_closes(self, protocol) -> None:
        if protocol.transport is not None and not protocol.transport.disconnecting:
            protocol.connectionLost(None)


def make_pool(**network):
    clock = Clock()
    net = FakeNetwork(clock, **network)
    return PrewarmPool(clock, SIZE, MAX_AGE, net.connect, "s.example:443"), net, clock


def test_the_pool_starts_empty_and_fills_when_a_tunnel_asks():
    pool, net, clock = make_pool()
    clock.advance(60)
    assert net.attempts == []
    assert pool.take() is None
    pool.refill()
    assert len(net.attempts) == SIZE
    assert pool.ready_count == 0  # connecting
    pool.refill()
    assert len(net.attempts) == SIZE  # at most SIZE at once
    clock.advance(0.05)
    transports = [net.complete(p, d) for p, d in net.attempts]
    assert pool.ready_count == SIZE
    first = pool.take()
    assert first is net.attempts[0][0]  # the oldest
    assert first.handshake_time == pytest.approx(0.05)
    assert pool.used == 1 and pool.ready_count == 1
    # Nothing was written by the pool: the TLS layer is all that speaks.
    assert all(t.value() == b"" for t in transports)


def test_unused_connections_expire_at_max_age_and_are_not_replaced():
    pool, net, clock = make_pool()
    pool.refill()
    transports = [net.complete(p, d) for p, d in net.attempts]
    taken = pool.take()
    clock.advance(MAX_AGE - 0.01)
    assert not transports[1].disconnecting
    clock.advance(0.01)
    assert transports[1].disconnecting  # closed, politely
    assert not transports[0].disconnecting  # the tunnel's now
    assert taken.expiry is None
    assert pool.wasted == {EXPIRED: 1}
    assert pool.ready_count == 0
    clock.advance(10 * MAX_AGE)
    assert len(net.attempts) == SIZE  # no tunnel asked: no refill


def test_a_connect_still_under_way_at_max_age_is_stopped():
    pool, net, clock = make_pool()
    pool.refill()
    clock.advance(MAX_AGE)
    assert all(d.called for _, d in net.attempts)  # cancelled
    assert pool.wasted == {EXPIRED: SIZE}
    assert clock.getDelayedCalls() == []


def test_a_connection_the_server_closes_is_dropped_and_counted():
    pool, net, clock = make_pool()
    pool.refill()
    (p0, d0), (p1, d1) = net.attempts
    net.complete(p0, d0)
    p0.connectionLost(None)  # the server closed it
    assert pool.ready_count == 0 and pool.take() is None
    # One that closes during its TLS handshake, or whose connect fails,
    # failed; neither is the pool's to report to the server pool.
    d1.errback(ConnectionRefusedError())
    assert pool.wasted == {CLOSED: 1, FAILED: 1}
    # An end of input (close_notify or FIN), or bytes before the auth
    # message: the connection is closed and out of the pool at once, before
    # the close is done.
    pool, net, clock = make_pool()
    pool.refill()
    transports = [net.complete(p, d) for p, d in net.attempts]
    net.attempts[0][0].readConnectionLost()
    net.attempts[1][0].dataReceived(b"hello")
    assert all(t.disconnecting for t in transports)
    assert pool.take() is None and pool.wasted == {CLOSED: 2}
    net.attempts[0][0].connectionLost(None)  # the close is done
    assert pool.wasted == {CLOSED: 2}


def test_close_ends_every_connection_without_counting_waste():
    pool, net, clock = make_pool()
    pool.refill()
    transport = net.complete(*net.attempts[0])
    pool.close()
    assert transport.disconnected  # aborted
    assert net.attempts[1][1].called  # the connect was stopped
    assert sum(pool.wasted.values()) == 0
    pool.refill()
    assert len(net.attempts) == SIZE
    assert clock.getDelayedCalls() == []


def waste_in_windows(pool: PrewarmPool, clock: Clock, net: FakeNetwork, rng: random.Random, mean_gap: float, busy: float):
    """Tunnel requests at random (mean gap ``mean_gap``) for ``busy``
    seconds, each taking a connection if one is ready and refilling, in
    `STEP` s steps; then idle for 10 max ages.  Returns the wasted total at
    each step, and the step the requests stopped at."""
    step = STEP
    totals = []
    next_request = rng.expovariate(1 / mean_gap)
    steps = int(busy / step)
    for i in range(steps + int(10 * MAX_AGE / step)):
        clock.advance(step)
        if i < steps and clock.seconds() >= next_request:
            pool.take()
            pool.refill()
            next_request = clock.seconds() + rng.expovariate(1 / mean_gap)
        totals.append(sum(pool.wasted.values()))
    return totals, steps


@pytest.mark.parametrize("mean_gap", [0.2, 2.0, 6.0, 12.0])
@pytest.mark.parametrize(
    "network", [{"instant": True}, {"instant": True, "close_after": 1.0}, {"fail": True}], ids=["quiet", "closing", "failing"]
)
def test_waste_is_bounded_while_in_use_and_stops_when_idle(mean_gap, network):
    """At most SIZE wasted in any window of MAX_AGE seconds, whether the
    server keeps prewarmed connections until they expire, closes them after
    a second or refuses them, and whatever the tunnel rate; none from one
    max age after the last tunnel on, and no connection is started then."""
    pool, net, clock = make_pool(**network)
    totals, busy_steps = waste_in_windows(pool, clock, net, random.Random(18), mean_gap, busy=300)
    window = int(MAX_AGE / STEP)
    worst = max(totals[i + window] - totals[i] for i in range(len(totals) - window))
    assert 0 < worst <= SIZE
    attempts = len(net.attempts)
    idle_from = busy_steps + window
    assert totals[idle_from] == totals[-1]
    clock.advance(100 * MAX_AGE)
    assert len(net.attempts) == attempts and clock.getDelayedCalls() == []
    if network.get("close_after") is None and not network.get("fail") and mean_gap <= 2.0:
        # Busy enough: most prewarmed connections are used.
        assert pool.used > 2 * sum(pool.wasted.values())


# The connector's choices, on a memory reactor


def memory_opener(**entry_settings):
    memory = MemoryReactorClock()
    entry = ServerEntry("127.0.0.1", 8443, "alice", "pw", insecure=True, **entry_settings)
    pool = ServerPool((entry,), "failover", memory)
    return TunnelOpener(memory, pool), memory


def test_a_server_marked_down_gets_no_prewarming_and_prewarm_failures_do_not_mark_it_down():
    opener, memory = memory_opener(prewarm=SIZE)
    (server,) = opener.pool.servers
    opener.open("127.0.0.1", 80, 5)
    assert len(memory.tcpClients) == 1 + SIZE  # the tunnel's, then the pool's
    assert [timeout for *_, timeout, _ in memory.tcpClients] == [5, MAX_AGE, MAX_AGE]
    for _, _, factory, _, _ in memory.tcpClients[1:]:
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
    assert not server.down and server.unreachable == 0
    opener.pool.report_failure(server, "test")
    opener.open("127.0.0.1", 80, 5)
    assert len(memory.tcpClients) == 1 + SIZE + 1  # the tunnel's only


def test_prewarm_zero_connects_only_for_tunnels():
    opener, memory = memory_opener(prewarm=0)
    opener.open("127.0.0.1", 80, 5)
    opener.open("127.0.0.1", 80, 5)
    assert len(memory.tcpClients) == 2
    (connector,) = opener.connectors.values()
    assert connector.prewarm is None


# Connects without an endpoint: cancellation, timeout


@pytest.fixture
def black_hole():
    """A loopback port whose connects hang: its accept queue (backlog 0)
    is held full by one connection, so further SYNs are dropped."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    filler = socket.socket()
    filler.setblocking(False)
    filler.connect_ex(("127.0.0.1", port))
    yield port
    filler.close()
    listener.close()


def connecting_to(port: int) -> list:
    """The reactor's TCP clients still connecting to ``port``."""
    return [w for w in reactor.getWriters() if getattr(w, "realAddress", (None, None))[1] == port]


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_cancelling_a_connect_stops_the_attempt(black_hole):
    made = connect_server(reactor, "127.0.0.1", black_hole, Factory.forProtocol(Protocol), 10)
    await sleep(0.1)
    assert len(connecting_to(black_hole)) == 1
    made.cancel()
    with pytest.raises(CancelledError):
        await made
    assert connecting_to(black_hole) == []


@pytest_twisted.ensureDeferred
async def test_the_timeout_is_the_tcp_connects(black_hole):
    made = connect_server(reactor, "127.0.0.1", black_hole, Factory.forProtocol(Protocol), 0.2)
    with pytest.raises(TimeoutError):
        await made
    assert connecting_to(black_hole) == []


@pytest_twisted.ensureDeferred
async def test_a_tunnel_cancelled_while_connecting_leaves_the_server_up(black_hole):
    opener = TunnelOpener(reactor, ServerPool((ServerEntry("127.0.0.1", black_hole, "a", "pw", insecure=True),), "failover", reactor))
    d = opener.open("127.0.0.1", 80, 10)
    await sleep(0.1)
    d.cancel()
    with pytest.raises(CancelledError):
        await d
    assert connecting_to(black_hole) == []
    assert not opener.pool.servers[0].down


# Against the in-process server


def recording(factory, seen: dict):
    """``factory`` whose every protocol's application bytes are recorded in
    ``seen`` (client port -> list of chunks) before it reads them."""
    build = factory.buildProtocol

    def build_recording(addr):
        protocol = build(addr)
        chunks = seen.setdefault(addr.port, [])
        read = protocol.dataReceived

        def data_received(data):
            chunks.append(data)
            read(data)

        protocol.dataReceived = data_received
        return protocol

    factory.buildProtocol = build_recording
    return factory


@pytest.fixture
def recorded_server(server):
    """The in-process server on a second port whose connections record the
    bytes they read; yields (factory, port, paths, seen)."""
    factory, _, paths = server
    seen: dict = {}
    context = server_context(paths.server_crt, paths.server_key, "mtop")
    tls = server_tls_factory(recording(factory, seen), lambda: context)
    port = reactor.listenTCP(0, tls, interface="127.0.0.1")
    yield factory, port.getHost().port, paths, seen
    port.stopListening()


@pytest.fixture
def echo_target():
    port = reactor.listenTCP(0, Factory.forProtocol(EchoAfterEOF), interface="127.0.0.1")
    yield port.getHost().port
    port.stopListening()


def prewarm_opener(port, paths, host="127.0.0.1", **settings):
    entry = ServerEntry(host, port, "alice", "pw", ca=paths.ca_crt, **{"prewarm": SIZE, **settings})
    return TunnelOpener(reactor, ServerPool((entry,), "failover", reactor))


async def until(condition, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await sleep(0.01)
    assert condition()


def alice_auth(target_port: int) -> bytes:
    """The auth message of alice's tunnel to 127.0.0.1:``target_port``."""
    return wire.encode_auth(wire.AuthRequest("alice", "pw", "127.0.0.1", target_port, wire.address_type_for("127.0.0.1")))


def client_port(tunnel) -> int:
    return tunnel.transport.getHost().port


@pytest_twisted.ensureDeferred
async def test_a_tunnel_over_a_prewarmed_connection_works_and_the_server_saw_nothing_before_its_auth(recorded_server, echo_target):
    factory, port, paths, seen = recorded_server
    opener = prewarm_opener(port, paths)
    (connector,) = opener.connectors.values()
    pool = connector.prewarm
    try:
        first = await opener.open("127.0.0.1", echo_target, 5)
        assert pool.used == 0  # the pool started empty
        await until(lambda: pool.ready_count == SIZE)
        # Handshaken, but silent: the server read nothing on them.
        warm = [p for p in seen if p != client_port(first)]
        assert len(warm) == SIZE and all(seen[p] == [] for p in warm)
        taken = []
        take = pool.take
        pool.take = lambda: taken.append(take()) or taken[-1]
        second = await opener.open("127.0.0.1", echo_target, 5)
        assert pool.used == 1
        assert client_port(second) in warm
        # Its handshake time is the prewarmed connection's own.
        assert second.handshake_time == taken[0].handshake_time is not None
        assert opener.pool.servers[0].opened == 2
        auth = alice_auth(echo_target)
        assert b"".join(seen[client_port(second)]).startswith(auth)
        assert await echo_through(second, b"warm" * 1000) == b"got:" + b"warm" * 1000
        assert await echo_through(first, b"cold") == b"got:cold"
        # The tunnel took one, and the pool was topped up again.
        await until(lambda: pool.ready_count == SIZE)
        assert sum(pool.wasted.values()) == 0
        text = generate_latest(climber_registry(Climber(opener, reactor), opener.pool)).decode()
        name = f"127.0.0.1:{port}"
        assert f'climber_prewarm_used_total{{server="{name}"}} 1.0' in text
        assert f'climber_prewarm_ready{{server="{name}"}} 2.0' in text
        assert f'climber_prewarm_wasted_total{{reason="expired",server="{name}"}} 0.0' in text
    finally:
        opener.close()
    # climber's shutdown closes them: the server sees them go.
    await until(lambda: len(factory.tunnels) == 0)


@pytest_twisted.ensureDeferred
async def test_prewarmed_connections_the_server_closes_are_dropped(recorded_server, echo_target):
    factory, port, paths, seen = recorded_server
    # The server gives a connection 1 s to send its auth message.
    factory.settings = TunnelSettings(handshake_timeout=1.0)
    opener = prewarm_opener(port, paths)
    (connector,) = opener.connectors.values()
    pool = connector.prewarm
    try:
        first = await opener.open("127.0.0.1", echo_target, 5)
        first.transport.loseConnection()
        await until(lambda: pool.wasted[CLOSED] == SIZE)
        assert pool.ready_count == 0 and pool.used == 0
        # The next tunnel connects afresh; after that waste the pool waits
        # a max age before it tries again.
        factory.settings = TunnelSettings(handshake_timeout=5)
        second = await opener.open("127.0.0.1", echo_target, 5)
        assert await echo_through(second, b"x") == b"got:x"
        assert pool.used == 0 and pool.ready_count == 0
        assert not opener.pool.servers[0].down
    finally:
        opener.close()


@pytest_twisted.ensureDeferred
async def test_a_prewarmed_connection_the_server_drops_as_the_auth_goes_out_is_retried_afresh(recorded_server, echo_target):
    """The race the pool cannot see: the server ends a ready connection (a
    restart, an eviction, a deadline shorter than prewarm_max_age) just as
    a tunnel takes it.  The tunnel is tried once more on a new connection
    to the same server, whose answer stands; the server is not marked
    down and no failover is counted."""
    factory, port, paths, seen = recorded_server
    opener = prewarm_opener(port, paths)
    (connector,) = opener.connectors.values()
    pool = connector.prewarm
    try:
        first = await opener.open("127.0.0.1", echo_target, 5)
        await until(lambda: pool.ready_count == SIZE)
        warm = [p for p in seen if p != client_port(first)]
        # The server resets every connection still before its login, and
        # climber has not heard of it when the next tunnel takes one.
        for tunnel in [t for t in factory.tunnels if t.state == "handshake"]:
            tunnel.transport.abortConnection()
        second = await opener.open("127.0.0.1", echo_target, 5)
        assert pool.used == 1
        assert client_port(second) not in warm  # a new connection
        assert await echo_through(second, b"again") == b"got:again"
        assert await echo_through(first, b"first") == b"got:first"
        assert not opener.pool.servers[0].down
        assert opener.pool.failovers == 0
    finally:
        opener.close()


@pytest_twisted.ensureDeferred
async def test_ipv6_literal_server(server, echo_target):
    factory, _, paths = server
    context = server_context(paths.server_crt, paths.server_key, "mtop")
    try:
        v6 = reactor.listenTCP(0, server_tls_factory(factory, lambda: context), interface="::1")
    except Exception as e:  # noqa: BLE001 (a machine without IPv6 loopback)
        pytest.fail(f"cannot listen on [::1] ({e}); this test needs IPv6 on loopback")
    # The certificate names localhost, not ::1.
    opener = prewarm_opener(v6.getHost().port, paths, host="::1", sni="localhost", prewarm=1)
    (connector,) = opener.connectors.values()
    try:
        first = await opener.open("127.0.0.1", echo_target, 5)
        assert first.transport.getPeer().host == "::1"
        assert await echo_through(first, b"six") == b"got:six"
        await until(lambda: connector.prewarm.ready_count == 1)
        second = await opener.open("127.0.0.1", echo_target, 5)
        assert connector.prewarm.used == 1
        assert await echo_through(second, b"six") == b"got:six"
    finally:
        opener.close()
        v6.stopListening()


# Configuration

BASE = {"socks5": {}}


def servers(*items):
    return load_climber_data({**BASE, "servers": list(items)}).servers


def tls(**keys):
    return {"host": "s.example:443", "username": "u", "password": "p", **keys}


def test_prewarm_defaults_to_two_for_tls_servers_and_zero_for_quic():
    (entry,) = servers(tls())
    assert (entry.prewarm, entry.prewarm_max_age, entry.tcp_fast_open) == (2, 7.0, False)
    (entry,) = servers(tls(type="quic"))
    assert entry.prewarm == 0
    (entry,) = servers(tls(type="quic", prewarm=0))
    assert entry.prewarm == 0
    (entry,) = servers(tls(prewarm=0))
    assert entry.prewarm == 0
    (entry,) = servers(tls(prewarm=5, prewarm_max_age="4s"))
    assert (entry.prewarm, entry.prewarm_max_age) == (5, 4.0)
    (a, b) = servers({"urls": ["mtop://u:p@a.example:443/tls", "mtop://u:p@b.example:443/tls"], "prewarm": 3})
    assert a.prewarm == b.prewarm == 3


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"prewarm": -1}, "servers[0].prewarm: -1 is not a number of connections from 0 (off) to 16"),
        ({"prewarm": 17}, "servers[0].prewarm: 17 is not a number of connections from 0 (off) to 16"),
        ({"prewarm": 1.5}, "servers[0].prewarm: 1.5 is not a number of connections"),
        ({"prewarm": "2"}, "servers[0].prewarm: '2' is not a number of connections"),
        ({"prewarm": True}, "servers[0].prewarm: True is not a number of connections"),
        ({"prewarm_max_age": 0}, "servers[0].prewarm_max_age: 0 must be a positive duration"),
        ({"prewarm_max_age": "soon"}, "servers[0].prewarm_max_age: 'soon' is not a duration"),
        ({"type": "quic", "prewarm": 2}, "servers[0].prewarm: server s.example:443 is QUIC, whose tunnels share one connection"),
        ({"prewarms": 2}, "servers[0].prewarms: unknown key; did you mean servers[0].prewarm?"),
    ],
)
def test_bad_prewarm_settings_are_config_errors(keys, message):
    with pytest.raises(ConfigError) as info:
        servers(tls(**keys))
    assert message in str(info.value)


def test_prewarm_on_a_quic_link_names_the_link():
    with pytest.raises(ConfigError) as info:
        servers({"urls": ["mtop://u:p@a.example:443/tls", "mtop://u:p@[2001:db8::1]:443/quic"], "prewarm": 1})
    assert "server [2001:db8::1]:443 is QUIC" in str(info.value)


def test_the_shipped_example_documents_prewarm():
    import pathlib

    text = (pathlib.Path(__file__).resolve().parents[1] / "etc" / "climber" / "climber.yaml").read_text()
    example = text.replace("    # prewarm: 2 ", "    prewarm: 2 ").replace("    # prewarm_max_age: 7s ", "    prewarm_max_age: 7s ")
    (entry, *_) = load_climber_data(yaml.safe_load(example)).servers
    assert (entry.prewarm, entry.prewarm_max_age) == (2, 7.0)


@pytest.fixture
def recorded_wss_server(server):
    """The in-process server behind a ``wss`` listener (TLS, ALPN
    http/1.1, the upgrade on ``/t``) whose tunnels record the bytes they
    read; yields (factory, port, paths, seen)."""
    from mtop.listeners import WSS_ALPN
    from mtop.websocket import WebSocketFactory

    factory, _, paths = server
    seen: dict = {}
    context = server_context(paths.server_crt, paths.server_key, WSS_ALPN)
    ws = WebSocketFactory(recording(factory, seen), reactor, "/t", (), 30.0)
    port = reactor.listenTCP(0, server_tls_factory(ws, lambda: context), interface="127.0.0.1")
    yield factory, port.getHost().port, paths, seen
    port.stopListening()


@pytest_twisted.ensureDeferred
async def test_wss_connections_are_prewarmed_through_the_upgrade(recorded_wss_server, echo_target):
    factory, port, paths, seen = recorded_wss_server
    opener = prewarm_opener(port, paths, type="wss", path="/t")
    (connector,) = opener.connectors.values()
    pool = connector.prewarm
    try:
        first = await opener.open("127.0.0.1", echo_target, 5)
        await until(lambda: pool.ready_count == SIZE)
        # Upgraded (the server made their tunnels), but silent.
        await until(lambda: len(seen) == SIZE + 1)
        quiet = [p for p, chunks in seen.items() if not chunks]
        assert len(quiet) == SIZE
        second = await opener.open("127.0.0.1", echo_target, 5)
        assert pool.used == 1 and second.prewarmed
        assert await echo_through(second, b"warm" * 1000) == b"got:" + b"warm" * 1000
        assert await echo_through(first, b"cold") == b"got:cold"
        # The auth message went over one of the quiet ones, in a message.
        auth = alice_auth(echo_target)
        assert sum(1 for p in quiet if b"".join(seen[p]).startswith(auth)) == 1
        await until(lambda: pool.ready_count == SIZE)
        assert sum(pool.wasted.values()) == 0
    finally:
        opener.close()
    await until(lambda: len(factory.tunnels) == 0)


@pytest_twisted.ensureDeferred
async def test_wss_prewarmed_connections_refused_by_the_upgrade_are_counted_not_used(recorded_wss_server, echo_target):
    factory, port, paths, seen = recorded_wss_server
    opener = prewarm_opener(port, paths, type="wss", path="/wrong")
    (connector,) = opener.connectors.values()
    pool = connector.prewarm
    try:
        with pytest.raises(Exception, match="HTTP 404"):
            await opener.open("127.0.0.1", echo_target, 5)
        await until(lambda: sum(pool.wasted.values()) == SIZE)
        assert pool.ready_count == 0 and pool.used == 0
    finally:
        opener.close()
