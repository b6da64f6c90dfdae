"""What the SOCKS5, HTTP and port-forward front ends share.

`LocalConnection` is one application connection accepted on loopback.  A
subclass reads its own handshake (SOCKS5 greeting, HTTP request head, or
nothing for a port forward), then calls `open_tunnel`; from then on:

* the application is paused while the tunnel opens; bytes it already sent
  are kept and go through once the tunnel is open, and an EOF is passed on;
* `tunnel_ready` (the subclass answers its client) then `splice` hands both
  connections to the shared `mtop.relay.Relay`: flow control, half-close and
  the idle timeout are the server's own code;
* `tunnel_failed` answers with the subclass's error reply;
* if the application leaves while the tunnel opens, the attempt is
  cancelled.

Every connection that asked for a tunnel ends with one outcome log event.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from climber.tunnel import Tunnel, TunnelError, TunnelOpener
from mtop import wire
from mtop.logs import logger
from mtop.relay import LINGER_SECONDS, Relay, no_delay

#: Bytes kept from an application while its tunnel opens.  It is paused, so
#: this is what one read can bring; the cap is a safety net.
MAX_EARLY_DATA = 1 << 20


@dataclass
class Climber:
    """What all front ends share: the tunnel opener, the clock, settings and
    the open connections (so shutdown can close them)."""

    opener: TunnelOpener
    clock: Any
    idle_timeout: float = 300.0
    handshake_timeout: float = 30.0
    connections: set = field(default_factory=set)
    #: Finished connections by (front end, server or "", outcome), and
    #: bytes (up, down) by server: what climber's metrics report.
    outcomes: Counter = field(default_factory=Counter)
    traffic: dict = field(default_factory=dict)

    def close_all(self) -> None:
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.abortConnection()


@implementer(IHalfCloseableProtocol)
class LocalConnection(Protocol):
    """One application connection that becomes (at most) one tunnel."""

    _log = logger()
    kind = "local"
    #: Seconds to finish the front end's handshake; None for no deadline.
    needs_handshake = True

    def __init__(self, climber: Climber, timeout: float):
        self.climber = climber
        self.timeout = timeout
        self.state = "handshake"
        self.target: str | None = None
        self.server: str | None = None
        self.relay: Relay | None = None
        self.outcome: str | None = None
        self.detail: str | None = None
        self._early = b""
        self._client_eof = False
        self._opening: Any = None
        self._deadline: Any = None
        self._logged = False

    # IProtocol

    def connectionMade(self) -> None:
        no_delay(self.transport)
        self.climber.connections.add(self)
        self.started = self.climber.clock.seconds()
        self.peer = wire.format_address(self.transport.getPeer())
        if self.needs_handshake:
            self._deadline = self.climber.clock.callLater(self.climber.handshake_timeout, self._handshake_expired)

    def dataReceived(self, data: bytes) -> None:
        if self.state == "relay":
            self.relay.client_data(data)
        elif self.state == "opening":
            self._keep_early(data)
        elif self.state == "handshake":
            self.handshake_data(data)

    def readConnectionLost(self) -> None:
        if self.state == "relay":
            self.relay.client_eof()
        elif self.state == "opening":
            self._client_eof = True
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:
        self.climber.connections.discard(self)
        self._cancel_deadline()
        if self.state == "relay":
            self.relay.client_lost()
            return
        if self._opening is not None:
            opening, self._opening = self._opening, None
            opening.cancel()
            self.outcome = self.outcome or "client-closed"
        self.state = "closed"
        if self.target is not None:
            self._log_outcome(0, 0)

    # For subclasses

    def handshake_data(self, data: bytes) -> None:
        """Bytes of the front end's own handshake."""
        raise NotImplementedError

    def tunnel_ready(self, tunnel: Tunnel) -> None:
        """Answer the application, then call `splice`."""
        self.splice(tunnel)

    def tunnel_failed(self, error: TunnelError) -> None:
        """Answer the application with an error and close."""
        self.transport.loseConnection()

    def open_tunnel(self, host: str, port: int, early: bytes = b"") -> None:
        """Pause the application and open a tunnel to ``host:port``;
        ``early`` is what it sent after its request."""
        self._cancel_deadline()
        self.state = "opening"
        self.target = wire.format_hostport(host, port)
        self.transport.pauseProducing()
        self._keep_early(early)
        self._opening = self.climber.opener.open(host, port, self.timeout)
        self._opening.addCallbacks(self._opened, self._open_failed)

    def splice(self, tunnel: Tunnel) -> None:
        """Relay between the application and ``tunnel`` until both end."""
        self.state = "relay"
        relay = Relay(self.climber.clock, self.transport, tunnel.transport, self.climber.idle_timeout, self._relay_finished)
        self.relay = relay
        tunnel.attach(relay.target_data, relay.target_eof, relay.target_lost)
        if self._early:
            early, self._early = self._early, b""
            relay.client_data(early)
        relay.start()
        if self._client_eof:
            relay.client_eof()
        else:
            self.transport.resumeProducing()

    def close_after(self, data: bytes) -> None:
        """Send ``data`` (an error reply) and close.

        Closing with unread input makes the kernel send a reset, which can
        destroy the reply before the application reads it; so our side is
        shut, what still arrives is read and dropped, and the connection
        closes on the application's EOF or after `LINGER_SECONDS`."""
        self.state = "closed"
        self._cancel_deadline()
        if data:
            self.transport.write(data)
        self.transport.loseWriteConnection()
        self.transport.resumeProducing()
        self._deadline = self.climber.clock.callLater(LINGER_SECONDS, self.transport.abortConnection)

    # Internals

    def _keep_early(self, data: bytes) -> None:
        if not data:
            return
        if len(self._early) + len(data) > MAX_EARLY_DATA:
            self.outcome, self.detail = "client-error", "too much data before the tunnel opened"
            self.transport.abortConnection()
            return
        self._early += data

    def _opened(self, tunnel: Tunnel) -> None:
        self._opening = None
        self.server = tunnel.server.name
        if self.state != "opening":
            tunnel.transport.abortConnection()
            return
        self.tunnel_ready(tunnel)

    def _open_failed(self, failure: Failure) -> None:
        self._opening = None
        if self.state != "opening":
            return
        error = failure.value if failure.check(TunnelError) else TunnelError("unreachable", failure.getErrorMessage())
        self.outcome = f"failed-{error.kind}"
        self.detail = error.message
        self.tunnel_failed(error)

    def _relay_finished(self, relay: Relay) -> None:
        self.state = "closed"
        self.outcome = relay.outcome
        self._log_outcome(relay.bytes_up, relay.bytes_down)

    def _log_outcome(self, bytes_up: int, bytes_down: int) -> None:
        if self._logged:
            return
        self._logged = True
        climber = self.climber
        climber.outcomes[(self.kind, self.server or "", self.outcome or "closed")] += 1
        if self.server is not None and (bytes_up or bytes_down):
            totals = climber.traffic.setdefault(self.server, [0, 0])
            totals[0] += bytes_up
            totals[1] += bytes_down
        emit = self._log.warn if self.outcome and self.outcome.startswith("failed") else self._log.info
        emit(
            "{kind} tunnel {outcome}: client={client} target={target} via={server} "
            "up={bytes_up} down={bytes_down} duration={duration:.3f}s{detail_text}",
            kind=self.kind,
            outcome=self.outcome or "closed",
            client=self.peer,
            target=self.target,
            server=self.server,
            bytes_up=bytes_up,
            bytes_down=bytes_down,
            duration=self.climber.clock.seconds() - self.started,
            detail=self.detail,
            detail_text=f" ({self.detail})" if self.detail else "",
            tunnel_event=True,
        )

    def _handshake_expired(self) -> None:
        self._deadline = None
        if self.state == "handshake":
            self.transport.abortConnection()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None


class LocalFactory(Factory):
    """Builds one front end's `LocalConnection`s."""

    noisy = False

    def __init__(self, protocol_class: type, climber: Climber, **settings: Any):
        self.protocol_class = protocol_class
        self.climber = climber
        self.settings = settings

    def buildProtocol(self, addr: Any) -> Protocol:
        protocol = self.protocol_class(self.climber, **self.settings)
        protocol.factory = self
        return protocol
