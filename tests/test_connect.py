"""`mtop.connect.connect_address`: TCP to an address without an endpoint."""

import socket

import pytest
import pytest_twisted
from twisted.internet import error, reactor
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from mtop.connect import connect_address
from mtop.listening import ipv6_available


class Echo(Protocol):
    def dataReceived(self, data):
        self.transport.write(data)


class Recorder(Protocol):
    def __init__(self, connected):
        self.events = []
        self.received = Deferred()
        self.connected_ = connected

    def connectionMade(self):
        self.events.append("connectionMade")
        self.connected_.callback(self)

    def dataReceived(self, data):
        self.received.callback(data)


class RecorderFactory(Factory):
    def __init__(self):
        self.connected = Deferred()

    def buildProtocol(self, addr):
        protocol = Recorder(self.connected)
        protocol.factory = self
        return protocol


async def _round_trip(host):
    port = reactor.listenTCP(0, Factory.forProtocol(Echo), interface=host)
    try:
        factory = RecorderFactory()
        assert await connect_address(reactor, host, port.getHost().port, factory, 5) is None
        protocol = await factory.connected
        protocol.transport.write(b"ping")
        assert await protocol.received == b"ping"
        # The protocol is the connection's own (no wrapper in between).
        assert protocol.events == ["connectionMade"]
        assert protocol.transport.protocol is protocol
        protocol.transport.loseConnection()
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_connects_to_an_ipv4_address():
    await _round_trip("127.0.0.1")


@pytest_twisted.ensureDeferred
async def test_connects_to_an_ipv6_address():
    if not ipv6_available():
        pytest.fail("this test needs IPv6 on loopback (::1): sysctl -w net.ipv6.conf.lo.disable_ipv6=0")
    await _round_trip("::1")


@pytest_twisted.ensureDeferred
async def test_a_refused_connection_fails_with_its_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(error.ConnectionRefusedError):
            await connect_address(reactor, "127.0.0.1", closed_port, RecorderFactory(), 5)


def test_the_connectors_timeout_is_a_deferred_timeout():
    memory = MemoryReactorClock()
    made = connect_address(memory, "192.0.2.1", 443, RecorderFactory(), 7)
    host, port, factory, timeout, _ = memory.tcpClients[0]
    assert (host, port, timeout) == ("192.0.2.1", 443, 7)
    failures = []
    made.addErrback(failures.append)
    factory.clientConnectionFailed(memory.connectors[0], Failure(error.TimeoutError()))
    assert failures[0].check(TimeoutError)


def test_cancelling_stops_the_attempt():
    memory = MemoryReactorClock()
    made = connect_address(memory, "192.0.2.1", 443, RecorderFactory(), 7)
    failures = []
    made.addErrback(failures.append)
    made.cancel()
    assert failures[0].check(CancelledError)
    assert memory.connectors[0].stoppedConnecting
    # The connector's own report of the stop changes nothing.
    _, _, factory, _, _ = memory.tcpClients[0]
    factory.clientConnectionFailed(memory.connectors[0], Failure(error.UserError()))
    assert len(failures) == 1
