"""What the SOCKS5, HTTP and port-forward front ends share.

`LocalConnection` is one application connection accepted on loopback.  A
subclass reads its own handshake (SOCKS5 greeting, HTTP request head, or
nothing for a port forward), then calls `open_tunnel`; from then on:

* the application is paused while the tunnel opens; bytes it already sent
  are kept and go through once the tunnel is open, and an EOF is passed on;
* `tunnel_ready` (the subclass answers its client) then `splice_tunnel` hands both
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

from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure

from climber.tunnel import ServerTunnel, TunnelError, TunnelOpener
from mtop import wire
from mtop.logs import logger
from mtop.relay import Relay, no_delay
from mtop.tunnelend import TunnelEnd


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


class LocalConnection(TunnelEnd):
    """One application connection that becomes (at most) one tunnel: the
    front end's handshake, then the tunnel opening; the rest of its life is
    `mtop.tunnelend.TunnelEnd`'s."""

    _log = logger()
    kind = "local"
    #: Seconds to finish the front end's handshake; None for no deadline.
    needs_handshake = True
    PENDING_STATES = frozenset({"opening"})

    def __init__(self, climber: Climber, timeout: float):
        self.climber = climber
        self.clock = climber.clock
        self.idle_timeout = climber.idle_timeout
        self.timeout = timeout
        self.target: str | None = None
        self.server: str | None = None
        self._tunnel: ServerTunnel | None = None

    # IProtocol

    def connectionMade(self) -> None:
        no_delay(self.transport)
        self.climber.connections.add(self)
        self.started = self.clock.seconds()
        self.peer = wire.format_address(self.transport.getPeer())
        if self.needs_handshake:
            self.start_deadline(self.climber.handshake_timeout, self._handshake_expired)

    def connectionLost(self, reason: Failure = None) -> None:
        self.climber.connections.discard(self)
        if self.state == "opening" and self.outcome is None:
            self.outcome = "client-closed"
        super().connectionLost(reason)

    # For subclasses

    def tunnel_ready(self, tunnel: ServerTunnel) -> None:
        """Answer the application, then call `splice_tunnel`."""
        self.splice_tunnel(tunnel)

    def tunnel_failed(self, error: TunnelError) -> None:
        """Answer the application with an error and close."""
        self.transport.loseConnection()

    def open_tunnel(self, host: str, port: int, early: bytes = b"") -> None:
        """Pause the application and open a tunnel to ``host:port``;
        ``early`` is what it sent after its request."""
        self.cancel_deadline()
        self.target = wire.format_hostport(host, port)
        opening = self.wait_for("opening", self.climber.opener.open(host, port, self.timeout))
        self.keep_early(early)
        opening.addCallbacks(self._opened, self._open_failed)

    def splice_tunnel(self, tunnel: ServerTunnel) -> None:
        """Relay between the application and ``tunnel`` until both end."""
        self._tunnel = tunnel
        self.splice(tunnel.transport)

    def relay_created(self, relay: Relay) -> None:
        tunnel, self._tunnel = self._tunnel, None
        tunnel.attach(relay.target_data, relay.target_eof, relay.target_lost)

    # Internals

    def early_overflow(self) -> None:
        self.outcome, self.detail = "client-error", "too much data before the tunnel opened"
        self.transport.abortConnection()

    def _opened(self, tunnel: ServerTunnel) -> None:
        self.pending_done()
        self.server = tunnel.server.name
        if self.state != "opening":
            tunnel.transport.abortConnection()
            return
        self.tunnel_ready(tunnel)

    def _open_failed(self, failure: Failure) -> None:
        self.pending_done()
        if self.state != "opening":
            return
        error = failure.value if failure.check(TunnelError) else TunnelError("unreachable", failure.getErrorMessage())
        self.outcome = f"failed-{error.kind}"
        self.detail = error.message
        self.tunnel_failed(error)

    def lost_before_relay(self, reason: Failure | None) -> None:
        self.state = "closed"
        if self.target is not None:  # only connections that asked for a tunnel
            self.finish(0, 0)

    def report_outcome(self, bytes_up: int, bytes_down: int) -> None:
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
            duration=self.clock.seconds() - self.started,
            detail=self.detail,
            detail_text=f" ({self.detail})" if self.detail else "",
            tunnel_event=True,
        )

    def _handshake_expired(self) -> None:
        if self.state == "handshake":
            self.transport.abortConnection()


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
