"""TCP connections to an address, without an endpoint in between.

`connect_address` is what ``TCP4ClientEndpoint.connect`` does for a
tunnel's target (the server's dialer), minus what it costs per connection:
the endpoint wraps the protocol in a ``_WrappingProtocol``, a Python hop on
every ``dataReceived`` of the connection's life, and its timeout comes on
top of the connector's own.  Here the protocol is the connection's own, and
the one deadline is the connector's.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.protocol import ClientFactory
from twisted.python.failure import Failure


class _Connecting(ClientFactory):
    """Builds the caller's protocol once the TCP connection is up and fires
    ``made``; fails ``made`` if the attempt fails."""

    noisy = False

    def __init__(self, factory: Any, made: Deferred):
        self.factory = factory
        self.made = made

    def buildProtocol(self, addr: Any) -> Any:
        if not self.made.called:
            self.made.callback(None)
        return self.factory.buildProtocol(addr)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if self.made.called:
            return  # cancelled
        if reason.check(error.TimeoutError):
            # What a Deferred's own timeout says, as the endpoints' callers
            # are used to (`Deferred.addTimeout`).
            reason = Failure(TimeoutError("connect timed out"))
        self.made.errback(reason)


def connect_address(
    reactor: Any,
    host: str,
    port: int,
    factory: Any,
    timeout: float,
    before_connect: Callable[[Any], None] | None = None,
) -> Deferred:
    """Connect to ``host`` (an IPv4 or IPv6 address, not a name) and
    ``port`` with a protocol from ``factory``.

    The protocol hears of the connection itself (``connectionMade``); the
    Deferred is for the rest: it fires with None as the connection is made
    (before the protocol is built, so it carries no protocol that has no
    transport yet), or fails with `twisted.internet.defer.TimeoutError`
    after ``timeout`` seconds, or with the connection error.  Cancelling it
    stops the attempt (`CancelledError`).

    ``before_connect(connector)``, if given, is called once the attempt's
    socket exists and before it connects, to set socket options (climber's
    TCP Fast Open): Twisted's TCP client makes the socket in ``connectTCP``
    and calls connect() on a later turn of the reactor."""

    def cancel(made: Deferred) -> None:
        # Not fired yet, so the connector is still connecting.
        made.errback(CancelledError())
        connector.stopConnecting()

    made: Deferred = Deferred(cancel)
    connecting = _Connecting(factory, made)
    connector = reactor.connectTCP(host, port, connecting, timeout=timeout)
    if before_connect is not None:
        before_connect(connector)
    return made
