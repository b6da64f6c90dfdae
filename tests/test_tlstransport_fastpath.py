"""The data path the process runs (`mtop.fastpath`): the switch, and the
TLS transport's and the relay's fast paths in memory and on loopback:
records decrypted straight into one buffer (through pyOpenSSL's cffi
binding), received bytes read where they lie, grown buffers given back,
and the relay's direct socket writes falling back to Twisted's queue.

The suite also runs with ``MTOP_FASTPATH=off`` (``make test-portable``):
then the tests about the fast path check that the portable path is the one
in use, and the rest that it behaves the same."""

import os
import socket
import struct
import subprocess
import sys
import time

import pytest_twisted

from OpenSSL import SSL
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from mtop import fastpath, tlstransport
from mtop.certs import init_certs
from mtop.relay import writer_for
from mtop.streams import TCPStream
from mtop.tls import client_context, server_context
from mtop.tlstransport import TLSTransport

#: This run's switch (``make test-portable`` turns the fast path off).
SWITCHED_OFF = fastpath.switched_off(os.environ)


def test_the_fast_path_is_used_unless_switched_off():
    if SWITCHED_OFF:
        assert fastpath.active is None and not fastpath.enabled
        assert fastpath.describe() == f"portable (MTOP_FASTPATH={os.environ['MTOP_FASTPATH'].strip()})"
        return
    # Without it every record costs a large allocation and extra copies; a
    # pyOpenSSL or Twisted that changes what it relies on must be noticed,
    # not slow.
    assert fastpath.active is not None and fastpath.enabled, fastpath.describe()
    assert fastpath.describe().startswith("fast (pyOpenSSL ")


def test_the_switch_is_read_at_import():
    def data_path(value):
        env = dict(os.environ, MTOP_FASTPATH=value)
        code = "from mtop import fastpath; print(fastpath.describe())"
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout

    assert data_path("off") == "portable (MTOP_FASTPATH=off)\n"
    assert data_path("0") == "portable (MTOP_FASTPATH=0)\n"
    assert data_path("on").startswith("fast (")


def test_a_missing_piece_means_none_of_the_fast_path(monkeypatch):
    """All or none: a Twisted without one of the TCP pieces gets neither the
    TCP nor the TLS fast path, and likewise for pyOpenSSL."""
    from twisted.internet.abstract import FileDescriptor

    with monkeypatch.context() as patch:
        patch.delattr(FileDescriptor, "_writeDisconnecting")
        path, reason = fastpath.choose({})
    assert path is None and reason.startswith("Twisted ") and reason.endswith("lacks _writeDisconnecting")
    with monkeypatch.context() as patch:
        patch.delattr(SSL.Connection, "_raise_ssl_error")
        path, reason = fastpath.choose({})
    assert path is None and reason.startswith("pyOpenSSL ") and reason.endswith("lacks _raise_ssl_error")
    assert fastpath.choose({"MTOP_FASTPATH": "off"}) == (None, "MTOP_FASTPATH=off")


def test_the_data_path_is_logged_once_at_start(events):
    from twisted.application.service import MultiService

    root = MultiService()
    fastpath.log_data_path_at_start(root)

    def lines():
        return [e for e in events if e.get("log_format", "").startswith("data path: ")]

    assert lines() == []  # not while the service tree is built
    root.startService()
    root.stopService()
    (line,) = lines()
    assert line["path"] == fastpath.describe() and line["log_level"].name == "info"


class Wire:
    """The TCP side of one end: what the TLS layer writes is collected."""

    def __init__(self):
        self.out = []

    def write(self, data):
        self.out.append(bytes(data))

    def take(self):
        data, self.out = b"".join(self.out), []
        return data

    def loseConnection(self):
        pass

    def loseWriteConnection(self):
        pass


@implementer(IHalfCloseableProtocol)
class Collector(Protocol):
    def __init__(self):
        self.data = bytearray()
        self.eof = False

    def dataReceived(self, data):
        self.data += data

    def readConnectionLost(self):
        self.eof = True

    def writeConnectionLost(self):
        pass


def make_pair(tmp_path, clock=None):
    """Two connected ends in memory; ``clock`` times the server's quiet
    check."""
    paths = init_certs(str(tmp_path), ["localhost"], ["127.0.0.1"])
    server_conn = SSL.Connection(server_context(paths.server_crt, paths.server_key, "mtop"), None)
    server_conn.set_accept_state()
    client_conn = SSL.Connection(client_context(paths.ca_crt, "mtop"), None)
    client_conn.set_connect_state()
    server_proto, client_proto = Collector(), Collector()
    server = TLSTransport(server_proto, server_conn, clock=clock)
    client = TLSTransport(client_proto, client_conn)
    server_wire, client_wire = Wire(), Wire()
    client.makeConnection(client_wire)
    server.makeConnection(server_wire)

    def pump():
        while client_wire.out or server_wire.out:
            if client_wire.out:
                server.dataReceived(client_wire.take())
            if server_wire.out:
                client.dataReceived(server_wire.take())

    pump()
    return server, client, server_proto, client_proto, server_wire, client_wire, pump


def test_large_writes_arrive_whole_and_in_order(tmp_path):
    server, client, server_proto, client_proto, server_wire, client_wire, pump = make_pair(tmp_path)
    payload = os.urandom(3 * (1 << 20) + 12345)  # more than the read buffer, not a multiple of a record
    for i in range(0, len(payload), 700_000):
        server.write(payload[i : i + 700_000])
    # Delivered in pieces of arbitrary size, as TCP would.
    data = server_wire.take()
    for i in range(0, len(data), 100_003):
        client.dataReceived(data[i : i + 100_003])
    assert bytes(client_proto.data) == payload
    client.write(b"and back")
    pump()
    assert bytes(server_proto.data) == b"and back"


def test_close_notify_after_data_is_end_of_input(tmp_path):
    server, client, server_proto, client_proto, server_wire, client_wire, pump = make_pair(tmp_path)
    server.write(b"last words")
    server.loseWriteConnection()
    pump()
    assert bytes(client_proto.data) == b"last words" and client_proto.eof
    # The other direction still works (half-close).
    client.write(b"reply")
    pump()
    assert bytes(server_proto.data) == b"reply"


def test_corrupt_record_fails_the_connection(tmp_path):
    server, client, server_proto, client_proto, server_wire, client_wire, pump = make_pair(tmp_path)
    server.write(b"x" * 1000)
    record = bytearray(server_wire.take())
    record[-3] ^= 0xFF  # break the authentication tag
    lost = []
    client_proto.connectionLost = lost.append
    client.dataReceived(bytes(record))
    assert client._failure is not None and client._failure.check(SSL.Error)
    assert bytes(client_proto.data) == b""


def test_writer_for_other_transports_is_their_write():
    transport = StringTransport()
    write = writer_for(TCPStream(transport))
    write(b"abc")
    assert transport.value() == b"abc"



async def write_to_a_reset_peer(answer: bytes) -> list:
    """A direct write to a peer that sent ``answer`` and then reset the
    connection (both arrived before the reactor looked); the protocol's
    events."""
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred
    from twisted.internet.protocol import Factory

    ended = Deferred()
    seen = []

    @implementer(IHalfCloseableProtocol)
    class Side(Protocol):
        def connectionMade(self):
            stream = TCPStream(self.transport)
            self.write = writer_for(stream)
            # Straight to the socket on the fast path; Twisted's queue (and
            # its own handling of the reset) on the portable one.
            assert (self.write != stream.write) == fastpath.enabled
            ready.callback(self)

        def dataReceived(self, data):
            seen.append(data)

        def readConnectionLost(self):
            seen.append("eof")

        def writeConnectionLost(self):
            pass

        def connectionLost(self, reason):
            seen.append("lost")
            ended.callback(None)

    ready = Deferred()
    port = reactor.listenTCP(0, Factory.forProtocol(Side), interface="127.0.0.1")
    peer = socket.create_connection(("127.0.0.1", port.getHost().port))
    try:
        side = await ready
        if answer:
            peer.sendall(answer)
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()  # a reset
        time.sleep(0.1)  # it arrives before the reactor looks again
        side.write(b"x" * 65536)  # so this send meets it first
        await ended
    finally:
        port.stopListening()
    return seen


@pytest_twisted.ensureDeferred
async def test_direct_write_to_a_reset_peer_ends_the_connection_as_lost_not_as_eof():
    """A send that meets the peer's reset consumes the socket's error; the
    connection must end as lost, never look half-closed."""
    seen = await write_to_a_reset_peer(b"")
    assert seen == ["lost"], seen


def test_received_bytes_are_read_where_they_lie_and_not_kept(tmp_path):
    """The input BIO reads TCP's bytes in place; once they are processed
    nothing refers to them (an idle tunnel keeps no copy of its last read),
    even when a read ends in the middle of a record."""
    import sys

    server, client, server_proto, client_proto, server_wire, client_wire, pump = make_pair(tmp_path)
    assert client._fast is fastpath.active  # in place with the fast path, bio_write's copy without
    payload = os.urandom(200_000)
    server.write(payload)
    wire = server_wire.take()
    first, second = bytes(wire[:150_001]), bytes(wire[150_001:])
    before = sys.getrefcount(first)
    client.dataReceived(first)
    assert sys.getrefcount(first) == before
    assert 0 < len(client_proto.data) < len(payload)
    client.dataReceived(second)
    assert bytes(client_proto.data) == payload


def test_unread_input_survives_the_next_read():
    """Should OpenSSL leave fed bytes unread (a handshake stopped midway),
    they are copied out before the caller's buffer goes, and come first at
    the next read."""
    connection = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
    connection.set_accept_state()
    if fastpath.active is None:
        # The portable path: pyOpenSSL's bio_write copies what it is given.
        assert SWITCHED_OFF and TLSTransport(Collector(), connection)._fast is None
        return
    swaps = fastpath.active.bio_swaps
    buffer = bytearray(b"abc")
    memory = swaps.feed(connection, buffer)
    swaps.settle(connection)
    del memory
    buffer[:] = b"xyz"  # the caller's buffer is overwritten
    memory = swaps.feed(connection, b"def")  # noqa: F841 (the BIO reads from it)
    assert swaps.unread(connection) == b"abcdef"


def test_grown_output_buffer_is_given_back_when_quiet(tmp_path, monkeypatch):
    from twisted.internet.task import Clock

    clock = Clock()
    renewed = []
    if fastpath.active is not None:
        swaps = fastpath.active.bio_swaps
        renew = swaps.renew_output
        monkeypatch.setattr(swaps, "renew_output", lambda connection: renewed.append(renew(connection)) or renewed[-1])
    server, client, server_proto, client_proto, server_wire, client_wire, pump = make_pair(tmp_path, clock)
    server.write(b"small")  # small writes leave the buffer as it is
    assert not clock.getDelayedCalls()
    server.write(os.urandom(300_000))
    if fastpath.active is None:
        # The portable path keeps pyOpenSSL's BIOs as they are: no check.
        assert SWITCHED_OFF and not clock.getDelayedCalls()
    clock.advance(tlstransport.QUIET_SECONDS)
    server.write(os.urandom(300_000))  # still busy: kept
    clock.advance(tlstransport.QUIET_SECONDS)
    assert renewed == []
    clock.advance(tlstransport.QUIET_SECONDS)  # quiet for a whole period
    assert renewed == ([True] if fastpath.active is not None else [])
    assert not clock.getDelayedCalls()
    server.write(b"after")
    client.dataReceived(server_wire.take())
    assert bytes(client_proto.data).endswith(b"after") and len(client_proto.data) == 600_010


def test_quiet_check_stops_with_the_connection(tmp_path):
    from twisted.internet.task import Clock

    clock = Clock()
    server, client, server_proto, client_proto, server_wire, client_wire, pump = make_pair(tmp_path, clock)
    server.write(os.urandom(100_000))
    # Only the fast path gives grown buffers back.
    assert bool(clock.getDelayedCalls()) == fastpath.enabled and (fastpath.enabled or SWITCHED_OFF)
    server.connectionLost(None)
    assert not clock.getDelayedCalls()


def test_a_session_resumes_any_number_of_connections(tmp_path):
    """climber keeps one session per server and sets it on every new
    connection, several at a time: the first connection that resumes it
    must not spend it for the others (OpenSSL's client cache would)."""
    from mtop.tlstransport import session_reused

    paths = init_certs(str(tmp_path), ["localhost"], ["127.0.0.1"])
    server_ctx = server_context(paths.server_crt, paths.server_key, "mtop")
    client_ctx = client_context(paths.ca_crt, "mtop")

    def connect(session=None):
        server_conn = SSL.Connection(server_ctx, None)
        server_conn.set_accept_state()
        client_conn = SSL.Connection(client_ctx, None)
        client_conn.set_connect_state()
        if session is not None:
            client_conn.set_session(session)
        server, client = TLSTransport(Collector(), server_conn), TLSTransport(Collector(), client_conn)
        server_wire, client_wire = Wire(), Wire()
        client.makeConnection(client_wire)
        server.makeConnection(server_wire)
        while client_wire.out or server_wire.out:
            if client_wire.out:
                server.dataReceived(client_wire.take())
            if server_wire.out:
                client.dataReceived(server_wire.take())
        assert client._handshake_done and server._handshake_done
        return client_conn

    first = connect()
    assert not session_reused(first)
    session = first.get_session()
    assert all(session_reused(connect(session)) for _ in range(3))


@pytest_twisted.ensureDeferred
async def test_direct_write_to_a_reset_peer_delivers_what_it_sent_before():
    """The peer answered, then reset (a server refusing an upload early):
    its answer still reaches the protocol, before the connection ends as
    lost."""
    seen = await write_to_a_reset_peer(b"413 too large")
    assert seen == [b"413 too large", "lost"], seen


async def fin_arrives(sock: socket.socket, seconds: float = 5.0) -> bool:
    """Whether the peer's FIN reaches ``sock`` within ``seconds``, looking
    without blocking the reactor (which has to send it)."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            return sock.recv(10, socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            await deferLater(reactor, 0.01, lambda: None)
    return False


@pytest_twisted.ensureDeferred
async def test_a_half_close_with_nothing_queued_sends_the_fin_at_once():
    """`mtop.streams.TCPStream.loseWriteConnection`: on the fast path the
    FIN leaves during the call (no writability turn of the loop) when
    nothing is queued, the protocol hears ``writeConnectionLost``, and the
    connection keeps reading; queued bytes still go first, then the FIN."""
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred
    from twisted.internet.protocol import Factory

    @implementer(IHalfCloseableProtocol)
    class Side(Protocol):
        def connectionMade(self):
            self.events = []
            ready.callback(self)

        def dataReceived(self, data):
            self.events.append(data)
            if got is not None and not got.called:
                got.callback(None)

        def readConnectionLost(self):
            self.events.append("eof")

        def writeConnectionLost(self):
            self.events.append("write-closed")

    ready, got = Deferred(), None
    port = reactor.listenTCP(0, Factory.forProtocol(Side), interface="127.0.0.1")
    peer = socket.create_connection(("127.0.0.1", port.getHost().port))
    try:
        side = await ready
        TCPStream(side.transport).loseWriteConnection()
        if fastpath.enabled:
            assert side.events == ["write-closed"]
            assert side.transport not in reactor.getWriters()  # no writability turn
            assert peer.recv(10, socket.MSG_DONTWAIT) == b""  # the FIN, already sent
        got = Deferred()
        peer.sendall(b"still read")
        await got
        assert b"".join(e for e in side.events if isinstance(e, bytes)) == b"still read"
        assert await fin_arrives(peer)
        assert "write-closed" in side.events
    finally:
        peer.close()
        port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_handshake_reply_leaves_during_the_call():
    """`mtop.tunnelend.TunnelEnd.reply` (climber's SOCKS5 and HTTP
    answers): on the fast path the bytes are on the wire when the call
    returns, with no writability turn; without it, Twisted's queue."""
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred
    from twisted.internet.protocol import Factory

    from mtop.tunnelend import TunnelEnd

    class Side(TunnelEnd):
        def connectionMade(self):
            ready.callback(self)

        def report_outcome(self, bytes_up, bytes_down):
            pass

    ready = Deferred()
    port = reactor.listenTCP(0, Factory.forProtocol(Side), interface="127.0.0.1")
    peer = socket.create_connection(("127.0.0.1", port.getHost().port))
    try:
        side = await ready
        side.reply(b"\x05\x00")
        if fastpath.enabled:
            assert side.transport not in reactor.getWriters()
            assert not side.transport.dataBuffer and not side.transport._tempDataBuffer
            assert peer.recv(10, socket.MSG_DONTWAIT) == b"\x05\x00"
        else:
            from twisted.internet.task import deferLater

            for _ in range(500):
                try:
                    assert peer.recv(10, socket.MSG_DONTWAIT) == b"\x05\x00"
                    break
                except BlockingIOError:
                    await deferLater(reactor, 0.01, lambda: None)
            else:
                raise AssertionError("the reply never arrived")
    finally:
        peer.close()
        port.stopListening()


def _client_hello_and_group(paths, group):
    """The size of a client's first flight with ``offer_key_share(group)``,
    and the group the handshake settled on (against our server)."""
    server_conn = SSL.Connection(server_context(paths.server_crt, paths.server_key, "mtop"), None)
    server_conn.set_accept_state()
    client_conn = SSL.Connection(client_context(paths.ca_crt, "mtop"), None)
    client_conn.set_connect_state()
    tlstransport.offer_key_share(client_conn, group)
    server, client = TLSTransport(Collector(), server_conn), TLSTransport(Collector(), client_conn)
    server_wire, client_wire = Wire(), Wire()
    client.makeConnection(client_wire)
    hello = client_wire.take()
    server.makeConnection(server_wire)
    server.dataReceived(hello)
    while client_wire.out or server_wire.out:
        if server_wire.out:
            client.dataReceived(server_wire.take())
        if client_wire.out:
            server.dataReceived(client_wire.take())
    assert client._handshake_done and server._handshake_done
    return len(hello), client_conn.get_group_name()


def test_a_client_can_send_one_key_share_for_the_group_its_server_chose(tmp_path):
    paths = init_certs(str(tmp_path), ["localhost"], ["127.0.0.1"])
    default_size, default_group = _client_hello_and_group(paths, None)
    assert default_group == "X25519MLKEM768"  # hybrid post-quantum, OpenSSL's first choice
    size, group = _client_hello_and_group(paths, default_group)
    assert group == default_group
    if SWITCHED_OFF:
        assert size == default_size  # nothing changes on the portable path
        return
    # The X25519 share (32 bytes and its header) is no longer computed and sent.
    assert default_size - size >= 32
    # A server that prefers another group asks for it: still a handshake.
    _, group = _client_hello_and_group(paths, "x25519")
    assert group == "X25519MLKEM768"
