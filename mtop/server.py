"""The MTop server protocol: handshake state machine, then relay.

One `TunnelProtocol` per client connection (the TLS layer below it is
`mtop.tlstransport.TLSTransport`).  States:

``handshake``   reading the auth message, under the handshake deadline;
``auth``        the client is paused while the user is checked;
``connecting``  the client is paused while the target is dialled;
``relay``       bytes flow both ways through a `mtop.relay.Relay`;
``closed``.

With a `mtop.sessions.UserSessions` on the factory, a logged-in tunnel is
admitted by it (per-user limits), relays under the user's rate limit, is
counted for accounting and can be revoked by it (`TunnelProtocol.revoke`).

Whatever the client sent after the auth message is kept and written to the
target once it is connected.  Every connection ends with exactly one outcome
log event.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from OpenSSL import SSL
from twisted.internet.defer import CancelledError, TimeoutError
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from mtop import wire
from mtop.auth import Authenticator
from mtop.dialer import Dialer
from mtop.logs import logger
from mtop.relay import Relay, no_delay
from mtop.userstore import StoreUnavailable, UserRecord

#: Bytes accepted from the client between its auth message and our reply.
#: The client is paused during that time, so only what one read delivered
#: can arrive; this is a safety net, not a working limit.
MAX_EARLY_DATA = 1 << 20

#: How long a refused client may keep sending after our error reply.
LINGER_SECONDS = 2.0


@dataclass(frozen=True)
class ServerSettings:
    reply_errors: bool = False
    handshake_timeout: float = 10.0
    idle_timeout: float = 300.0


@implementer(IHalfCloseableProtocol)
class TargetProtocol(Protocol):
    """The connection to the target; its events go to the tunnel's relay."""

    def __init__(self, tunnel: "TunnelProtocol"):
        self.tunnel = tunnel
        self.relay: Relay | None = None

    def connectionMade(self) -> None:
        no_delay(self.transport)
        self.tunnel.target_connected(self)

    def dataReceived(self, data: bytes) -> None:
        self.relay.target_data(data)

    def readConnectionLost(self) -> None:
        self.relay.target_eof()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        if self.relay is not None:
            self.relay.target_lost()


class _TargetFactory(Factory):
    noisy = False

    def __init__(self, tunnel: "TunnelProtocol"):
        self.tunnel = tunnel

    def buildProtocol(self, addr: Any) -> TargetProtocol:
        return TargetProtocol(self.tunnel)


@implementer(IHalfCloseableProtocol)
class TunnelProtocol(Protocol):
    """One client connection: handshake, auth, connect, relay."""

    _log = logger()

    state = "handshake"
    request: wire.AuthRequest | None = None
    relay: Relay | None = None
    outcome: str | None = None
    detail: str | None = None
    _client_eof = False
    _admitted = False

    def __init__(self, factory: "TunnelFactory"):
        self.factory = factory
        self.clock = factory.clock
        self._buffer = b""
        self._deadline = None
        self._pending = None  # the Deferred of the auth or connect step
        self.started = 0.0

    # Connection lifecycle

    def connectionMade(self) -> None:
        no_delay(self.transport)
        self.started = self.clock.seconds()
        self.peer = wire.format_address(self.transport.getPeer())
        self.factory.tunnels.add(self)
        self._deadline = self.clock.callLater(self.factory.settings.handshake_timeout, self._handshake_expired)

    def dataReceived(self, data: bytes) -> None:
        state = self.state
        if state == "relay":
            self.relay.client_data(data)
        elif state == "handshake":
            self._handshake_data(data)
        elif state in ("auth", "connecting"):
            self._buffer += data
            if len(self._buffer) > MAX_EARLY_DATA:
                self._fail("early-data-overflow", None)

    def readConnectionLost(self) -> None:
        if self.state == "relay":
            self.relay.client_eof()
        elif self.state == "handshake":
            self._fail("truncated" if self._buffer else "no-request", None)
        elif self.state == "failing":
            self.transport.loseConnection()
        else:
            self._client_eof = True  # handed on once the target is connected

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:
        self._cancel_deadline()
        if self.state == "relay":
            self.relay.client_lost()
            return
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.cancel()
        if self.state != "closed":
            self.state = "closed"
            if self.outcome is None:
                if reason is not None and reason.check(SSL.Error):
                    self.outcome, self.detail = "tls-error", reason.getErrorMessage()
                else:
                    self.outcome = "client-closed"
            self._finish(0, 0)

    # Handshake

    def _handshake_data(self, data: bytes) -> None:
        buf = self._buffer + data if self._buffer else data
        try:
            parsed = wire.parse_auth(buf)
        except wire.WireError as e:
            self._buffer = b""
            self._fail("bad-request", e.status, str(e))
            return
        if parsed is None:
            self._buffer = buf
            return
        self._cancel_deadline()
        self.request = parsed.request
        self._buffer = buf[parsed.consumed :]
        # Nothing more is read from the client until the target is there.
        self.transport.pauseProducing()
        self.state = "auth"
        self._pending = self.factory.authenticator.login(self.request.username, self.request.password)
        self._pending.addCallbacks(self._auth_result, self._auth_error)

    def _handshake_expired(self) -> None:
        self._deadline = None
        self.outcome = "handshake-timeout"
        self.transport.abortConnection()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    # Auth and connect

    def _auth_result(self, record: UserRecord | None) -> None:
        self._pending = None
        if self.state != "auth":
            return
        if record is None:
            self._fail("auth-failed", wire.STATUS_AUTH_FAILURE)
            return
        sessions = self.factory.sessions
        if sessions is not None:
            refusal = sessions.admit(self, self.request.username, record)
            if refusal is not None:
                self._fail("user-limit", wire.STATUS_AUTH_FAILURE, refusal)
                return
            self._admitted = True
        self.state = "connecting"
        self._pending = self.factory.dialer.connect(self.request.host, self.request.port, _TargetFactory(self))
        self._pending.addErrback(self._connect_error)

    def _auth_error(self, failure: Failure) -> None:
        self._pending = None
        if failure.check(CancelledError) or self.state != "auth":
            return
        if failure.check(StoreUnavailable):
            self._log.error("user store unavailable: {error}", error=failure.getErrorMessage())
        else:
            self._log.failure("authentication failed unexpectedly", failure)
        self._fail("auth-unavailable", wire.STATUS_AUTH_FAILURE)

    def _connect_error(self, failure: Failure) -> None:
        self._pending = None
        if self.state != "connecting":
            return  # the client left and the attempt was cancelled
        if failure.check(TimeoutError, CancelledError):
            detail = "connect timed out"
        else:
            detail = failure.getErrorMessage()
        self._fail("connect-failed", wire.STATUS_CONNECTION_FAILURE, detail)

    def target_connected(self, target: TargetProtocol) -> None:
        """The target accepted: reply, hand over early data, start relaying."""
        self._pending = None
        if self.state != "connecting":
            target.transport.abortConnection()
            return
        self.state = "relay"
        relay = Relay(
            self.clock,
            self.transport,
            target.transport,
            self.factory.settings.idle_timeout,
            self._relay_finished,
        )
        self.relay = target.relay = relay
        if self._admitted:
            self.factory.sessions.relay_started(self, self.request.username)
        self.transport.write(wire.REPLY_SUCCESS)
        if self._buffer:
            relay.client_data(self._buffer)
            self._buffer = b""
        relay.start()
        if self._client_eof:
            relay.client_eof()
        else:
            self.transport.resumeProducing()

    def revoke(self, outcome: str, detail: str) -> None:
        """Close now: the user may no longer tunnel (called by
        `mtop.sessions.UserSessions`)."""
        if self.state == "relay":
            self.detail = detail
            self.relay.close(outcome, abort=True)
        elif self.state in ("auth", "connecting"):
            self._fail(outcome, None, detail)

    def _relay_finished(self, relay: Relay) -> None:
        self.state = "closed"
        self.outcome = relay.outcome
        self._finish(relay.bytes_up, relay.bytes_down)

    # Failure and the outcome event

    def _fail(self, outcome: str, status: int | None, detail: str | None = None) -> None:
        self.outcome = outcome
        self.detail = detail
        if self.state == "closed":
            return
        self.state = "failing"
        self._cancel_deadline()
        if status is not None and self.factory.settings.reply_errors:
            # Closing with unread input makes the kernel send RST, which can
            # destroy the reply before the client reads it: shut our side,
            # drain what the client still sends, close on its EOF or soon.
            self.transport.write(wire.encode_reply(status))
            self.transport.loseWriteConnection()
            self._deadline = self.clock.callLater(LINGER_SECONDS, self.transport.abortConnection)
        else:
            self.transport.loseConnection()

    def _finish(self, bytes_up: int, bytes_down: int) -> None:
        self.factory.tunnels.discard(self)
        if self._admitted:
            self._admitted = False
            self.factory.sessions.release(self, self.request.username)
        request = self.request
        self._log.info(
            "tunnel {outcome}: client={client} user={user} target={target} "
            "up={bytes_up} down={bytes_down} duration={duration:.3f}s{detail_text}",
            outcome=self.outcome,
            client=self.peer,
            user=request.username if request else None,
            target=request.target if request else None,
            bytes_up=bytes_up,
            bytes_down=bytes_down,
            duration=self.clock.seconds() - self.started,
            detail=self.detail,
            detail_text=f" ({self.detail})" if self.detail else "",
            tunnel_event=True,
        )


class TunnelFactory(Factory):
    """Builds `TunnelProtocol`s; holds what they share."""

    noisy = False

    def __init__(
        self,
        authenticator: Authenticator,
        dialer: Dialer,
        clock: Any,
        settings: ServerSettings = ServerSettings(),
        sessions: Any = None,
    ):
        self.authenticator = authenticator
        self.dialer = dialer
        self.clock = clock
        self.settings = settings
        self.sessions = sessions
        self.tunnels: set[TunnelProtocol] = set()

    def buildProtocol(self, addr: Any) -> TunnelProtocol:
        return TunnelProtocol(self)
