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

Abuse resistance (see `mtop.limits`, `mtop.acl`): the factory refuses a
connection before its TLS handshake when the client's address is banned
for failed logins or a connection limit is reached; failed logins are
answered no sooner than ``auth_failure_delay`` after the auth message
arrived (a wrong password, an unknown user or a legacy-hash row all take
that long); targets go through the dialer's destination ACL.  With a
``fallback`` web server, a client that is not an MTop client (another
ALPN, bytes that are not an auth message, a failed login) is spliced to
it with the bytes it sent, so the port looks like an ordinary HTTPS site.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from OpenSSL import SSL
from twisted.internet.defer import CancelledError, TimeoutError
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener
from twisted.internet.task import deferLater
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from mtop import wire
from mtop.auth import Authenticator
from mtop.clientlist import ClientLists
from mtop.dialer import DestinationRefused, Dialer
from mtop.interfaces import ISettingsConsumer
from mtop.limits import AuthThrottle, ConnectionLimits, LoginGate, client_key, peer_host
from mtop.logs import logger
from mtop.relay import Relay, no_delay
from mtop.stats import Counters
from mtop.tunnelend import TunnelEnd
from mtop.tls import FALLBACK_ALPN
from mtop.userstore import StoreUnavailable, UserRecord

#: Refusals by limits and bans are logged at most this often.
REFUSAL_WARNING_INTERVAL = 60.0
#: Outcomes of a connection its peer ended before an auth message: such a
#: connection may be a health check (`TunnelProtocol.is_check`).
CHECK_OUTCOMES = frozenset({"client-closed", "tls-error", "no-request", "truncated"})


@dataclass(frozen=True)
class TunnelSettings:
    """What the tunnel factory's connections take from ``server:``."""

    reply_errors: bool = False
    handshake_timeout: float = 10.0
    idle_timeout: float = 300.0
    #: A failed login is answered this long after its auth message, at the
    #: earliest, whatever made it fail.
    auth_failure_delay: float = 0.0
    #: ``(host, port)`` of the web server non-MTop clients are spliced to.
    fallback: tuple[str, int] | None = None
    #: Seconds open tunnels get to finish when the server stops
    #: (`mtop.drain`); 0: closed at once.
    drain_timeout: float = 30.0

    @classmethod
    def from_config(cls, server: Any) -> "TunnelSettings":
        """The settings of a ``server:`` section (`mtop.config.ServerConfig`)."""
        return cls(
            reply_errors=server.reply_errors,
            handshake_timeout=server.handshake_timeout,
            idle_timeout=server.idle_timeout,
            auth_failure_delay=server.auth_failure_delay,
            fallback=server.fallback,
            drain_timeout=server.drain_timeout,
        )


class Timings:
    """Where the factory reports latencies (`mtop.metrics` observes them
    in histograms); by default nowhere."""

    def handshake(self, seconds: float) -> None:
        """From accepting the connection to a complete auth message."""

    def connect(self, seconds: float) -> None:
        """From dialling the target to its connection."""


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


@implementer(IHandshakeListener)
class TunnelProtocol(TunnelEnd):
    """One client connection (a TLS connection or a QUIC stream): the MTop
    handshake, auth, connect; the rest of its life is `TunnelEnd`'s."""

    _log = logger()

    PENDING_STATES = frozenset({"auth", "connecting", "fallback"})
    request: wire.AuthRequest | None = None
    #: ``(host, port)`` the tunnel goes to whatever the client names (its
    #: listener's ``destination``; set by `DestinationFactory`), or ``None``.
    destination: tuple[str, int] | None = None
    _admitted = False
    _login_slot = False
    _fallback_reason: str | None = None
    _dialled = 0.0
    #: The target connection between its connect and the splice.
    _target: TargetProtocol | None = None
    #: The QUIC connection this tunnel is a stream of (told when the
    #: tunnel's auth message arrives, when it logs in, when it ends).
    parent: Any = None
    #: The TLS handshake is done (`handshakeCompleted`).
    tls_ready = False

    def __init__(self, factory: "TunnelFactory", client_key: str = ""):
        self.factory = factory
        self.clock = factory.clock
        self.client_key = client_key
        #: The auth message so far.
        self._buffer = b""
        self.started = 0.0
        self._auth_started = 0.0

    # Connection lifecycle

    def connectionMade(self) -> None:
        no_delay(self.transport)
        self.started = self.clock.seconds()
        self.peer = wire.format_address(self.transport.getPeer())
        self.factory.tunnels.add(self)
        self.factory.limits.opened(self, pre_login=self.parent is None)
        self.start_deadline(self.factory.settings.handshake_timeout, self._handshake_expired)

    @property
    def idle_timeout(self) -> float:  # type: ignore[override]
        return self.factory.settings.idle_timeout

    def handshakeCompleted(self) -> None:
        """`IHandshakeListener`: the TLS handshake is done.  A client that
        negotiated another application protocol (the fallback's) goes to
        the fallback at once."""
        self.tls_ready = True
        tls = self.transport.tls
        if self.state == "handshake" and tls is not None and tls.get_app_data() == FALLBACK_ALPN:
            protocol = tls.get_alpn_proto_negotiated() or b""
            self._to_fallback(f"ALPN {protocol.decode('ascii', 'replace')}", b"")

    def handshake_eof(self) -> None:
        self._fail("truncated" if self._buffer else "no-request", None)

    def lost_before_relay(self, reason: Failure | None) -> None:
        if self.state == "closed":
            return
        if self.outcome is None and reason is not None and reason.check(SSL.Error):
            self.outcome, self.detail = "tls-error", reason.getErrorMessage()
        super().lost_before_relay(reason)

    def early_overflow(self) -> None:
        self._fail("early-data-overflow", None)

    # Handshake

    def handshake_data(self, data: bytes) -> None:
        if self.clock.seconds() - self.started >= self.factory.settings.handshake_timeout:
            # Past the deadline (a busy reactor has not run the timer yet):
            # a late auth message is not looked at.
            self.cancel_deadline()
            self._handshake_expired()
            return
        buf = self._buffer + data if self._buffer else data
        try:
            parsed = wire.parse_auth(buf)
        except wire.WireError as e:
            self._buffer = b""
            if self._fallback_allowed():
                self._to_fallback(f"bad request: {e}", buf)
            else:
                self._fail("bad-request", e.status, str(e))
            return
        if parsed is None:
            self._buffer = buf
            return
        self.cancel_deadline()
        self.factory.timings.handshake(self.clock.seconds() - self.started)
        self.request = parsed.request
        self._auth_bytes = buf[: parsed.consumed]
        self._buffer = b""
        self._auth_started = self.clock.seconds()
        # At most a few logins per address are in flight; the others wait
        # here, and are refused without a lookup once the address is banned.
        # Nothing more is read from the client until the target is there.
        self.wait_for("auth", self.factory.login_gate.turn(self.client_key))
        self.keep_early(buf[parsed.consumed :])
        if self.parent is not None:
            self.parent.tunnel_request(self)
        self._pending.addCallbacks(self._login_turn, lambda f: None)

    def _login_turn(self, _: None) -> None:
        self.pending_done()
        self._login_slot = True
        if self.state != "auth":
            self._release_login_slot()
            return
        if self.factory.throttle.banned(self.client_key):
            # Banned while this connection was in its handshake or waited
            # its turn: the store is not asked.
            self._release_login_slot()
            self.factory.counters.inc("refused.banned")
            self._fail("throttled", None)
            return
        login = self.factory.authenticator.login(self.request.username, self.request.password, self.client_key)
        self.wait_for("auth", login).addCallbacks(self._auth_result, self._auth_error)

    def _release_login_slot(self) -> None:
        if self._login_slot:
            self._login_slot = False
            self.factory.login_gate.done(self.client_key)

    def _handshake_expired(self) -> None:
        self.outcome = "handshake-timeout"
        self.transport.abortConnection()

    def evict(self) -> None:
        """`mtop.limits.Holder`: the pre-login pool is full and this slot
        goes to a client from an address holding fewer."""
        if self.state == "closed":
            return
        self.cancel_deadline()
        self.outcome = "evicted"
        self.transport.abortConnection()

    def shutdown(self) -> None:
        """The server stops: end this connection now (its outcome is
        ``shutdown`` unless it was already failing for a reason of its own)."""
        if self.state == "relay":
            self.relay.close("shutdown", abort=True)
        elif self.state == "failing":
            self.transport.abortConnection()
        elif self.state != "closed":
            self.cancel_deadline()
            self.outcome = "shutdown"
            self.transport.abortConnection()

    # Auth and connect

    def _handshake_over(self) -> None:
        self.factory.limits.logged_in(self)

    def _auth_result(self, record: UserRecord | None) -> None:
        self.pending_done()
        if self.state != "auth":
            self._release_login_slot()
            return
        if record is None:
            # Counted (and maybe banned) before the next login from this
            # address may start.
            self._auth_failed()
            self._release_login_slot()
            return
        self._release_login_slot()
        self._handshake_over()
        if self.parent is not None:
            self.parent.tunnel_logged_in(self)
        self.factory.counters.inc("auth.ok")
        sessions = self.factory.sessions
        if sessions is not None:
            refusal = sessions.admit(self, self.request.username, record)
            if refusal is not None:
                self._fail("user-limit", wire.STATUS_AUTH_FAILURE, refusal)
                return
            self._admitted = True
        self._dialled = self.clock.seconds()
        if self.destination is not None:
            # The operator's destination: not subject to the destination ACL
            # (which judges what clients name), like the fallback.
            dialling = self.factory.dialer.connect_unchecked(*self.destination, _TargetFactory(self))
        else:
            dialling = self.factory.dialer.connect(self.request.host, self.request.port, _TargetFactory(self))
        self.wait_for("connecting", dialling).addErrback(self._connect_error)

    def _auth_failed(self) -> None:
        """A wrong password or unknown user: count it against the address,
        then answer no sooner than ``auth_failure_delay`` after the auth
        message arrived."""
        factory = self.factory
        factory.counters.inc("auth.failed")
        if factory.throttle.failed(self.client_key):
            self._log.warn(
                "client {client} banned for {ban:g}s after {count} failed logins",
                client=self.client_key,
                ban=factory.throttle.settings.ban,
                count=factory.throttle.settings.max_failures,
            )
        wait = self._auth_started + factory.settings.auth_failure_delay - self.clock.seconds()
        if wait > 0:
            self.wait_for("auth", deferLater(self.clock, wait, lambda: None))
            self._pending.addCallbacks(lambda _: self._answer_auth_failure(), lambda f: None)
        else:
            self._answer_auth_failure()

    def _answer_auth_failure(self) -> None:
        self.pending_done()
        if self.state != "auth":
            return
        if self._fallback_allowed():
            # The same bytes but the password: the web server answers them
            # the same, and its logs must not keep a (mistyped) password.
            self._to_fallback("auth failed", wire.without_password(self._auth_bytes), user=True)
        else:
            self._fail("auth-failed", wire.STATUS_AUTH_FAILURE)

    def _auth_error(self, failure: Failure) -> None:
        self.pending_done()
        self._release_login_slot()
        if failure.check(CancelledError) or self.state != "auth":
            return
        self._handshake_over()
        self.factory.counters.inc("auth.unavailable")
        self.factory.counters.inc("db.errors")
        if failure.check(StoreUnavailable):
            self._log.error("user store unavailable: {error}", error=failure.getErrorMessage())
        else:
            self._log.failure("authentication failed unexpectedly", failure)
        self._fail("auth-unavailable", wire.STATUS_AUTH_FAILURE)

    def _connect_error(self, failure: Failure) -> None:
        self.pending_done()
        if self.state != "connecting":
            return  # the client left and the attempt was cancelled
        if failure.check(DestinationRefused):
            self.factory.counters.inc("refused.acl")
            self._fail("acl-denied", wire.STATUS_CONNECTION_FAILURE, failure.getErrorMessage())
            return
        if failure.check(TimeoutError, CancelledError):
            detail = "connect timed out"
        else:
            detail = failure.getErrorMessage()
        self._fail("connect-failed", wire.STATUS_CONNECTION_FAILURE, detail)

    # Fallback: not an MTop client, or a failed login, with a fallback web
    # server configured.

    def not_websocket(self, reason: str, request: bytes, refusal: bytes) -> None:
        """`mtop.websocket`: ``request`` (all this client sent) is not its
        listener's WebSocket upgrade: to the fallback web server when one
        is configured, else answered ``refusal`` (a plain 404)."""
        if self.factory.settings.fallback is not None:
            self._to_fallback(reason, request)
        else:
            self.outcome, self.detail = "bad-request", reason
            self.close_after(refusal)

    def _fallback_allowed(self) -> bool:
        """A fallback is configured and this is a TLS connection (a QUIC
        stream cannot look like a web site)."""
        return self.factory.settings.fallback is not None and self.transport.kind == "tls"

    def _to_fallback(self, reason: str, data: bytes, user: bool = False) -> None:
        """Splice this client to the fallback server, ``data`` (what it has
        sent so far) first."""
        self.cancel_deadline()
        self._handshake_over()
        if not user:
            self.request = None
        self.factory.counters.inc("fallback")
        self._fallback_reason = reason
        self._early = data + self._early
        host, port = self.factory.settings.fallback
        dialling = self.factory.dialer.connect_unchecked(host, port, _TargetFactory(self))
        self.wait_for("fallback", dialling).addErrback(self._fallback_error)

    def _fallback_error(self, failure: Failure) -> None:
        self.pending_done()
        if self.state != "fallback":
            return
        self.factory.counters.inc("fallback.failed")
        self._log.error("fallback server unreachable: {error}", error=failure.getErrorMessage())
        self._fail("fallback-failed", None, f"{self._fallback_reason}; {failure.getErrorMessage()}")

    def target_connected(self, target: TargetProtocol) -> None:
        """The target accepted: reply, hand over early data, start relaying."""
        self.pending_done()
        if self.state not in ("connecting", "fallback"):
            target.transport.abortConnection()
            return
        if self.state == "connecting":
            self.factory.timings.connect(self.clock.seconds() - self._dialled)
        self._target = target
        self.splice(target.transport)

    def relay_created(self, relay: Relay) -> None:
        target, self._target = self._target, None
        target.relay = relay
        if self._admitted:
            self.factory.sessions.relay_started(self, self.request.username)
        if self._fallback_reason is None:
            self.transport.write(wire.REPLY_SUCCESS)

    def revoke(self, outcome: str, detail: str) -> None:
        """Close now: the user may no longer tunnel (called by
        `mtop.sessions.UserSessions`)."""
        if self.state == "relay":
            self.detail = detail
            self.relay.close(outcome, abort=True)
        elif self.state in ("auth", "connecting"):
            self._fail(outcome, None, detail)

    def relay_finished(self, relay: Relay) -> None:
        if self._fallback_reason is not None:
            self.outcome = "fallback"
            self.detail = f"{self._fallback_reason}; {relay.outcome}"
        else:
            self.outcome = relay.outcome

    # Failure and the outcome event

    def _fail(self, outcome: str, status: int | None, detail: str | None = None) -> None:
        self.outcome = outcome
        self.detail = detail
        if self.state == "closed":
            return
        if status is not None and self.factory.settings.reply_errors:
            self.close_after(wire.encode_reply(status))
        else:
            self.state = "failing"
            self.cancel_deadline()
            self.transport.loseConnection()

    def is_check(self) -> bool:
        """Whether this connection was a load balancer's health check, not
        a client's tunnel: closed by the peer without an auth message, after
        a PROXY v2 ``LOCAL`` header or without one byte (a TCP check).  A
        client that connects and says nothing until the deadline is not
        one (``handshake-timeout``)."""
        if self.request is not None or self.parent is not None or self.outcome not in CHECK_OUTCOMES:
            return False
        tcp = getattr(self.transport, "tcp", None)
        return getattr(tcp, "proxy_local", False) is True or getattr(self.transport, "received", True) is False

    def report_outcome(self, bytes_up: int, bytes_down: int) -> None:
        factory = self.factory
        factory.tunnels.discard(self)
        counters = factory.counters
        check = self.is_check()
        if check:
            # Counted apart, and logged at debug level only: a check a second
            # would otherwise be 86,400 tunnel lines a day.
            counters.inc("checks")
            self.detail = f"{self.outcome}: {self.detail}" if self.detail else self.outcome
            self.outcome = "check"
        else:
            counters.inc(f"tunnels.{self.outcome}")
        counters.inc("bytes.up", bytes_up)
        counters.inc("bytes.down", bytes_down)
        if factory.user_bytes is not None and self.request is not None and (bytes_up or bytes_down):
            totals = factory.user_bytes.setdefault(self.request.username, [0, 0])
            totals[0] += bytes_up
            totals[1] += bytes_down
        self._release_login_slot()
        factory.limits.closed(self)
        if self.parent is not None:
            self.parent.tunnel_ended(self)
        if self._admitted:
            self._admitted = False
            self.factory.sessions.release(self, self.request.username)
        request = self.request
        (self._log.debug if check else self._log.info)(
            "tunnel {outcome}: client={client} user={user} target={target}{destination_text} "
            "up={bytes_up} down={bytes_down} duration={duration:.3f}s{detail_text}",
            outcome=self.outcome,
            client=self.peer,
            user=request.username if request else None,
            target=request.target if request else None,
            destination_text=f" destination={wire.format_hostport(*self.destination)}" if self.destination else "",
            bytes_up=bytes_up,
            bytes_down=bytes_down,
            duration=self.clock.seconds() - self.started,
            detail=self.detail,
            detail_text=f" ({self.detail})" if self.detail else "",
            tunnel_event=True,
        )


class DestinationFactory:
    """The tunnel factory of a listener with a fixed ``destination``
    (``host, port``): `TunnelFactory`'s tunnels (the same limits, users and
    policy), each sent there whatever target the client names; the named
    target is still logged."""

    def __init__(self, factory: "TunnelFactory", destination: tuple[str, int]):
        self.factory = factory
        self.destination = destination

    def __getattr__(self, name: str) -> Any:
        return getattr(self.factory, name)

    def buildProtocol(self, addr: Any) -> TunnelProtocol | None:
        return self._fixed(self.factory.buildProtocol(addr))

    def build_stream_protocol(self, addr: Any, parent: Any) -> TunnelProtocol | None:
        return self._fixed(self.factory.build_stream_protocol(addr, parent))

    def _fixed(self, protocol: TunnelProtocol | None) -> TunnelProtocol | None:
        if protocol is not None:
            protocol.destination = self.destination
        return protocol


@implementer(ISettingsConsumer)
class TunnelFactory(Factory):
    """Builds `TunnelProtocol`s; holds what they share.  Takes its
    settings, and those of its limits, throttle and login gate, from the
    configuration (`ISettingsConsumer`)."""

    _log = logger()
    noisy = False

    def __init__(
        self,
        authenticator: Authenticator,
        dialer: Dialer,
        clock: Any,
        settings: TunnelSettings = TunnelSettings(),
        sessions: Any = None,
        limits: ConnectionLimits | None = None,
        throttle: AuthThrottle | None = None,
        counters: Counters | None = None,
    ):
        self.authenticator = authenticator
        self.dialer = dialer
        self.clock = clock
        self.settings = settings
        self.sessions = sessions
        self.counters = counters if counters is not None else Counters()
        self.limits = limits if limits is not None else ConnectionLimits(counters=self.counters)
        self.throttle = throttle if throttle is not None else AuthThrottle(clock, counters=self.counters)
        self.login_gate = LoginGate(self.throttle.settings.max_in_flight)
        #: Client addresses allowed and refused (``clients:``), judged
        #: first; replaced whole by a reload or a changed list file.
        self.client_lists = ClientLists()
        self.tunnels: set[TunnelProtocol] = set()
        self.timings = Timings()
        #: Bytes (up, down) of finished tunnels per user, when metrics
        #: count per user (``metrics.per_user``); else ``None``.
        self.user_bytes: dict[str, list[int]] | None = None
        self._refused: dict[str, int] = {}
        self._refusal_warned = float("-inf")

    def apply_settings(self, settings: Any) -> None:
        """`ISettingsConsumer`: new connections get ``settings``'s tunnel
        settings, limits, login throttle and client lists."""
        self.settings = settings.tunnel
        self.limits.settings = settings.limits
        self.throttle.settings = settings.throttle
        self.login_gate.limit = settings.throttle.max_in_flight
        self.client_lists = settings.client_lists

    def buildProtocol(self, addr: Any) -> TunnelProtocol | None:
        """A protocol for a new connection (TLS or QUIC stream) from
        ``addr``, or ``None`` to close it at once: a banned address or a
        limit reached costs no TLS handshake and no database query."""
        key = client_key(peer_host(addr))
        if self.admission_refusal(addr, key) is not None:
            return None
        return TunnelProtocol(self, key)

    def build_stream_protocol(self, addr: Any, parent: Any) -> TunnelProtocol | None:
        """A protocol for a new stream of the QUIC connection ``parent``
        (from ``addr``), or ``None`` to refuse it.  The connection holds a
        pre-login slot until its first login, so its streams take none:
        a client opening hundreds of tunnels at once on one connection (the
        original's does) is held to the tunnel limits, not the handshake
        ones."""
        key = client_key(peer_host(addr))
        if self.admission_refusal(addr, key, pre_login=False) is not None:
            return None
        protocol = TunnelProtocol(self, key)
        protocol.parent = parent
        return protocol

    def admission_refusal(self, addr: Any, key: str | None = None, pre_login: bool = True) -> str | None:
        """Why a new connection from ``addr`` is refused now (counted and
        logged at debug level), or ``None``; ``pre_login``: whether it
        would take a pre-login slot (`ConnectionLimits.refusal`)."""
        host = peer_host(addr)
        if key is None:
            key = client_key(host)
        if self.client_lists.refused(host):
            refusal = "client-denied"
        elif self.throttle.banned(key):
            refusal = "banned"
        else:
            refusal = self.limits.refusal(key, pre_login)
            if refusal is None:
                return None
        self.counters.inc(f"refused.{refusal}")
        self._log.debug("connection from {client} refused: {why}", client=key, why=refusal)
        self._note_refusal(refusal)
        return refusal

    def close_idle(self) -> int:
        """Close the TLS connections that wait, handshaken, for an auth
        message of which no byte has come (a client's connection kept
        ready for its next tunnel): a drain begins.  How many."""
        idle = [
            tunnel
            for tunnel in self.tunnels
            if tunnel.state == "handshake" and tunnel.tls_ready and not tunnel._buffer and tunnel.parent is None
        ]
        for tunnel in idle:
            tunnel.shutdown()
        return len(idle)

    def close_all(self) -> None:
        """End every connection now (the server stops); each logs its
        outcome as it goes."""
        for tunnel in list(self.tunnels):
            tunnel.shutdown()

    def _note_refusal(self, refusal: str) -> None:
        """A warning for the first refusal, then at most one a minute with
        what was refused since: visible under attack, never a flood."""
        self._refused[refusal] = self._refused.get(refusal, 0) + 1
        now = self.clock.seconds()
        if now - self._refusal_warned >= REFUSAL_WARNING_INTERVAL:
            counts = ", ".join(f"{count} {why}" for why, count in sorted(self._refused.items()))
            self._log.warn("connections refused before their handshake: {counts}", counts=counts)
            self._refused.clear()
            self._refusal_warned = now
