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
"""

from __future__ import annotations

import time
from typing import Any, Callable

from OpenSSL import SSL
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import ConnectingCancelledError, DNSLookupError
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.python.reflect import safe_str
from zope.interface import implementer

from climber.config import ServerEntry
from climber.pool import ServerPool, ServerState
from mtop import wire
from mtop.logs import logger
from mtop.relay import no_delay
from mtop.tls import client_context
from mtop.tlstransport import client_tls_factory, session_reused


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
        self.handshake_time = time.monotonic() - self._started
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
        try:
            self._save_session(self.transport.tls.get_session())
        except Exception:  # no session to keep; resumption is an optimisation
            pass
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


class ServerConnector:
    """TLS settings and the resumable session for one server."""

    _log = logger()

    def __init__(self, entry: ServerEntry):
        self.entry = entry
        self.context = client_context(entry.ca or None, entry.proto, entry.insecure)
        self.sessions: dict[str, Any] = {}
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
            return connection

        factory.connection_for = connection_for
        return factory

    def save_session(self, session: Any) -> None:
        if session is not None:
            self.sessions[self.entry.sni or self.entry.host] = session

    def connect(self, reactor: Any, protocol: Protocol, timeout: float) -> Deferred:
        """Connect ``protocol`` to the server over TCP and TLS."""
        return server_endpoint(reactor, self.entry.host, self.entry.port, timeout).connect(
            self.tls_factory(_OneProtocol(protocol), reactor)
        )

    def close(self) -> None:
        """Nothing shared to close: each tunnel is its own connection."""


def server_endpoint(reactor: Any, host: str, port: int, timeout: float) -> Any:
    """A TCP client endpoint for a server: an address is connected to as it
    is; only a name goes through ``HostnameEndpoint`` (resolution in the
    reactor's thread pool and Happy Eyeballs), which for an address would
    cost a thread round trip per tunnel."""
    if isIPAddress(host):
        return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    if isIPv6Address(host):
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return HostnameEndpoint(reactor, host, port, timeout=timeout)


def connector_for(reactor: Any, entry: ServerEntry, idle_timeout: float) -> Any:
    """The connector for ``entry``'s transport (TLS, or QUIC streams)."""
    if entry.type == "quic":
        from climber.quic import QuicConnector

        return QuicConnector(reactor, entry, idle_timeout)
    return ServerConnector(entry)


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
        for tried, server in enumerate(self.pool.candidates()):
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
        raise _summarise(errors, request.host, request.port)

    async def _attempt(self, server: ServerState, request: wire.AuthRequest, timeout: float) -> ServerTunnel:
        """One try through ``server``: the open `ServerTunnel`, or
        `TunnelError`; reports the server's health to the pool either way
        (but not when cancelled)."""
        entry = server.entry
        connector = self.connectors[id(server)]
        auth = wire.encode_auth(
            wire.AuthRequest(entry.username, entry.password, request.host, request.port, request.address_type)
        )
        tunnel = ServerTunnel(server, auth, entry.pipelining, time.monotonic(), connector.save_session)

        def too_late(result: Any, seconds: float) -> Failure:
            # However the cancelled wait ended, the server did not answer.
            return Failure(TunnelError("timeout", f"no answer within {seconds:g}s", server.name))

        answered = Deferred.fromCoroutine(self._reach(connector, tunnel, timeout))
        answered.addTimeout(timeout, self.reactor, onTimeoutCancel=too_late)
        try:
            await answered
        except TunnelError as error:
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
