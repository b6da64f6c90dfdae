"""Opening MTop tunnels: TLS to a server, the auth message, the reply.

`TunnelOpener.open` tries the pool's candidates in order until one server
answers ``01 00``; what the caller gets is a `ServerTunnel`, an open byte
stream to the target.  A server that cannot be reached, fails the TLS
handshake or does not answer within the timeout is reported to the pool
(marked down) and the next one is tried; one that closes after the
handshake without a reply (the original server's answer to a wrong login or
an unreachable target) is tried on the next server too; an explicit refusal
(``01 02``, ``01 03``) is final.

The opener is a coroutine (`TunnelOpener._open`, one `_attempt` per server)
run by `Deferred.fromCoroutine`; each attempt's timeout is
`Deferred.addTimeout`.  Cancelling what `open` returned cancels the wait
under way (the TCP connect, the QUIC stream's connection, or the reply, whose
connection is aborted) and reports nothing about the server.

Unless a server entry sets ``pipelining``, nothing but the auth message is
sent before the reply: the original server rejects clients that send early.
With ``pipelining`` the tunnel is handed over when the TLS handshake is
done and the reply is checked as it arrives.

TLS 1.3 session tickets arrive after the handshake, so the session is kept
for resumption once the reply has been read (by then the tickets are in).

A ``type: tls`` server's connector (`ServerConnector`) keeps a few
connections handshaken in advance (``prewarm``, `climber.prewarm`): a tunnel
that takes one sends its auth message at once.  To an address, it connects
with the reactor's ``connectTCP``, with no endpoint wrapper in the path of
every read (`connect_server`); optionally with TCP Fast Open.
"""

from __future__ import annotations

import socket
import time
from typing import Any, Callable

from OpenSSL import SSL
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectingCancelledError, DNSLookupError
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.python.reflect import safe_str
from zope.interface import directlyProvides, implementer, providedBy

from climber.config import ServerEntry
from climber.pool import ServerPool, ServerState
from climber.prewarm import Prewarmed, PrewarmPool
from mtop import wire
from mtop.wire import ip_literal
from mtop.connect import connect_address
from mtop.logs import logger
from mtop.relay import no_delay
from mtop.tls import client_context
from mtop.tlstransport import client_tls_factory, offer_key_share, session_reused


class TunnelError(Exception):
    """A tunnel could not be opened.

    ``kind`` says why, for the front ends' error replies:

    ``unreachable``  no server could be reached (connect or TLS failed);
    ``timeout``      no server answered in time;
    ``refused``      a server closed without a reply (the original server's
                     way of refusing a login or an unreachable target);
    ``auth``         a server replied "authentication failure";
    ``target``       a server replied "cannot connect to the target";
    ``protocol``     a server replied something else.
    """

    def __init__(self, kind: str, reason: str, server: str | None = None):
        self.kind = kind
        self.reason = reason
        self.server = server
        self.message = f"server {server}: {reason}" if server else reason
        super().__init__(self.message)


#: Errors before the reply that say nothing bad about the server.
_FINAL_KINDS = ("auth", "target", "protocol")


@implementer(IHalfCloseableProtocol, IHandshakeListener)
class ServerTunnel(Protocol):
    """climber's end of one tunnel through an MTop server: the protocol of
    one TLS connection or QUIC stream to the server, from the auth message
    on (`IHalfCloseableProtocol`, `IHandshakeListener`).

    ``opened`` fires with it once the server has answered ``01 00`` (with
    ``pipelining``, once the TLS handshake is done), or fails with
    `TunnelError`; cancelling it aborts the connection.  Once open, the
    owner calls `attach` with callbacks for data, end of input and loss;
    ``transport`` is the transport to write to (it is also a push producer
    and a consumer, for flow control).
    """

    _log = logger()

    def __init__(self, server: ServerState, auth: bytes, pipelining: bool, started: float, save_session: Callable[[Any], None]):
        self.server = server
        self._auth = auth
        self._pipelining = pipelining
        self._started = started
        self._save_session = save_session
        self.opened: Deferred[ServerTunnel] = Deferred(self._abandon)
        self.handshake_time: float | None = None
        self._buffer = b""
        self._replied = False
        self._on_data: Callable[[bytes], None] | None = None
        self._on_eof: Callable[[], None] | None = None
        self._on_lost: Callable[[], None] | None = None
        self._eof = False
        self._lost = False
        self.error: TunnelError | None = None
        self.resumed = False
        #: Whether it may take a prewarmed connection (not on the retry of
        #: a tunnel whose prewarmed connection failed), and whether it did.
        self.may_prewarm = True
        self.prewarmed = False

    # Owner side

    def attach(self, on_data: Callable[[bytes], None], on_eof: Callable[[], None], on_lost: Callable[[], None]) -> None:
        """Start delivering events; bytes that came with the reply go first."""
        self._on_data, self._on_eof, self._on_lost = on_data, on_eof, on_lost
        if self._buffer and self._replied:
            data, self._buffer = self._buffer, b""
            on_data(data)
        if self._eof and not self._lost:
            on_eof()
        if self._lost:
            on_lost()

    # IProtocol

    def connectionMade(self) -> None:
        no_delay(self.transport)
        # The TLS transport holds this until the handshake is done.
        self.transport.write(self._auth)

    def handshakeCompleted(self) -> None:
        self.handshake_done(time.monotonic() - self._started)

    def handshake_done(self, seconds: float) -> None:
        """The TLS handshake is done; it took ``seconds`` from the start of
        the TCP connect.  Called by `handshakeCompleted`, or by the
        connector for a prewarmed connection, whose handshake was done
        before the tunnel took it (``seconds`` is that connection's own)."""
        self.handshake_time = seconds
        self.resumed = session_reused(self.transport.tls)
        if self._pipelining:
            self._fire()

    def dataReceived(self, data: bytes) -> None:
        if self._replied:
            if self._on_data is not None:
                self._on_data(data)
            else:
                self._buffer += data
            return
        self._buffer += data
        try:
            status = wire.parse_reply(self._buffer)
        except wire.BadReply as e:
            self._refuse(TunnelError("protocol", f"bad reply: {e}", self.server.name))
            return
        if status is None:
            return
        if status != wire.STATUS_SUCCESS:
            kind = {wire.STATUS_AUTH_FAILURE: "auth", wire.STATUS_CONNECTION_FAILURE: "target"}.get(status, "protocol")
            text = {
                "auth": "refused the login (wrong username or password)",
                "target": "could not connect to the target",
                "protocol": f"replied with status {status:#04x}",
            }[kind]
            self._refuse(TunnelError(kind, text, self.server.name))
            return
        self._replied = True
        self._buffer = self._buffer[wire.REPLY_LENGTH :]
        tls = self.transport.tls
        if tls is not None:
            self._save_session(tls)
        if not self._pipelining:
            self._fire()
        elif self._buffer and self._on_data is not None:
            data, self._buffer = self._buffer, b""
            self._on_data(data)

    def readConnectionLost(self) -> None:
        if not self._replied:
            self.transport.loseConnection()
            return
        self._eof = True
        if self._on_eof is not None:
            self._on_eof()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:
        self._lost = True
        if not self.opened.called:
            self.opened.errback(self._failure_for(reason))
        elif self._on_lost is not None:
            self._on_lost()

    def _failure_for(self, reason: Failure | None) -> Failure:
        if self.error is not None:
            return Failure(self.error)
        if self.handshake_time is None:
            detail = reason.getErrorMessage() if reason is not None else "connection lost"
            if reason is not None and reason.check(SSL.Error):
                detail = f"TLS handshake failed: {_ssl_reason(reason.value)}"
            return Failure(TunnelError("unreachable", detail, self.server.name))
        return Failure(TunnelError("refused", "closed the connection without a reply", self.server.name))

    def _refuse(self, error: TunnelError) -> None:
        self.error = error
        if self._pipelining and self.opened.called:
            self._log.warn("{error}", error=error.message)
        self.transport.loseConnection()

    def _fire(self) -> None:
        if not self.opened.called:
            self.opened.callback(self)

    def _abandon(self, opened: Deferred) -> None:
        """Canceller of ``opened``: the opener gave up (its timeout, or its
        caller left)."""
        # Fail it before aborting: a transport that loses the connection at
        # once would otherwise fail it with "refused" (in connectionLost),
        # and the opener would move on to the next server.
        opened.errback(CancelledError())
        if self.transport is not None:
            self.transport.abortConnection()


def _ssl_reason(error: Exception) -> str:
    try:
        return "; ".join(str(entry[2]) for entry in error.args[0]) or str(error)
    except (IndexError, TypeError):
        return str(error)


class _OneProtocol(Factory):
    noisy = False

    def __init__(self, protocol: Protocol):
        self.protocol_instance = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        return self.protocol_instance


#: Linux's ``TCP_FASTOPEN_CONNECT`` (4.11 and later), which Python 3.11's
#: socket module lacks.
TCP_FASTOPEN_CONNECT = getattr(socket, "TCP_FASTOPEN_CONNECT", 30)


class ServerConnector:
    """How tunnels reach one ``type: tls`` server: TLS settings, the
    resumable session, TCP Fast Open and the prewarmed connections."""

    _log = logger()

    def __init__(self, entry: ServerEntry, reactor: Any):
        self.entry = entry
        self.reactor = reactor
        self.context = client_context(entry.ca or None, entry.proto, entry.insecure)
        self.sessions: dict[str, Any] = {}
        #: The key exchange group the server chose last (``None``: not yet).
        self.group: str | None = None
        #: Until the kernel refuses it once (then warned about, and off).
        self.fast_open = entry.tcp_fast_open
        self.prewarm: PrewarmPool | None = None
        if entry.prewarm:
            self.prewarm = PrewarmPool(reactor, entry.prewarm, entry.prewarm_max_age, self._connect_prewarmed, entry.name)
        if entry.insecure:
            self._log.warn(
                "INSECURE: server {server} has insecure: true; its certificate is not verified and "
                "anyone on the path can read your traffic and password",
                server=entry.name,
            )

    def tls_factory(self, wrapped: Any, clock: Any = None) -> Any:
        # The session is saved by the tunnel after the reply, not at the end
        # of the handshake (TLS 1.3 tickets come later), so no cache here.
        factory = client_tls_factory(
            wrapped, self.context, self.entry.host, not self.entry.insecure, self.entry.sni, clock=clock
        )
        name = self.entry.sni or self.entry.host
        inner_connection_for = factory.connection_for

        def connection_for() -> SSL.Connection:
            connection = inner_connection_for()
            session = self.sessions.get(name)
            if session is not None:
                connection.set_session(session)
            offer_key_share(connection, self.group)
            return connection

        factory.connection_for = connection_for
        return factory

    def save_session(self, tls: SSL.Connection) -> None:
        """After a tunnel's reply (the session tickets are in by then): keep
        its session for the next tunnels to resume, and the group the
        server chose, for them to send a key share of that group alone
        (`mtop.tlstransport.offer_key_share`)."""
        try:
            session = tls.get_session()
            self.group = tls.get_group_name() or None
        except SSL.Error:  # nothing to keep: resumption is an optimisation
            return
        if session is not None:
            self.sessions[self.entry.sni or self.entry.host] = session

    def connect(self, reactor: Any, tunnel: ServerTunnel, timeout: float) -> Deferred:
        """Connect ``tunnel`` to the server: over a prewarmed connection if
        one is ready (at once), otherwise over a new TCP and TLS connection
        (``timeout``: the TCP connect's).  Either way, the prewarmed
        connections are topped up unless the server is marked down."""
        warm = self.prewarm.take() if self.prewarm is not None and tunnel.may_prewarm else None
        connecting = None if warm is not None else self._connect(reactor, tunnel, timeout)
        if self.prewarm is not None and not tunnel.server.down:
            self.prewarm.refill()
        if warm is None:
            return connecting
        _hand_over(warm, tunnel)
        return succeed(tunnel)

    def close(self) -> None:
        """Close the prewarmed connections (climber stops); the tunnels'
        own connections are their owners' to close."""
        if self.prewarm is not None:
            self.prewarm.close()

    def _connect(self, reactor: Any, protocol: Protocol, timeout: float) -> Deferred:
        factory = self.tls_factory(_OneProtocol(protocol), reactor)
        before_connect = self._set_fast_open if self.fast_open else None
        return connect_server(reactor, self.entry.host, self.entry.port, factory, timeout, before_connect)

    def _connect_prewarmed(self, protocol: Prewarmed) -> Deferred:
        # It cannot be used after max age anyway (the pool cancels it then).
        return self._connect(self.reactor, protocol, self.entry.prewarm_max_age)

    def _set_fast_open(self, connector: Any) -> None:
        """Set ``TCP_FASTOPEN_CONNECT`` on the socket of a TCP attempt that
        ``connectTCP`` just started (see `connect_server`).  If the kernel
        refuses (older than 4.11, or ``net.ipv4.tcp_fastopen`` without bit
        1), warn once and connect without it from then on."""
        try:
            # The attempt's TCP transport (``transport``, an attribute of
            # Twisted's connectors, not of IConnector) and its socket
            # (ISystemHandle.getHandle): no private name, but Twisted's
            # behaviour, checked by tests/test_tfo.py with getsockopt.
            handle = connector.transport.getHandle()
        except AttributeError:
            return  # no socket could be made: the attempt fails by itself
        try:
            handle.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_CONNECT, 1)
        except OSError as e:
            self.fast_open = False
            self._log.warn(
                "server {server}: tcp_fast_open is on but the kernel refused it ({error}); connecting "
                "without it.  It needs Linux 4.11 or later and sysctl net.ipv4.tcp_fastopen = 1 or 3",
                server=self.entry.name,
                error=e.strerror or str(e),
            )


def _hand_over(warm: Prewarmed, tunnel: ServerTunnel) -> None:
    """Give a prewarmed connection to ``tunnel``: the tunnel becomes the
    protocol of the connection's transport (`attach`: a TLS transport, or
    the WebSocket stream over one), writes its auth message (the handshake,
    and for ``wss`` the upgrade, are done: it goes at once) and hears that
    the handshake is done, with the time the connection's own took."""
    tunnel.prewarmed = True
    warm.transport.attach(tunnel)
    tunnel.handshake_done(warm.handshake_time)


class _BeforeConnect:
    """The reactor as a ``HostnameEndpoint`` sees it, except that each TCP
    attempt it starts goes through ``before_connect(connector)`` first."""

    def __init__(self, reactor: Any, before_connect: Callable[[Any], None]):
        self._reactor = reactor
        self._before_connect = before_connect
        directlyProvides(self, providedBy(reactor))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def connectTCP(self, host: str, port: int, factory: Any, timeout: float = 30, bindAddress: Any = None) -> Any:
        connector = self._reactor.connectTCP(host, port, factory, timeout, bindAddress)
        self._before_connect(connector)
        return connector


def connect_server(
    reactor: Any,
    host: str,
    port: int,
    factory: Any,
    timeout: float,
    before_connect: Callable[[Any], None] | None = None,
) -> Deferred:
    """Connect ``factory``'s protocol to a server over TCP; the Deferred
    fires once the TCP connection is made, or fails.  Cancelling it stops
    the attempt.

    An address is connected to by `mtop.connect.connect_address`: the
    tunnel's protocol is the connection's own, with no endpoint's
    ``_WrappingProtocol`` on each of its reads, and ``timeout`` is the
    connector's.  Only a name goes through ``HostnameEndpoint``
    (resolution in the reactor's thread pool, then Happy Eyeballs).

    ``before_connect(connector)`` is called for each TCP attempt once its
    socket exists and before it connects, to set socket options: Twisted's
    TCP client makes the socket in ``connectTCP`` and calls connect() on a
    later reactor turn."""
    if ip_literal(host) is not None:
        return connect_address(reactor, host, port, factory, timeout, before_connect)
    if before_connect is not None:
        reactor = _BeforeConnect(reactor, before_connect)
    return HostnameEndpoint(reactor, host, port, timeout=timeout).connect(factory)


class WebSocketConnector(ServerConnector):
    """How tunnels reach a ``type: wss`` server (through a CDN or reverse
    proxy, or straight to a ``wss`` listener): TLS with ALPN ``http/1.1``,
    then the WebSocket upgrade (``path``, the Host header), then MTop in
    binary messages (`mtop.websocket.WebSocketDial`).  Prewarmed
    connections are through TLS and the upgrade, and silent.  An upgrade answered with
    an HTTP status (a wrong path or Host; a CDN whose origin is down) fails
    the tunnel with what the status was: 5xx as the server being
    unreachable (the next one is tried), anything else as final."""

    def __init__(self, entry: ServerEntry, reactor: Any):
        from dataclasses import replace

        from mtop.listeners import WSS_ALPN

        super().__init__(replace(entry, proto=WSS_ALPN), reactor)

    def _connect(self, reactor: Any, protocol: Protocol, timeout: float) -> Deferred:
        from mtop.websocket import WebSocketDial

        entry = self.entry

        def refused(detail: str, status: int | None) -> None:
            kind = "unreachable" if status is not None and status >= 500 else "protocol"
            # A prewarmed connection's refusal is counted by its pool.
            if not isinstance(protocol, Prewarmed):
                protocol.error = TunnelError(kind, detail, entry.name)

        dial = WebSocketDial(protocol, entry.host_header, entry.path, reactor, entry.ping_interval, refused)
        return super()._connect(reactor, dial, timeout)


def connector_for(reactor: Any, entry: ServerEntry, idle_timeout: float) -> Any:
    """The connector for ``entry``'s transport (TLS, WebSocket over TLS,
    or QUIC streams)."""
    if entry.type == "quic":
        from climber.quic import QuicConnector

        return QuicConnector(reactor, entry, idle_timeout)
    if entry.type == "wss":
        return WebSocketConnector(entry, reactor)
    return ServerConnector(entry, reactor)


class TunnelOpener:
    """Opens tunnels through the pool's servers, one server after another.

    `open` tries the pool's candidates in order (`_open`); each try is an
    `_attempt`: connect (TLS, or a stream of a QUIC connection), send the
    auth message and wait for the reply, all within the timeout, then tell
    the pool how the server did.
    """

    _log = logger()

    def __init__(self, reactor: Any, pool: ServerPool, idle_timeout: float = 300.0):
        self.reactor = reactor
        self.pool = pool
        self.connectors = {id(state): connector_for(reactor, state.entry, idle_timeout) for state in pool.servers}

    def close(self) -> None:
        """Close what the connectors share (QUIC connections)."""
        for connector in self.connectors.values():
            connector.close()

    def open(self, host: str, port: int, timeout: float) -> Deferred[ServerTunnel]:
        """A Deferred firing with an open `ServerTunnel` to ``host:port``, or
        failing with `TunnelError`.  ``timeout`` bounds each server's try.

        Cancelling it cancels the try under way (the TCP connect, the wait
        for a QUIC stream, or the wait for the reply, whose connection is
        aborted), tries no other server and reports nothing to the pool."""
        request = wire.AuthRequest("-", "", host, port, wire.address_type_for(host))
        try:
            wire.encode_auth(request)  # a name over 255 bytes cannot be carried
        except ValueError as e:
            return fail(TunnelError("target", f"{wire.format_hostport(host, port)} cannot be sent: {e}"))
        # The coroutine runs up to its first wait now: the pool chooses (and
        # a round-robin turn is taken) before `open` returns.
        return Deferred.fromCoroutine(self._open(request, timeout))

    async def _open(self, request: wire.AuthRequest, timeout: float) -> ServerTunnel:
        """The tunnel through the first candidate that opens one; otherwise
        the first final `TunnelError`, or one that sums up every try."""
        errors: list[TunnelError] = []
        candidates = self.pool.candidates()
        for tried, server in enumerate(candidates):
            if tried:
                self.pool.failovers += 1
            try:
                return await self._attempt(server, request, timeout)
            except TunnelError as error:
                errors.append(error)
                self._log.debug(
                    "tunnel to {target} via {server} failed: {error}",
                    target=wire.format_hostport(request.host, request.port),
                    server=server.name,
                    error=error.message,
                )
                if error.kind in _FINAL_KINDS:
                    raise
        if len(candidates) == 1 and errors and errors[-1].kind == "refused":
            # One entry, which closed without a reply after the handshake: a
            # load balancer (or a DNS name) whose server went away during
            # this login.  Once more, on a new connection, which the balancer
            # sends to a live server.  (Against the original, which answers a
            # wrong login by closing, that costs a second failed login.)
            self.pool.retries += 1
            try:
                return await self._attempt(candidates[0], request, timeout, may_prewarm=False)
            except TunnelError as error:
                errors.append(error)
                if error.kind in _FINAL_KINDS:
                    raise
        raise _summarise(errors, request.host, request.port)

    async def _attempt(
        self, server: ServerState, request: wire.AuthRequest, timeout: float, may_prewarm: bool = True
    ) -> ServerTunnel:
        """One try through ``server``: the open `ServerTunnel`, or
        `TunnelError`; reports the server's health to the pool either way
        (but not when cancelled).

        A tunnel over a prewarmed connection that ends without a reply is
        tried once more on a new connection, whose answer stands: the
        server may have ended the prewarmed one as the auth message went
        out (a restart, an eviction, a deadline shorter than
        ``prewarm_max_age``), which says nothing of this tunnel.  (Against
        the original server, which answers a wrong login by closing, that
        costs a second failed login.)"""
        entry = server.entry
        connector = self.connectors[id(server)]
        auth = wire.encode_auth(
            wire.AuthRequest(entry.username, entry.password, request.host, request.port, request.address_type)
        )
        tunnel = ServerTunnel(server, auth, entry.pipelining, time.monotonic(), connector.save_session)
        tunnel.may_prewarm = may_prewarm

        def too_late(result: Any, seconds: float) -> Failure:
            # However the cancelled wait ended, the server did not answer.
            return Failure(TunnelError("timeout", f"no answer within {seconds:g}s", server.name))

        answered = Deferred.fromCoroutine(self._reach(connector, tunnel, timeout))
        answered.addTimeout(timeout, self.reactor, onTimeoutCancel=too_late)
        try:
            await answered
        except TunnelError as error:
            if tunnel.prewarmed and error.kind in ("refused", "unreachable"):
                self._log.debug(
                    "tunnel via {server}: its prewarmed connection ended ({error}); trying a new one",
                    server=server.name,
                    error=error.message,
                )
                return await self._attempt(server, request, timeout, may_prewarm=False)
            if error.kind in ("unreachable", "timeout"):
                self.pool.report_failure(server, error.reason)
            elif tunnel.handshake_time is not None:
                # It closed or refused after a handshake: it is up.
                self.pool.report_success(server, tunnel.handshake_time)
            raise
        self.pool.report_success(server, tunnel.handshake_time)
        server.opened += 1
        return tunnel

    async def _reach(self, connector: Any, tunnel: ServerTunnel, timeout: float) -> ServerTunnel:
        """Connect ``tunnel`` to its server and wait until it is open.

        Fails with `TunnelError`, or with `CancelledError` when cancelled
        (whichever connector is under way), so that a cancelled try is
        never taken for an unreachable server."""
        server = tunnel.server
        try:
            await connector.connect(self.reactor, tunnel, timeout)
        except CancelledError:
            raise
        except ConnectingCancelledError:  # an endpoint's word for it
            raise CancelledError() from None
        except DNSLookupError:
            raise TunnelError("unreachable", f"cannot resolve {server.entry.host}", server.name) from None
        except Exception as e:
            raise TunnelError("unreachable", safe_str(e), server.name) from None
        return await tunnel.opened


def _summarise(errors: list[TunnelError], host: str, port: int) -> TunnelError:
    target = wire.format_hostport(host, port)
    if not errors:
        return TunnelError("unreachable", f"no server to reach {target}")
    kinds = {e.kind for e in errors}
    kind = "refused" if "refused" in kinds else "timeout" if kinds == {"timeout"} else errors[-1].kind
    detail = "; ".join(e.message for e in errors)
    return TunnelError(kind, f"no server could open a tunnel to {target}: {detail}")
