"""The admin API's HTTP bounds, in process over loopback TCP."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import LoopingCall
from twisted.web.resource import Resource

from mtop import adminapi


class Trickle(protocol.Protocol):
    """Sends ``first`` at once, then ``rest`` a byte every ``every``
    seconds; records what comes back and when the connection closes."""

    def __init__(self, first: bytes, rest: bytes, every: float):
        self.first, self.rest, self.every = first, rest, every
        self.received = b""
        self.closed: defer.Deferred = defer.Deferred()
        self.sender: LoopingCall | None = None

    def connectionMade(self) -> None:
        self.started = reactor.seconds()
        self.transport.write(self.first)
        self.sender = LoopingCall(self._one)
        self.sender.start(self.every, now=False)

    def _one(self) -> None:
        if self.rest:
            self.transport.write(self.rest[:1])
            self.rest = self.rest[1:]

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason) -> None:
        if self.sender is not None and self.sender.running:
            self.sender.stop()
        self.closed.callback(reactor.seconds() - self.started)


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request):
        return b"{}"


async def _exchange(first: bytes, rest: bytes, every: float) -> tuple[float, bytes]:
    port = reactor.listenTCP(0, adminapi.admin_site(Hello()), interface="127.0.0.1")
    try:
        client = Trickle(first, rest, every)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        await endpoint.connect(protocol.Factory.forProtocol(lambda: client))
        took = await client.closed
        return took, client.received
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_request_trickled_in_is_cut_at_the_deadline(monkeypatch):
    """A byte every 0.2 s keeps the connection from ever being idle; the
    request still has REQUEST_DEADLINE seconds to arrive whole: 408, closed."""
    monkeypatch.setattr(adminapi, "REQUEST_DEADLINE", 1.0)
    took, received = await _exchange(b"GET /api/v1/me HTTP/1.1\r\n", b"X-Pad: " + b"a" * 1000, 0.2)
    assert received.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert 0.9 <= took < 3


@pytest_twisted.ensureDeferred
async def test_each_request_on_a_connection_gets_its_own_deadline(monkeypatch):
    """Three requests on one connection, the last two trickled in over
    about 1 and 1.5 s: all answered, though the connection lives past the
    deadline: it is per request."""
    monkeypatch.setattr(adminapi, "REQUEST_DEADLINE", 2.0)
    request = b"GET /api/x HTTP/1.1\r\nHost: a\r\n\r\n"
    last = b"GET /api/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    took, received = await _exchange(request, request + last, 0.03)
    assert received.count(b"HTTP/1.1 200 OK") == 3 and b"408" not in received
    assert took > 2.0
