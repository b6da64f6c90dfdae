"""One tunnel end: what the server's and climber's connections share.

A `TunnelEnd` is the protocol of the connection a tunnel starts from: a
client's TLS connection or QUIC stream at the server
(`mtop.server.TunnelProtocol`), an application's connection at climber
(`climber.frontend.LocalConnection`).  Each subclass reads its own
handshake (the MTop auth message; a SOCKS5 greeting or an HTTP request
head); this class owns the rest of the life:

``handshake``  the subclass's `handshake_data` gets the bytes, under a
               deadline (`start_deadline`);
pending        (the subclass names these states, `PENDING_STATES`: the
               server's ``auth``, ``connecting``, ``fallback``; climber's
               ``opening``) while the other end is opened (`wait_for`),
               bytes the peer sends are kept (at most `MAX_EARLY_DATA`) and
               the connection is paused as they arrive (most peers send
               nothing before they are answered, and a pause not taken
               saves a stop and a restart of reading per tunnel); an end
               of input is remembered;
``relay``      `splice` hands both ends to an `mtop.relay.Relay` (flow
               control, half-close, lingering close, idle timeout, counts);
``failing``    `close_after` sends a last answer and lingers: our side is
               shut, what still arrives is read and dropped, and the
               connection closes on the peer's end of input or after
               `LINGER_SECONDS` (closing with unread input would reset the
               connection and could destroy the answer);
``closed``.

Whatever ends it, `finish` reports exactly one outcome (the subclass's
`report_outcome`, its log line and counters).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from mtop.relay import LINGER_SECONDS, Relay, writer_for
from mtop.streams import as_stream
from mtop.timers import cancel

#: Bytes kept from a peer while the other end opens.  It is paused at the
#: first bytes, so only what one read delivered can arrive; this is a
#: safety net, not a working limit.
MAX_EARLY_DATA = 1 << 20


@implementer(IHalfCloseableProtocol)
class TunnelEnd(Protocol):
    """The shared life of a tunnel end (see the module docstring).

    Subclasses set ``clock`` (an ``IReactorTime``) and ``idle_timeout``
    before splicing, name their waiting states in `PENDING_STATES`, and
    implement `handshake_data`, `handshake_eof` and `report_outcome`."""

    #: States in which the peer is paused and its bytes are kept.
    PENDING_STATES: frozenset[str] = frozenset()

    clock: Any
    idle_timeout: float = 0.0
    state = "handshake"
    relay: Relay | None = None
    outcome: str | None = None
    detail: str | None = None
    _early = b""
    _client_eof = False
    _deadline: Any = None
    _pending: Deferred | None = None
    _reported = False
    #: Paused by `keep_early`: bytes arrived while waiting.
    _paused = False

    # IProtocol

    def dataReceived(self, data: bytes) -> None:
        state = self.state
        if state == "relay":
            self.relay.client_data(data)
        elif state == "handshake":
            self.handshake_data(data)
        elif state in self.PENDING_STATES:
            self.keep_early(data)
        # failing, closed: a lingering close drops what still arrives

    def readConnectionLost(self) -> None:
        state = self.state
        if state == "relay":
            self.relay.client_eof()
        elif state == "handshake":
            self.handshake_eof()
        elif state in self.PENDING_STATES:
            self._client_eof = True  # handed on once spliced
        else:
            self.transport.loseConnection()  # a lingering close is over

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:
        self.cancel_deadline()
        if self.state == "relay":
            self.relay.client_lost()
            return
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.cancel()
        self.lost_before_relay(reason)

    # For subclasses

    def handshake_data(self, data: bytes) -> None:
        """Bytes of the subclass's own handshake."""
        raise NotImplementedError

    def handshake_eof(self) -> None:
        """The peer ended its input during the handshake."""
        self.transport.loseConnection()

    def lost_before_relay(self, reason: Failure | None) -> None:
        """The connection is gone and was never spliced: record why (when
        nothing else did) and `finish`."""
        self.state = "closed"
        if self.outcome is None:
            self.outcome = "client-closed"
        self.finish(0, 0)

    def relay_created(self, relay: Relay) -> None:
        """`splice` made ``relay``: connect the other end's events to it, and
        answer the peer if the protocol says to (before early bytes flow)."""

    def report_outcome(self, bytes_up: int, bytes_down: int) -> None:
        """The one outcome event (log line, counters)."""
        raise NotImplementedError

    # The life

    def start_deadline(self, seconds: float, expired: Any) -> None:
        self.cancel_deadline()
        self._deadline = self.clock.callLater(seconds, self._deadline_fired, expired)

    def _deadline_fired(self, expired: Any) -> None:
        self._deadline = None
        expired()

    def cancel_deadline(self) -> None:
        cancel(self._deadline)
        self._deadline = None

    def wait_for(self, state: str, pending: Deferred) -> Deferred:
        """Enter ``state`` (one of `PENDING_STATES`) while ``pending`` (the
        auth, the connect, the tunnel opening) runs: the peer's bytes are
        kept (and it is paused once they come), and ``pending`` is
        cancelled if the peer leaves."""
        self.state = state
        self._pending = pending
        return pending

    def pending_done(self) -> None:
        """What `wait_for` waited on has fired."""
        self._pending = None

    def keep_early(self, data: bytes) -> None:
        """Keep bytes the peer sent before the splice, and pause it: more
        waits in its socket until the splice."""
        if not data:
            return
        if len(self._early) + len(data) > MAX_EARLY_DATA:
            self.early_overflow()
            return
        self._early += data
        if not self._paused:
            self._paused = True
            self.transport.pauseProducing()

    def early_overflow(self) -> None:
        self.outcome, self.detail = "early-data-overflow", "too much data before the tunnel opened"
        self.transport.abortConnection()

    def splice(self, other: Any) -> Relay:
        """Relay between this connection and ``other`` (an
        `IStreamTransport`, or a Twisted TCP transport) until both end."""
        self.cancel_deadline()
        self.state = "relay"
        relay = Relay(self.clock, as_stream(self.transport), as_stream(other), self.idle_timeout, self._relay_finished)
        self.relay = relay
        self.relay_created(relay)
        if self._early:
            early, self._early = self._early, b""
            relay.client_data(early)
        relay.start()
        if self._client_eof:
            relay.client_eof()
        elif self._paused:
            self._paused = False
            self.transport.resumeProducing()
        return relay

    def relay_finished(self, relay: Relay) -> None:
        """The relay has ended: record its outcome (subclasses may add to it)."""
        self.outcome = relay.outcome

    def _relay_finished(self, relay: Relay) -> None:
        self.state = "closed"
        self.relay_finished(relay)
        self.finish(relay.bytes_up, relay.bytes_down)

    def reply(self, data: bytes) -> None:
        """Answer the peer during the handshake (a SOCKS5 or HTTP reply):
        ``transport.write``, but on plain TCP with the fast path straight to
        the socket when nothing is queued (`mtop.relay.writer_for`), rather
        than on the loop's next turn after two ``epoll_ctl`` calls."""
        writer_for(as_stream(self.transport))(data)

    def close_after(self, data: bytes) -> None:
        """Send ``data`` (a last answer, may be empty) and close with a
        lingering close (see the module docstring)."""
        self.state = "failing"
        self.cancel_deadline()
        if data:
            self.transport.write(data)
        self.transport.loseWriteConnection()
        self.transport.resumeProducing()
        self._deadline = self.clock.callLater(LINGER_SECONDS, self.transport.abortConnection)

    def finish(self, bytes_up: int, bytes_down: int) -> None:
        """Report the outcome, once, whatever ended the connection."""
        if self._reported:
            return
        self._reported = True
        self.report_outcome(bytes_up, bytes_down)
