"""The data path's use of private pyOpenSSL and Twisted internals: all of
it, in this one module, behind one switch.

Speed on a busy tunnel comes from a few places where the public APIs copy
or wait more than they must:

* **TLS reads** (`FastPath.read_tls`): every record OpenSSL can decrypt
  goes into one buffer with ``SSL_read`` and is copied out once, instead of
  ``Connection.recv``'s fresh buffer, extra copy and join per 16 KiB record;
* **TLS output** (`FastPath.flush_tls`): the ciphertext is handed on from
  one buffer (to the socket without a copy), instead of ``bio_read``'s new
  buffer and bytes per call;
* **memory BIOs** (`FastPath.bio_swaps`): received bytes are read by
  OpenSSL where they lie and nothing is kept between reads; a grown output
  BIO is given back when the connection is quiet (OpenSSL's memory BIOs
  never shrink);
* **whole writes** (`FastPath.whole_writes`): one ``SSL_write`` encrypts
  all it is given, instead of a call back into Python per record;
* **TCP direct writes** (`FastPath.socket_writer`): bytes go to the socket
  at once when nothing is queued, instead of on the next turn of the loop;
* **TCP buffers** (`FastPath.tune_buffers`): larger reads and write
  buffers than Twisted's 64 KiB.

These reach into pyOpenSSL's cffi binding (``OpenSSL._util``) and its
``Connection``'s private attributes, and into Twisted's TCP connection's
write queue.  They are used all together or not at all: `active` is a
`FastPath` unless ``MTOP_FASTPATH`` is ``off`` (or ``0``) when this module
is imported, or the installed pyOpenSSL or Twisted lacks any piece of it.
Otherwise (`active` None) the callers (`mtop.tlstransport`, the helpers
of `mtop.relay`) take the portable path through public APIs only, which
the test suite runs too (``make test-portable``).  `describe` says which
path is in use, and the taps log it once at start
(`log_data_path_at_start`).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping

from OpenSSL import SSL
from twisted.application.service import IServiceCollection, Service
from twisted.logger import Logger

from mtop.logs import logger

#: The environment variable that turns the fast path off: ``off`` or ``0``
#: (also ``no``, ``false``), read when this module is imported.
SWITCH = "MTOP_FASTPATH"
_OFF = frozenset({"off", "0", "no", "false"})

#: The most `FastPath.read_tls` returns at once and `FastPath.flush_tls`
#: hands over at once (one buffer each per process: the reactor is one
#: thread).
BUFFER_SIZE = 1 << 18


class Unavailable(Exception):
    """The installed pyOpenSSL or Twisted lacks a piece of the fast path
    (the message names it)."""


def _need(owner: Any, names: tuple[str, ...], library: str) -> None:
    for name in names:
        if not hasattr(owner, name):
            raise Unavailable(f"{library} lacks {name}")


class BioSwaps:
    """Replacing a connection's memory BIOs through pyOpenSSL's own cffi
    binding.

    OpenSSL's ``SSL_set_bio`` frees the BIO it replaces; pyOpenSSL's
    ``_into_ssl``/``_from_ssl`` are kept pointing at the current ones, so
    its own calls (``bio_shutdown``) still work."""

    def __init__(self, ffi: Any, lib: Any):
        self._ffi, self._lib = ffi, lib
        self._where = ffi.new("char **")

    def feed(self, connection: SSL.Connection, data: bytes) -> Any:
        """Make ``data`` the connection's input, read where it lies: a
        read-only memory BIO over the bytes replaces the (drained) input
        BIO.  Returns what keeps ``data``'s memory valid: hold it until
        `settle`."""
        ffi, lib = self._ffi, self._lib
        if lib.BIO_get_mem_data(connection._into_ssl, self._where) > 0:
            data = self.unread(connection) + data
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
        left = self.unread(connection)
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

    def unread(self, connection: SSL.Connection) -> bytes:
        """A copy of what the connection's input BIO holds unread."""
        size = self._lib.BIO_get_mem_data(connection._into_ssl, self._where)
        return self._ffi.buffer(self._where[0], size)[:] if size > 0 else b""

    def _set_input(self, connection: SSL.Connection, bio: Any) -> None:
        # The input BIO changes, the output one stays: OpenSSL frees the old
        # input BIO and takes this one.
        self._lib.SSL_set_bio(connection._ssl, bio, connection._from_ssl)
        connection._into_ssl = bio


#: OpenSSL's default groups (3.5 and later), most preferred first.
DEFAULT_GROUPS = ("X25519MLKEM768", "X25519", "secp256r1", "X448", "secp384r1", "secp521r1", "ffdhe2048", "ffdhe3072")


class FastPath:
    """Every piece of the fast path, checked against the installed
    pyOpenSSL and Twisted when made (`Unavailable` names the first piece
    missing).

    ``read_tls(connection, size)``: every record OpenSSL can decrypt from
    what it holds, as one bytes object of at most ``size`` (and
    `BUFFER_SIZE`) bytes, plus the pyOpenSSL exception that stopped it
    (`SSL.WantReadError` when it simply needs more input; raised exactly as
    ``recv`` would raise it), or None if the size was reached first.

    ``flush_tls(connection, write, views)``: hand everything OpenSSL has
    written to its output BIO to ``write``: with ``views``, as buffers that
    are only valid during the call (for a `socket_writer`), else as bytes.

    ``bio_swaps``: the `BioSwaps`."""

    def __init__(self) -> None:
        import OpenSSL
        import twisted
        from twisted.internet import tcp
        from twisted.internet.abstract import FileDescriptor

        pyopenssl = f"pyOpenSSL {OpenSSL.__version__}"
        try:
            from OpenSSL._util import ffi, lib
        except ImportError:
            raise Unavailable(f"{pyopenssl} lacks OpenSSL._util") from None
        _need(
            lib,
            (
                "SSL_read", "SSL_get_error", "SSL_ERROR_WANT_READ", "BIO_read", "BIO_new_mem_buf",
                "BIO_new", "BIO_s_mem", "BIO_write", "BIO_set_mem_eof_return", "BIO_get_mem_data",
                "SSL_set_bio", "SSL_clear_mode", "SSL_MODE_ENABLE_PARTIAL_WRITE", "SSL_session_reused",
                "SSL_set1_curves_list",
            ),
            f"{pyopenssl} (OpenSSL._util.lib)",
        )
        _need(ffi, ("new", "buffer", "from_buffer", "NULL"), f"{pyopenssl} (OpenSSL._util.ffi)")
        probe = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
        _need(probe, ("_ssl", "_into_ssl", "_from_ssl", "_raise_ssl_error"), f"{pyopenssl} SSL.Connection")

        version = f"Twisted {twisted.__version__}"
        _need(tcp.Connection, ("getHandle", "write", "abortConnection", "TLS"), f"{version} tcp.Connection")
        connection = tcp.Connection.__new__(tcp.Connection)
        FileDescriptor.__init__(connection, reactor=object())  # no socket, no reactor: attributes only
        _need(
            connection,
            ("dataBuffer", "_tempDataBuffer", "_writeDisconnecting", "_writeDisconnected", "connected",
             "disconnecting", "producer", "bufferSize", "SEND_LIMIT"),
            f"{version} tcp.Connection",
        )

        self._lib = lib
        self.read_tls = _tls_reader(ffi, lib)
        self.flush_tls = _tls_flusher(ffi, lib)
        self.bio_swaps = BioSwaps(ffi, lib)
        self._tcp_connection = tcp.Connection
        self._file_descriptor = FileDescriptor
        self.description = f"{pyopenssl} private BIO access, {version} TCP direct writes"

    # TLS

    def whole_writes(self, connection: SSL.Connection) -> None:
        """Let ``SSL_write`` encrypt all it is given in one call.  pyOpenSSL
        turns on partial writes, which for a socket avoid blocking but here,
        writing into a memory BIO that never fills, only make every 16 KiB
        record a separate call back into Python (and its error checks)."""
        lib = self._lib
        lib.SSL_clear_mode(connection._ssl, lib.SSL_MODE_ENABLE_PARTIAL_WRITE)

    def session_reused(self, connection: SSL.Connection) -> bool:
        """Whether ``connection``'s handshake resumed a session."""
        return bool(self._lib.SSL_session_reused(connection._ssl))

    def offer_key_share(self, connection: SSL.Connection, group: str) -> bool:
        """Make ``group`` the only key share a client ``connection`` (before
        its handshake) sends, still offering OpenSSL's other groups after
        it; False if OpenSSL refuses the list (the defaults stay).

        OpenSSL's default sends two key shares, X25519MLKEM768 and X25519,
        so that any server finds one it takes without a HelloRetryRequest;
        computing both costs the client about 0.04 ms per handshake.  Once a
        server has chosen a group, one share of it is enough; should the
        server choose differently later, it asks for its group (one more
        round trip, never a failure)."""
        others = [name for name in DEFAULT_GROUPS if name.lower() != group.lower()]
        groups = ":".join(f"?{name}" for name in (group, *others))
        return self._lib.SSL_set1_curves_list(connection._ssl, groups.encode("ascii")) == 1

    # TCP

    def socket_writer(self, tcp: Any) -> Callable[[Any], None] | None:
        """For a Twisted TCP connection (not one Twisted's own TLS runs
        on), a ``write`` that first offers the data straight to the
        socket when nothing is queued; None for anything else.

        It takes any buffer (bytes, memoryview, cffi buffer), valid only
        during the call: what it has to queue, it copies.

        Twisted's ``write`` only queues: the bytes go out on the next turn
        of the loop, after registering the socket for writability (two
        ``epoll_ctl`` calls and an asyncio handle on ``-r asyncio``) and
        joining the queue.  On a busy tunnel the socket nearly always
        takes everything at once, so this sends it now and queues only
        what the socket refused (the ordinary path, flow control
        included)."""
        if not isinstance(tcp, self._tcp_connection) or tcp.TLS:
            return None
        sock = tcp.getHandle()
        queue = tcp.write
        delivering = False

        def deliver_unread() -> None:
            # What the peer sent before it reset the connection (at most a
            # few socket buffers' worth, up to the end of input) goes to the
            # protocol first: Linux keeps it readable after a reset.
            nonlocal delivering
            if delivering:
                return  # the protocol wrote again while this ran
            delivering = True
            for _ in range(64):
                try:
                    data = sock.recv(tcp.bufferSize)
                except OSError:
                    return
                if not data or tcp.protocol is None:
                    return
                tcp.protocol.dataReceived(data)

        def write(data: Any) -> None:
            if tcp.dataBuffer or tcp._tempDataBuffer or not tcp.connected or tcp.disconnecting or tcp._writeDisconnecting:
                queue(data if type(data) is bytes else bytes(data))
                return
            try:
                sent = sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0  # Twisted's path sends it when the socket takes more
            except OSError:
                # The peer is gone (reset, broken pipe).  What it sent
                # before may still wait unread (an early answer to an
                # upload): that is delivered first.  This send consumed the
                # socket's error: the next read would see a clean EOF, a
                # half-close that never happened.  So the connection ends
                # now, as lost, the way Twisted's own write path would have
                # ended it.
                deliver_unread()
                tcp.abortConnection()
                return
            if sent < len(data):
                queue(data if not sent and type(data) is bytes else bytes(memoryview(data)[sent:]))

        return write

    def half_close(self, tcp: Any) -> None:
        """``tcp.loseWriteConnection()``, at once when nothing is queued.

        Twisted's half-close registers the socket for writability and
        sends the FIN on the next turn of the loop, after the queue has
        drained (two ``epoll_ctl`` calls and a turn, per tunnel, on every
        tunnel that ends by half-closing).  With an empty queue there is
        nothing to wait for: this does now what that turn would do
        (``tcp.Connection._closeWriteConnection``: ``shutdown(SHUT_WR)``,
        then ``writeConnectionLost`` to a half-closeable protocol), and
        marks the connection write-closed as that turn would."""
        if (
            not isinstance(tcp, self._tcp_connection) or tcp.TLS or not tcp.connected or tcp.disconnecting
            or tcp._writeDisconnecting or tcp.dataBuffer or tcp._tempDataBuffer or tcp.producer is not None
        ):
            tcp.loseWriteConnection()
            return
        tcp._writeDisconnecting = True
        tcp._writeDisconnected = True
        tcp._closeWriteConnection()

    def tune_buffers(self, tcp: Any, size: int) -> None:
        """Give a Twisted TCP connection ``size`` byte reads, write buffer
        (the level at which its producer is paused) and sends; anything
        else is left alone."""
        if isinstance(tcp, self._file_descriptor):
            tcp.bufferSize = size
            tcp.SEND_LIMIT = size


def _tls_reader(ffi: Any, lib: Any) -> Callable[[SSL.Connection, int], tuple[bytes, Any]]:
    buffer = ffi.new("char[]", BUFFER_SIZE)
    unpack = ffi.buffer
    ssl_read, get_error, want_read = lib.SSL_read, lib.SSL_get_error, lib.SSL_ERROR_WANT_READ
    # "Needs more input", the end of nearly every read: one instance, never
    # raised (raising costs more than the rest of a small read, and a
    # caught exception kept in a local is a reference cycle holding this
    # frame and its caller's, with the bytes just read, until the garbage
    # collector runs).
    needs_more = SSL.WantReadError()

    def read(connection: SSL.Connection, size: int) -> tuple[bytes, Any]:
        ssl = connection._ssl
        size = min(size, BUFFER_SIZE)
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
            # Errors go through pyOpenSSL's own handling, so they are raised
            # exactly as ``recv`` raises them.
            try:
                connection._raise_ssl_error(ssl, n)
            except SSL.Error as e:
                stop = e
                stop.__traceback__ = None  # no cycle through this frame
            break
        return (unpack(buffer, total)[:] if total else b""), stop

    return read


def _tls_flusher(ffi: Any, lib: Any) -> Callable[[SSL.Connection, Callable[[Any], None], bool], None]:
    buffer = ffi.new("char[]", BUFFER_SIZE)
    view = ffi.buffer
    bio_read = lib.BIO_read

    def flush(connection: SSL.Connection, write: Callable[[Any], None], views: bool) -> None:
        bio = connection._from_ssl
        while True:
            n = bio_read(bio, buffer, BUFFER_SIZE)
            if n <= 0:
                return  # empty
            write(view(buffer, n) if views else view(buffer, n)[:])
            if n < BUFFER_SIZE:
                return

    return flush


def switched_off(environ: Mapping[str, str]) -> bool:
    """Whether ``environ`` turns the fast path off (`SWITCH`)."""
    return environ.get(SWITCH, "").strip().lower() in _OFF


def choose(environ: Mapping[str, str]) -> tuple[FastPath | None, str]:
    """The fast path to use under ``environ`` and why there is none: a
    `FastPath`, or None and the reason (``MTOP_FASTPATH=off``, or the
    piece the installed libraries lack)."""
    if switched_off(environ):
        return None, f"{SWITCH}={environ[SWITCH].strip()}"
    try:
        return FastPath(), ""
    except Unavailable as e:
        return None, str(e)
    except Exception as e:  # a probe that broke in a way not foreseen: still portable, and said why
        return None, f"the fast path's check failed: {e!r}"


#: The fast path in use, or None: the callers then use public APIs only.
#: Chosen once, here; tests swap it (with `enabled` and `reason`).
active, reason = choose(os.environ)
#: Whether the fast path is in use.
enabled = active is not None


def describe() -> str:
    """Which data path is in use, in a few words: ``fast (pyOpenSSL 24.2.1
    private BIO access, Twisted 24.7.0 TCP direct writes)`` or ``portable
    (MTOP_FASTPATH=off)``."""
    if active is not None:
        return f"fast ({active.description})"
    return f"portable ({reason or 'fast path not in use'})"


_log = logger(__name__)


def log_data_path(log: Logger = _log) -> None:
    """Log (info) which data path is in use: ``data path: fast (...)`` or
    ``data path: portable (...)``."""
    log.info("data path: {path}", path=describe())


class _DataPathNote(Service):
    """Logs the data path when started (an ``IService``)."""

    def startService(self) -> None:
        super().startService()
        log_data_path()


def log_data_path_at_start(parent: IServiceCollection) -> None:
    """Have ``parent`` (a tap's root service) log the data path once, when
    it starts: after the log is set up and the configured level applies.
    The taps call it from ``makeService``."""
    _DataPathNote().setServiceParent(parent)
