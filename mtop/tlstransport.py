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

Records are decrypted and delivered once per TCP read (not once per 16 KiB
record), straight into one buffer and copied out once; an application write
is encrypted in one ``SSL_write`` and the ciphertext goes from one buffer to
the socket (`mtop.relay.writer_for`), copied only if the socket does not
take it all.  Flow control is the TCP transport's own: this layer buffers
nothing after the handshake, so a registered producer is simply passed down.

Memory: OpenSSL's memory BIOs never shrink, so a tunnel that once moved a
256 KiB chunk would keep about that much per direction for the rest of its
life, idle or not (about 690 KiB per idle tunnel was measured after a
1 MiB echo).  So what TCP delivered is read by OpenSSL where it lies (a read-only
BIO over the received bytes, replaced at the next read: no copy, nothing
kept), and the output BIO is replaced by an empty one once a connection
that wrote large chunks has written none for a whole `QUIET_SECONDS`
period (2-4 s after the last one).
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

#: Plaintext delivered to the protocol at most at once, and ciphertext
#: taken from OpenSSL at most at once.
_READ_SIZE = 1 << 18
_BIO_READ_SIZE = 1 << 18
#: Writes larger than this grow the output BIO beyond its handshake size.
_LARGE_WRITE = 1 << 14
#: How long a connection that wrote large chunks must be quiet before its
#: grown output BIO is given back.
QUIET_SECONDS = 2.0


def _direct_reader() -> Callable[[SSL.Connection, int], tuple[bytes, Any]] | None:
    """``read(connection, size)``: every record OpenSSL can decrypt from
    what it holds, as one bytes object of at most ``size`` bytes, plus the
    pyOpenSSL exception that stopped it (`SSL.WantReadError` when it simply
    needs more input), or None if the buffer filled first.

    pyOpenSSL's ``recv`` returns one record (at most 16 KiB) per call, into
    a fresh buffer of the size asked for, copied once more into bytes, and
    the pieces are joined again: four copies and a large allocation per
    record.  This calls ``SSL_read`` through pyOpenSSL's own cffi binding
    into one buffer per process (the reactor is one thread), copied out once.
    Errors still go through pyOpenSSL's error handling, so they are raised
    exactly as ``recv`` raises them.  None when this pyOpenSSL lacks what it
    needs (then ``recv`` is used)."""
    try:
        from OpenSSL._util import ffi, lib

        ssl_read = lib.SSL_read
        probe = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
        probe._ssl, probe._raise_ssl_error  # noqa: B018 (attributes used below)
    except Exception:
        return None
    buffer = ffi.new("char[]", _READ_SIZE)
    unpack = ffi.buffer
    get_error, want_read = lib.SSL_get_error, lib.SSL_ERROR_WANT_READ
    # "Needs more input", the end of nearly every read: one instance, never
    # raised (raising costs more than the rest of a small read, and a
    # caught exception kept in a local is a reference cycle holding this
    # frame and its caller's, with the bytes just read, until the garbage
    # collector runs).
    needs_more = SSL.WantReadError()

    def read(connection: SSL.Connection, size: int) -> tuple[bytes, Any]:
        ssl = connection._ssl
        size = min(size, _READ_SIZE)
        total = 0
        stop: Any = None
        while total < size:
            n = ssl_read(ssl, buffer + total, size - total)
            if n > 0:
                total += n
                continue
            if get_error(ssl, n) == want_read:
                stop = needs_more
                break
            try:
                connection._raise_ssl_error(ssl, n)
            except SSL.Error as e:
                stop = e
                stop.__traceback__ = None  # no cycle through this frame
            break
        return (unpack(buffer, total)[:] if total else b""), stop

    return read


_read_direct = _direct_reader()


def _direct_flusher() -> Callable[[SSL.Connection, Callable[[Any], None]], None] | None:
    """``flush(connection, write)``: hand everything OpenSSL has written to
    its memory BIO to ``write`` as buffers that are only valid during the
    call (a writer from `mtop.relay.writer_for` sends them to the socket
    without a copy, and copies only what it has to queue).  Instead of
    ``bio_read``, which allocates a buffer of the size asked for each time and
    copies it into new bytes.  None when this pyOpenSSL lacks what it needs."""
    try:
        from OpenSSL._util import ffi, lib

        bio_read = lib.BIO_read
        SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)._from_ssl  # noqa: B018
    except Exception:
        return None
    buffer = ffi.new("char[]", _BIO_READ_SIZE)
    view = ffi.buffer

    def flush(connection: SSL.Connection, write: Callable[[Any], None]) -> None:
        bio = connection._from_ssl
        while True:
            n = bio_read(bio, buffer, _BIO_READ_SIZE)
            if n <= 0:
                return  # empty
            write(view(buffer, n))
            if n < _BIO_READ_SIZE:
                return

    return flush


_flush_direct = _direct_flusher()


class _BioSwaps:
    """Replacing a connection's memory BIOs through pyOpenSSL's own cffi
    binding (`_bio_swaps` is None when this pyOpenSSL lacks what it needs:
    then ``bio_write`` is used and the output BIO is kept).

    OpenSSL's ``SSL_set_bio`` frees the BIO it replaces; pyOpenSSL's
    ``_into_ssl``/``_from_ssl`` are kept pointing at the current ones, so
    its own calls (``bio_shutdown``) still work."""

    def __init__(self) -> None:
        from OpenSSL._util import ffi, lib

        self._ffi, self._lib = ffi, lib
        self._where = ffi.new("char **")
        probe = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
        probe._ssl, probe._into_ssl, probe._from_ssl  # noqa: B018 (attributes used below)
        for name in ("BIO_new_mem_buf", "BIO_new", "BIO_s_mem", "BIO_write", "BIO_set_mem_eof_return",
                     "BIO_get_mem_data", "SSL_set_bio"):
            getattr(lib, name)

    def feed(self, connection: SSL.Connection, data: bytes) -> Any:
        """Make ``data`` the connection's input, read where it lies: a
        read-only memory BIO over the bytes replaces the (drained) input
        BIO.  Returns what keeps ``data``'s memory valid: hold it until
        `settle`."""
        ffi, lib = self._ffi, self._lib
        if lib.BIO_get_mem_data(connection._into_ssl, self._where) > 0:
            data = self._left(connection) + data
        memory = ffi.from_buffer(data)
        bio = lib.BIO_new_mem_buf(memory, len(data))
        if bio == ffi.NULL:
            raise MemoryError("BIO_new_mem_buf failed")
        # Empty means "more may come" (retry), not end of input, until
        # ``bio_shutdown`` says otherwise.
        lib.BIO_set_mem_eof_return(bio, -1)
        self._set_input(connection, bio)
        return memory

    def settle(self, connection: SSL.Connection) -> None:
        """After `feed`'s bytes were read: OpenSSL keeps an incomplete
        record in its own buffer, so the input BIO is normally drained;
        should bytes remain (the handshake failed midway), they are copied
        into a BIO of their own, so nothing refers to the fed bytes."""
        lib = self._lib
        if lib.BIO_get_mem_data(connection._into_ssl, self._where) <= 0:
            return
        left = self._left(connection)
        bio = lib.BIO_new(lib.BIO_s_mem())
        if bio == self._ffi.NULL or lib.BIO_write(bio, left, len(left)) != len(left):
            raise MemoryError("cannot keep unread TLS input")
        lib.BIO_set_mem_eof_return(bio, -1)
        self._set_input(connection, bio)

    def renew_output(self, connection: SSL.Connection) -> bool:
        """Replace an empty output BIO by a new one (the old one, with the
        capacity it grew to, is freed).  False when it still holds bytes."""
        ffi, lib = self._ffi, self._lib
        if lib.BIO_get_mem_data(connection._from_ssl, self._where) > 0:
            return False
        bio = lib.BIO_new(lib.BIO_s_mem())
        if bio == ffi.NULL:
            return False
        lib.SSL_set_bio(connection._ssl, connection._into_ssl, bio)
        connection._from_ssl = bio
        return True

    def _left(self, connection: SSL.Connection) -> bytes:
        size = self._lib.BIO_get_mem_data(connection._into_ssl, self._where)
        return self._ffi.buffer(self._where[0], size)[:]

    def _set_input(self, connection: SSL.Connection, bio: Any) -> None:
        # The input BIO changes, the output one stays: OpenSSL frees the old
        # input BIO and takes this one.
        self._lib.SSL_set_bio(connection._ssl, bio, connection._from_ssl)
        connection._into_ssl = bio


def _bio_swapper() -> _BioSwaps | None:
    try:
        return _BioSwaps()
    except Exception:
        return None


_bio_swaps = _bio_swapper()


def _whole_writes(connection: SSL.Connection) -> None:
    """Let ``SSL_write`` encrypt all it is given in one call.  pyOpenSSL
    turns on partial writes, which for a socket avoid blocking but here,
    writing into a memory BIO that never fills, only make every 16 KiB
    record a separate call back into Python (and its error checks)."""
    try:
        from OpenSSL._util import lib

        lib.SSL_clear_mode(connection._ssl, lib.SSL_MODE_ENABLE_PARTIAL_WRITE)
    except Exception:  # an optimisation: partial writes still work
        pass


class VerificationError(SSL.Error):
    """The peer's certificate does not match the name we connected to."""


@implementer(IProtocol, IHalfCloseableProtocol, ITCPTransport, ISSLTransport, IPushProducer, IConsumer)
class TLSTransport:
    """Speaks TLS on ``transport`` and presents the plaintext to ``wrapped``.

    Implements ``IProtocol`` and ``IHalfCloseableProtocol`` towards the TCP
    transport, and ``ITCPTransport``, ``IPushProducer`` and ``IConsumer``
    towards the wrapped protocol.
    """

    transport: Any = None
    connected = False
    disconnecting = False
    _handshake_done = False
    _read_eof = False
    _write_shut = False
    _shut_pending = False
    _lost = False
    _aborted = False
    _failure: Failure | None = None
    #: Large writes since the quiet check was armed, and that check.
    _large_writes = 0
    _quiet_call: Any = None

    def __init__(
        self,
        wrapped: IProtocol,
        tls: SSL.Connection,
        verify: Callable[[SSL.Connection], None] | None = None,
        clock: Any = None,
    ):
        """``clock`` (an ``IReactorTime``) times the release of a grown
        output BIO; without it, the TCP transport's reactor does."""
        self.wrapped = wrapped
        self._tls = tls
        self._verify = verify
        self._clock = clock
        _whole_writes(tls)
        self._pending: list[bytes] = []

    @property
    def tcp_transport(self) -> Any:
        """The TCP transport this runs on."""
        return self.transport

    # IProtocol, towards TCP

    def makeConnection(self, transport: Any) -> None:
        from mtop.relay import writer_for

        self.transport = transport
        self._write = writer_for(transport)
        if self._clock is None:
            self._clock = getattr(transport, "reactor", None)
        self.connected = True
        self.wrapped.makeConnection(self)
        if not self._aborted:
            self._handshake()

    def connectionMade(self) -> None:
        """Unused: `makeConnection` does the work."""

    def dataReceived(self, data: bytes) -> None:
        if self._lost:
            return
        if _bio_swaps is None:
            self._tls.bio_write(data)
            self._process_input()
            return
        memory = _bio_swaps.feed(self._tls, data)  # noqa: F841 (the BIO reads from it)
        try:
            self._process_input()
        finally:
            _bio_swaps.settle(self._tls)

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
        if self._quiet_call is not None and self._quiet_call.active():
            self._quiet_call.cancel()
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
        if _read_direct is None:
            self._read_records_with_recv()
            return
        while True:
            data, stop = _read_direct(self._tls, _READ_SIZE)
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
        if _flush_direct is not None and getattr(self._write, "takes_buffers", False):
            _flush_direct(self._tls, self._write)
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
            # One call for all of it (see `_whole_writes`); should a write be
            # partial anyway, the rest goes by offset, not by slicing copies.
            self._tls.sendall(data)
        except SSL.Error:
            self._fail(Failure())
            return
        self._flush()
        if len(data) > _LARGE_WRITE:
            self._large_writes += 1
            if self._quiet_call is None and _bio_swaps is not None and self._clock is not None:
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
        _bio_swaps.renew_output(self._tls)

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
            self.transport.loseWriteConnection()

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
    import ipaddress

    from service_identity import VerificationError as SIVerificationError
    from service_identity.pyopenssl import verify_hostname as si_hostname
    from service_identity.pyopenssl import verify_ip_address as si_ip

    try:
        ipaddress.ip_address(hostname)
        check = si_ip
    except ValueError:
        check = si_hostname

    def verify(connection: SSL.Connection) -> None:
        try:
            check(connection, hostname)
        except SIVerificationError as e:
            raise VerificationError(f"certificate does not match {hostname}: {e}") from None

    return verify


def session_reused(connection: SSL.Connection) -> bool:
    """Whether ``connection``'s handshake resumed a session (pyOpenSSL has
    no public call for it)."""
    try:
        from OpenSSL._util import lib

        return bool(lib.SSL_session_reused(connection._ssl))
    except Exception:
        return False


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
    import ipaddress

    name = sni or hostname
    try:
        ipaddress.ip_address(name)
        send_sni = False
    except ValueError:
        send_sni = True

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
