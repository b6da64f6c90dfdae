"""Prewarmed TLS connections: handshaken, silent, ready for the next tunnels.

A new tunnel to a ``type: tls`` server costs a TCP connect, a TLS handshake
and the auth round trip.  `PrewarmPool` keeps up to ``size`` connections to
one server that have finished TCP and TLS (resuming the session like any
tunnel, `climber.tunnel.ServerConnector.sessions`) and have sent nothing; a
tunnel that takes one sends its auth message at once: one round trip
instead of two or three.  Each is used for one tunnel.

The rules, and why:

* Nothing but the TLS handshake is sent on a prewarmed connection before a
  tunnel's auth message, so the original Go server and ours see an ordinary
  client that took a moment to write.
* One older than ``max_age`` (counted from the start of its TCP connect) is
  closed unused: our server closes a connection that has not sent its auth
  message within ``server.handshake_timeout`` of accepting it (10 s by
  default), and a connection it closes while a tunnel's auth message is on
  its way fails that tunnel.  One that the server closes, or that fails,
  is dropped without a word (and counted).
* Only while climber is in use: each tunnel that asks for one (and finds
  it or not) tops the pool up; nothing else does, so a pool left alone
  closes within one max age and is not refilled.  The pool starts empty: a
  climber nobody uses makes no connection.
* Waste is bounded: a connection is started only while those alive
  (connecting, handshaking or ready) plus those wasted in the last
  ``max_age`` seconds are fewer than ``size``.  So no ``max_age`` window
  sees more than ``size`` wasted: of ``size + 1`` wasted within one
  window, take the one started last; each of the others was then alive,
  or had been wasted within ``max_age`` before (its waste lies in the
  window, which started less than ``max_age`` before that start), and it
  could not have been started.  A server that closes every prewarmed
  connection at once costs ``size`` handshakes per ``max_age``, whatever
  the tunnel rate.
* The pool does not judge the server: its failures are not tunnels, and
  the pool of servers (`climber.pool`) hears only of tunnels; the caller
  does not refill for a server marked down.

Times come from the clock passed in (the reactor; a ``Clock`` in tests).
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from mtop.logs import logger
from mtop.timers import cancel

#: Why a prewarmed connection was not used, as counted in `PrewarmPool.wasted`.
EXPIRED, CLOSED, FAILED = "expired", "closed", "failed"


@implementer(IHandshakeListener, IHalfCloseableProtocol)
class Prewarmed(Protocol):
    """A prewarmed connection's protocol (`IHandshakeListener`,
    `IHalfCloseableProtocol`) until a tunnel takes the connection: it sends
    nothing and tells its pool when the handshake is done or the connection
    is closing or gone.  Once taken, the tunnel is the transport's protocol
    and this one hears nothing more."""

    def __init__(self, pool: PrewarmPool, started: float):
        self.pool = pool
        self.started = started
        #: Seconds from the start of the TCP connect to the end of the TLS
        #: handshake, once it is done.
        self.handshake_time: float | None = None
        #: The TCP connect while it is under way, and the expiry timer.
        self.connecting: Deferred | None = None
        self.expiry: Any = None

    def stop_expiry(self) -> None:
        cancel(self.expiry)
        self.expiry = None

    def handshakeCompleted(self) -> None:
        self.handshake_time = self.pool.clock.seconds() - self.started
        self.pool.ready(self)

    def dataReceived(self, data: bytes) -> None:
        # A server says nothing before the auth message: this connection is
        # not in a state to carry a tunnel.
        self._close()

    def readConnectionLost(self) -> None:
        self._close()

    def writeConnectionLost(self) -> None:
        """Never: nothing shuts our side before a tunnel takes it."""

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.pool.lost(self, reason)

    def _close(self) -> None:
        # Out of the pool now, not when the close is done: no tunnel may
        # take a connection that is closing.
        self.pool.lost(self, None)
        self.transport.loseConnection()


class PrewarmPool:
    """Up to ``size`` prewarmed connections to one server (see the module
    docstring for the rules).

    ``connect(protocol)`` starts a TCP and TLS connection whose protocol is
    ``protocol`` (a `Prewarmed`) and returns a Deferred that fires when the
    TCP connection is made (cancelling it stops the connect)."""

    _log = logger()

    def __init__(self, clock: Any, size: int, max_age: float, connect: Callable[[Prewarmed], Deferred], name: str):
        self.clock = clock
        self.size = size
        self.max_age = max_age
        self.name = name
        self._connect = connect
        #: Connecting or handshaking, and ready (oldest first).
        self._pending: list[Prewarmed] = []
        self._ready: deque[Prewarmed] = deque()
        #: When connections were wasted, for those of the last ``max_age``.
        self._wasted_at: deque[float] = deque()
        self._closed = False
        #: Connections taken by tunnels; those not used, by reason
        #: (`EXPIRED`, `CLOSED` by the server, `FAILED` to connect or in
        #: the TLS handshake).
        self.used = 0
        self.wasted: Counter[str] = Counter()

    @property
    def ready_count(self) -> int:
        """Connections ready to be taken now."""
        return len(self._ready)

    def take(self) -> Prewarmed | None:
        """The oldest ready connection, now the caller's, or None."""
        if not self._ready:
            return None
        connection = self._ready.popleft()
        connection.stop_expiry()
        self.used += 1
        return connection

    def refill(self) -> None:
        """Start connections up to ``size``, as the waste bound allows; the
        caller asks on each tunnel request (whether it took one or not)."""
        while not self._closed and len(self._pending) + len(self._ready) + self._recent_waste() < self.size:
            self._start()

    def close(self) -> None:
        """Close every connection, without counting them as wasted
        (climber stops); the pool starts no more."""
        self._closed = True
        connections = self._pending + list(self._ready)
        self._pending, self._ready = [], deque()
        for connection in connections:
            self._drop(connection, abort=True)

    # Events of the connections

    def ready(self, connection: Prewarmed) -> None:
        """``connection``'s handshake is done: it can be taken."""
        if connection in self._pending:
            self._pending.remove(connection)
            self._ready.append(connection)

    def lost(self, connection: Prewarmed, reason: Failure | None) -> None:
        """``connection`` closed before a tunnel took it: by the server (or
        during the TLS handshake, a failure) unless the pool closed it."""
        if self._forget(connection):
            self._waste(FAILED if connection.handshake_time is None else CLOSED, reason)

    def _start(self) -> None:
        connection = Prewarmed(self, self.clock.seconds())
        self._pending.append(connection)
        connection.expiry = self.clock.callLater(self.max_age, self._expire, connection)
        connection.connecting = self._connect(connection)
        connection.connecting.addCallbacks(self._connected, self._failed, (connection,), None, (connection,))

    def _connected(self, protocol: Any, connection: Prewarmed) -> None:
        connection.connecting = None

    def _failed(self, reason: Failure, connection: Prewarmed) -> None:
        connection.connecting = None
        # Not in the pool any more: the pool cancelled the connect itself.
        if self._forget(connection):
            self._waste(FAILED, reason)

    def _expire(self, connection: Prewarmed) -> None:
        connection.expiry = None
        if self._forget(connection):
            self._waste(EXPIRED, None)
            self._drop(connection, abort=False)

    def _forget(self, connection: Prewarmed) -> bool:
        """Take ``connection`` out of the pool; whether it was in."""
        if connection in self._ready:
            self._ready.remove(connection)
        elif connection in self._pending:
            self._pending.remove(connection)
        else:
            return False
        connection.stop_expiry()
        return True

    def _drop(self, connection: Prewarmed, abort: bool) -> None:
        """Close a connection the pool took out: stop its connect, or close
        it (politely, with ``close_notify``, unless ``abort``)."""
        connection.stop_expiry()
        if connection.connecting is not None:
            connection.connecting.cancel()
        elif connection.transport is not None:
            if abort:
                connection.transport.abortConnection()
            else:
                connection.transport.loseConnection()

    def _waste(self, reason: str, failure: Failure | None) -> None:
        self.wasted[reason] += 1
        self._wasted_at.append(self.clock.seconds())
        if failure is not None:
            self._log.debug(
                "prewarmed connection to {server} {reason}: {error}",
                server=self.name,
                reason=reason,
                error=failure.getErrorMessage(),
            )

    def _recent_waste(self) -> int:
        horizon = self.clock.seconds() - self.max_age
        while self._wasted_at and self._wasted_at[0] <= horizon:
            self._wasted_at.popleft()
        return len(self._wasted_at)
