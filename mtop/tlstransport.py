"""A TLS transport over a TCP transport, with half-close in both directions.

Twisted's ``TLSMemoryBIOProtocol`` treats a peer's ``close_notify`` as the end
of the whole connection and waits for the peer's ``close_notify`` before
closing.  A tunnel needs TLS 1.3 semantics instead: ``close_notify`` closes
one direction only (RFC 8446, 6.1), exactly like a TCP FIN, which is what the
original Go implementation does with ``tls.Conn.CloseWrite``.  So:

* receiving ``close_notify`` (or a TCP FIN) calls the wrapped protocol's
  ``readConnectionLost`` when it provides ``IHalfCloseableProtocol``;
* ``loseWriteConnection`` sends ``close_notify`` then a TCP FIN, and reading
  goes on;
* ``loseConnection`` sends ``close_notify`` and closes without waiting.

Towards the relay and the tunnel ends it is an
`mtop.interfaces.IStreamTransport` of kind ``tls``.  Flow control is the
TCP transport's own: this layer buffers nothing after the handshake, so a
registered producer is simply passed down.

With the fast path (`mtop.fastpath`, the only place that touches pyOpenSSL's
and Twisted's private internals), records are decrypted and delivered once
per TCP read (not once per 16 KiB record), straight into one buffer and
copied out once; an application write is encrypted in one ``SSL_write`` and
the ciphertext goes from one buffer to the socket, copied only if the
socket does not take it all.  Without it (``MTOP_FASTPATH=off``, or a
pyOpenSSL or Twisted that lacks a piece of it), the same is done through
pyOpenSSL's public ``bio_write``/``recv``/``sendall``/``bio_read``.

Memory: OpenSSL's memory BIOs never shrink, so a tunnel that once moved a
256 KiB chunk would keep about that much per direction for the rest of its
life, idle or not (about 690 KiB per idle tunnel was measured after a
1 MiB echo).  So with the fast path what TCP delivered is read by OpenSSL
where it lies (a read-only BIO over the received bytes, replaced at the next
read: no copy, nothing kept), and the output BIO is replaced by an empty one
once a connection that wrote large chunks has written none for a whole
`QUIET_SECONDS` period (2-4 s after the last one).
"""

from __future__ import annotations

from typing import Any, Callable

from OpenSSL import SSL
from twisted.internet.interfaces import (
    IConsumer,
    IHalfCloseableProtocol,
    IHandshakeListener,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    ISSLTransport,
    ITCPTransport,
)
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from zope.interface import implementer

from mtop import fastpath
from mtop.interfaces import IStreamTransport
from mtop.streams import half_close
from mtop.wire import ip_literal
from mtop.timers import cancel

#: Plaintext delivered to the protocol at most at once, and (on the
#: portable path; see `mtop.fastpath.BUFFER_SIZE` for the fast one)
#: ciphertext taken from OpenSSL at most at once.
_READ_SIZE = 1 << 18
_BIO_READ_SIZE = 1 << 18
#: Writes larger than this grow the output BIO beyond its handshake size.
_LARGE_WRITE = 1 << 14
#: How long a connection that wrote large chunks must be quiet before its
#: grown output BIO is given back.
QUIET_SECONDS = 2.0


class VerificationError(SSL.Error):
    """The peer's certificate does not match the name we connected to."""


@implementer(
    IProtocol, IHalfCloseableProtocol, IStreamTransport, ITCPTransport, ISSLTransport, IPushProducer, IConsumer
)
class TLSTransport:
    """Speaks TLS on ``transport`` and presents the plaintext to ``wrapped``.

    Implements ``IProtocol`` and ``IHalfCloseableProtocol`` towards the TCP
    transport, and `mtop.interfaces.IStreamTransport` (kind ``tls``),
    ``ITCPTransport``, ``ISSLTransport``, ``IPushProducer`` and
    ``IConsumer`` towards the wrapped protocol.
    """

    kind = "tls"
    transport: Any = None
    connected = False
    disconnecting = False
    _handshake_done = False
    #: Some bytes came from the peer (a connection that ends before any is
    #: a load balancer's TCP check, not a client's tunnel).
    received = False
    _read_eof = False
    _write_shut = False
    _shut_pending = False
    _lost = False
    _aborted = False
    _failure: Failure | None = None
    #: Large writes since the quiet check was armed, and that check.
    _large_writes = 0
    _quiet_call: Any = None
    #: The fast path this connection takes (`mtop.fastpath.active` when it
    #: was made), or None for the portable path.
    _fast: fastpath.FastPath | None = None

    def __init__(
        self,
        wrapped: IProtocol,
        tls: SSL.Connection,
        verify: Callable[[SSL.Connection], None] | None = None,
        clock: Any = None,
    ):
        """``clock`` (an ``IReactorTime``) times the release of a grown
        output BIO (`TLSFactory` passes the reactor); without it, a grown
        output BIO is kept."""
        self.wrapped = wrapped
        self._tls = tls
        self._verify = verify
        self._clock = clock
        # The data path is chosen per connection, when it is made.
        self._fast = fastpath.active
        if self._fast is not None:
            self._fast.whole_writes(tls)
        self._pending: list[bytes] = []

    @property
    def tcp(self) -> Any:
        """The TCP transport this runs on (`IStreamTransport.tcp`)."""
        return self.transport

    @property
    def tls(self) -> SSL.Connection:
        """The ``SSL.Connection`` (`IStreamTransport.tls`)."""
        return self._tls

    # IProtocol, towards TCP

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport
        # With the fast path, ciphertext goes straight to the socket of a
        # Twisted TCP connection, as buffers (views of OpenSSL's output).
        direct = self._fast.socket_writer(transport) if self._fast is not None else None
        self._write: Callable[[Any], None] = transport.write if direct is None else direct
        self._write_views = direct is not None
        self.connected = True
        self.wrapped.makeConnection(self)
        if not self._aborted:
            self._handshake()

    def connectionMade(self) -> None:
        """Unused: `makeConnection` does the work."""

    def attach(self, protocol: IProtocol) -> None:
        """Make ``protocol`` the one this connection's plaintext goes to
        from now on (a prewarmed connection taken by a tunnel), and connect
        it (`makeConnection`); the one before hears nothing more."""
        self.wrapped = protocol
        protocol.makeConnection(self)

    def dataReceived(self, data: bytes) -> None:
        if self._lost:
            return
        self.received = True
        if self._fast is None:
            self._tls.bio_write(data)
            self._process_input()
            return
        swaps = self._fast.bio_swaps
        memory = swaps.feed(self._tls, data)  # noqa: F841 (the BIO reads from it)
        try:
            self._process_input()
        finally:
            swaps.settle(self._tls)

    def _process_input(self) -> None:
        if not self._handshake_done and not self._handshake():
            return
        self._read_records()

    def readConnectionLost(self) -> None:
        """The TCP peer sent FIN: whatever TLS still holds is delivered, then
        the wrapped protocol sees end of input."""
        if self._lost or self._read_eof:
            return
        if not self._handshake_done:
            self._fail(Failure(SSL.Error("connection closed during the TLS handshake")))
            return
        self._tls.bio_shutdown()
        self._read_records()
        if not self._read_eof and not self._lost:
            self._end_of_input()

    def writeConnectionLost(self) -> None:
        """Our TCP FIN has been sent; nothing to do."""

    def connectionLost(self, reason: Failure) -> None:
        if self._lost:
            return
        self._lost = True
        self.connected = False
        cancel(self._quiet_call)
        self._quiet_call = None
        wrapped, self.wrapped = self.wrapped, None
        wrapped.connectionLost(self._failure or reason)

    # TLS machinery

    def _handshake(self) -> bool:
        try:
            self._tls.do_handshake()
        except SSL.WantReadError:
            self._flush()
            return False
        except Exception:  # SSL.Error, or an exception from an OpenSSL callback
            self._fail(Failure())
            return False
        self._flush()
        if self._verify is not None:
            try:
                self._verify(self._tls)
            except Exception:
                self._fail(Failure())
                return False
        self._handshake_done = True
        # What was written during the handshake goes first, before anything
        # the protocol writes when it hears the handshake is done.
        if self._pending and not self._lost:
            pending, self._pending = self._pending, []
            for data in pending:
                self._send(data)
        if IHandshakeListener.providedBy(self.wrapped) and not self._lost:
            self.wrapped.handshakeCompleted()
        if self._shut_pending:
            self._shut_pending = False
            if self.disconnecting:
                self.disconnecting = False
                self.loseConnection()
            else:
                self.loseWriteConnection()
        return not self._lost

    def _read_records(self) -> None:
        if self._fast is None:
            self._read_records_with_recv()
            return
        read = self._fast.read_tls
        while True:
            data, stop = read(self._tls, _READ_SIZE)
            if data:
                self._deliver(data)
            if stop is None and not self._lost:
                continue  # the buffer filled: there may be more
            break
        if isinstance(stop, SSL.ZeroReturnError):
            self._flush()
            self._end_of_input()
            return
        if stop is not None and not isinstance(stop, SSL.WantReadError):
            self._fail(Failure(stop))
            return
        # Reading may have produced output (session tickets, key updates).
        self._flush()

    def _read_records_with_recv(self) -> None:
        recv = self._tls.recv
        chunks = []
        while True:
            try:
                chunks.append(recv(_READ_SIZE))
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                self._deliver(b"".join(chunks))
                self._flush()
                self._end_of_input()
                return
            except SSL.Error:
                self._deliver(b"".join(chunks))
                self._fail(Failure())
                return
        self._deliver(b"".join(chunks))
        self._flush()

    def _deliver(self, data: bytes) -> None:
        if data and not self._aborted and self.wrapped is not None:
            self.wrapped.dataReceived(data)

    def _end_of_input(self) -> None:
        if self._read_eof or self.wrapped is None:
            return
        self._read_eof = True
        if IHalfCloseableProtocol.providedBy(self.wrapped):
            # Even when our side is already shut: the protocol needs to know
            # the peer finished cleanly (it closes the connection itself).
            self.wrapped.readConnectionLost()
        elif self._write_shut:
            self.transport.loseConnection()
        else:
            self.loseConnection()

    def _flush(self) -> None:
        if self._fast is not None:
            self._fast.flush_tls(self._tls, self._write, self._write_views)
            return
        bio_read = self._tls.bio_read
        while True:
            try:
                data = bio_read(_BIO_READ_SIZE)
            except SSL.WantReadError:
                return
            self._write(data)
            if len(data) < _BIO_READ_SIZE:
                return  # a memory BIO hands over all it has: it is empty now

    def _fail(self, failure: Failure) -> None:
        if self._failure is None:
            self._failure = failure
        self._aborted = True  # nothing more reaches the wrapped protocol
        try:
            self._flush()  # the alert saying why
        except SSL.Error:
            pass
        self.transport.loseConnection()

    def _send(self, data: bytes) -> None:
        try:
            # With the fast path one call for all of it (see
            # `mtop.fastpath.FastPath.whole_writes`); should a write be
            # partial, the rest goes by offset, not by slicing copies.
            self._tls.sendall(data)
        except SSL.Error:
            self._fail(Failure())
            return
        self._flush()
        if len(data) > _LARGE_WRITE:
            self._large_writes += 1
            if self._quiet_call is None and self._fast is not None and self._clock is not None:
                self._quiet_call = self._clock.callLater(QUIET_SECONDS, self._release_if_quiet)

    def _release_if_quiet(self) -> None:
        """Give the grown output BIO back once a whole `QUIET_SECONDS`
        period passed without a large write (the one that armed the check
        counts, so 2-4 s after the last); while they keep coming, look
        again later (the capacity is what makes them cheap)."""
        self._quiet_call = None
        if self._lost:
            return
        if self._large_writes:
            self._large_writes = 0
            self._quiet_call = self._clock.callLater(QUIET_SECONDS, self._release_if_quiet)
            return
        self._fast.bio_swaps.renew_output(self._tls)

    # ITransport, towards the wrapped protocol

    def write(self, data: bytes) -> None:
        if self._write_shut or self._lost or self.disconnecting or not data:
            return
        if not self._handshake_done:
            self._pending.append(bytes(data))
            return
        self._send(data)

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def _send_close_notify(self) -> None:
        self._write_shut = True
        try:
            self._tls.shutdown()
        except SSL.Error:
            pass
        self._flush()

    def loseWriteConnection(self) -> None:
        """Send ``close_notify`` and a TCP FIN; keep reading."""
        if self._write_shut or self._lost or self.disconnecting:
            return
        if not self._handshake_done:
            self._shut_pending = True
            return
        self._send_close_notify()
        if self._read_eof:
            self.transport.loseConnection()
        else:
            half_close(self.transport)

    def loseConnection(self) -> None:
        """Send ``close_notify`` (after any pending data) and close."""
        if self.disconnecting or self._lost:
            return
        self.disconnecting = True
        if not self._handshake_done:
            if self._pending:
                self._shut_pending = True
                return
            self.transport.loseConnection()
            return
        if not self._write_shut:
            self._send_close_notify()
        self.transport.loseConnection()

    def abortConnection(self) -> None:
        self._aborted = True
        self.disconnecting = True
        self.transport.abortConnection()

    def getPeer(self) -> Any:
        return self.transport.getPeer()

    def getHost(self) -> Any:
        return self.transport.getHost()

    def getTcpNoDelay(self) -> bool:
        return self.transport.getTcpNoDelay()

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.transport.setTcpNoDelay(enabled)

    def getTcpKeepAlive(self) -> bool:
        return self.transport.getTcpKeepAlive()

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self.transport.setTcpKeepAlive(enabled)

    def getHandle(self) -> SSL.Connection:
        return self._tls

    def getPeerCertificate(self) -> Any:
        return self._tls.get_peer_certificate()

    @property
    def negotiatedProtocol(self) -> bytes | None:
        proto = self._tls.get_alpn_proto_negotiated() if self._tls is not None else None
        return proto or None

    # IConsumer: nothing is buffered here after the handshake, so the TCP
    # transport's own flow control reaches the producer directly.

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.transport.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.transport.unregisterProducer()

    # IPushProducer: pausing us pauses reading from the socket.

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.transport.stopProducing()


@implementer(IProtocolFactory)
class TLSFactory(Factory):
    """Wraps every protocol ``wrapped_factory`` builds in a `TLSTransport`.

    ``connection_for`` makes the ``SSL.Connection`` for a new connection
    (server or client side); ``verify`` optionally checks the peer after the
    handshake.
    """

    noisy = False

    def __init__(
        self,
        wrapped_factory: Any,
        connection_for: Callable[[], SSL.Connection],
        verify: Callable[[SSL.Connection], None] | None = None,
        clock: Any = None,
    ):
        """``clock`` as for `TLSTransport`: the global reactor when not
        given."""
        if clock is None:
            from twisted.internet import reactor as clock
        self.wrapped_factory = wrapped_factory
        self.connection_for = connection_for
        self.verify = verify
        self.clock = clock

    def doStart(self) -> None:
        self.wrapped_factory.doStart()

    def doStop(self) -> None:
        self.wrapped_factory.doStop()

    def logPrefix(self) -> str:
        prefix = getattr(self.wrapped_factory, "logPrefix", None)
        return f"TLS({prefix() if prefix else type(self.wrapped_factory).__name__})"

    def buildProtocol(self, addr: Any) -> TLSTransport | None:
        wrapped = self.wrapped_factory.buildProtocol(addr)
        if wrapped is None:
            return None
        return TLSTransport(wrapped, self.connection_for(), self.verify, self.clock)

    # ClientFactory callbacks reach the wrapped factory when it has them.

    def startedConnecting(self, connector: Any) -> None:
        getattr(self.wrapped_factory, "startedConnecting", _ignore)(connector)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        getattr(self.wrapped_factory, "clientConnectionFailed", _ignore)(connector, reason)

    def clientConnectionLost(self, connector: Any, reason: Failure) -> None:
        getattr(self.wrapped_factory, "clientConnectionLost", _ignore)(connector, reason)


def _ignore(*args: Any) -> None:
    pass


def server_tls_factory(
    wrapped_factory: Any, context_source: Callable[[], SSL.Context], clock: Any = None
) -> TLSFactory:
    """A factory for TLS server connections with the context
    ``context_source()`` returns (called per connection, so a reload can
    swap it); ``clock`` as for `TLSTransport`."""

    def connection_for() -> SSL.Connection:
        connection = SSL.Connection(context_source(), None)
        connection.set_accept_state()
        return connection

    return TLSFactory(wrapped_factory, connection_for, clock=clock)


def verify_hostname(hostname: str) -> Callable[[SSL.Connection], None]:
    """A post-handshake check that the peer certificate is for ``hostname``
    (DNS name or IP address, via service_identity)."""
    from service_identity import VerificationError as SIVerificationError
    from service_identity.pyopenssl import verify_hostname as si_hostname
    from service_identity.pyopenssl import verify_ip_address as si_ip

    check = si_hostname if ip_literal(hostname) is None else si_ip

    def verify(connection: SSL.Connection) -> None:
        try:
            check(connection, hostname)
        except SIVerificationError as e:
            raise VerificationError(f"certificate does not match {hostname}: {e}") from None

    return verify


def session_reused(connection: SSL.Connection | None) -> bool:
    """Whether a client ``connection``'s completed handshake resumed a
    session (False for None).

    pyOpenSSL has no public call for it: the fast path asks OpenSSL
    (``SSL_session_reused``); the portable path relies on the server
    sending no certificate when it resumes a session (RFC 8446, 2.2), so
    OpenSSL verified no chain (``SSL_get0_verified_chain`` is NULL, as it
    is for a session resumed in TLS 1.2 too)."""
    if connection is None:
        return False
    if fastpath.active is not None:
        return fastpath.active.session_reused(connection)
    return connection.get_verified_chain() is None


def offer_key_share(connection: SSL.Connection, group: str | None) -> None:
    """Before a client ``connection``'s handshake: send a key share for
    ``group`` alone (the group the server chose last time, from
    ``get_group_name()``) instead of OpenSSL's two
    (`mtop.fastpath.FastPath.offer_key_share`).  Nothing without a group or
    on the portable path."""
    if group and fastpath.active is not None:
        fastpath.active.offer_key_share(connection, group)


def client_tls_factory(
    wrapped_factory: Any,
    context: SSL.Context,
    hostname: str,
    verify: bool = True,
    sni: str | None = None,
    session_cache: dict | None = None,
    clock: Any = None,
) -> TLSFactory:
    """A factory for TLS client connections to ``hostname``; with ``verify``
    the certificate must name it (``sni`` overrides the name sent and checked).
    ``session_cache`` (a dict) keeps the last session per name, so repeat
    connections resume instead of doing a full handshake."""
    name = sni or hostname
    send_sni = ip_literal(name) is None

    def connection_for() -> SSL.Connection:
        connection = SSL.Connection(context, None)
        connection.set_connect_state()
        if send_sni:
            connection.set_tlsext_host_name(name.encode("idna"))
        if session_cache is not None and name in session_cache:
            connection.set_session(session_cache[name])
        return connection

    checker = verify_hostname(name) if verify else None

    def after_handshake(connection: SSL.Connection) -> None:
        # A resumed session was verified for this name when it was new (only
        # verified sessions are kept, per name), and the server proved it
        # holds it: checking its certificate again would cost a parse of the
        # certificate per tunnel for nothing.
        if checker is not None and not session_reused(connection):
            checker(connection)
        if session_cache is not None:
            session = connection.get_session()
            if session is not None:
                session_cache[name] = session

    return TLSFactory(wrapped_factory, connection_for, after_handshake, clock)
