"""The TLS transport's state, in memory: two `TLSTransport`s over an
in-memory TCP connection with half-close (no sockets, no reactor), each
test on the fast data path and on the portable one (`mtop.fastpath`).

close_notify is one direction's end (TLS 1.3), like a TCP FIN; what is
written during the handshake goes out after it; a corrupt record ends the
connection with a TLS error."""

import pytest
from OpenSSL import SSL
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHalfCloseableProtocol, IHandshakeListener, IPushProducer
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mtop import fastpath
from mtop.certs import init_certs
from mtop.interfaces import IStreamTransport
from mtop.tls import client_context, server_context
from mtop.tlstransport import QUIET_SECONDS, TLSTransport


@pytest.fixture(params=["fast", "portable"])
def data_path(request, monkeypatch):
    """The data path new connections take: the fast one (made here, so it
    is tested whatever ``MTOP_FASTPATH`` says) or the portable one."""
    path = fastpath.FastPath() if request.param == "fast" else None
    monkeypatch.setattr(fastpath, "active", path)
    monkeypatch.setattr(fastpath, "enabled", path is not None)
    monkeypatch.setattr(fastpath, "reason", "" if path else "test")
    return path


@pytest.fixture(scope="module")
def contexts(tmp_path_factory):
    paths = init_certs(str(tmp_path_factory.mktemp("certs")), ["localhost"], ["127.0.0.1"])
    return server_context(paths.server_crt, paths.server_key, "mtop"), client_context(paths.ca_crt, "mtop")


class MemoryTCP:
    """One end of an in-memory TCP connection, as a TLS transport sees it
    (``ITCPTransport`` with half-close): what is sent is kept as events,
    in order, until `Link.pump` delivers them."""

    def __init__(self, port):
        self.port = port
        self.protocol = None
        self.events = []  # ("data", bytes), ("fin",), ("close",), ("abort",)
        self.write_shut = False  # FIN sent
        self.closed = False  # loseConnection or abortConnection
        self.aborted = False
        self.gone = False  # connectionLost delivered
        self.late_writes = 0  # writes after the FIN or close (TCP drops them)
        self.producer = None
        self.paused = False
        self.no_delay = False

    def write(self, data):
        if self.write_shut or self.closed:
            self.late_writes += 1
            return
        self.events.append(("data", bytes(data)))  # a buffer is valid only during the call

    def writeSequence(self, data):
        self.write(b"".join(data))

    def loseWriteConnection(self):
        if not (self.write_shut or self.closed):
            self.write_shut = True
            self.events.append(("fin",))

    def loseConnection(self):
        if not self.closed:
            self.closed = True
            self.events.append(("close",))

    def abortConnection(self):
        if not self.aborted:
            self.closed = self.aborted = True
            self.events.append(("abort",))

    def getPeer(self):
        return IPv4Address("TCP", "127.0.0.1", 40000 + self.port)

    def getHost(self):
        return IPv4Address("TCP", "127.0.0.1", self.port)

    def setTcpNoDelay(self, enabled):
        self.no_delay = enabled

    def getTcpNoDelay(self):
        return self.no_delay

    def registerProducer(self, producer, streaming):
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False

    def stopProducing(self):
        self.loseConnection()

    def data(self):
        """The bytes sent and not yet delivered."""
        return b"".join(event[1] for event in self.events if event[0] == "data")


class Link:
    """Two `MemoryTCP` ends and the protocols (`TLSTransport`s) on them."""

    def __init__(self, client, server):
        self.client, self.server = MemoryTCP(1), MemoryTCP(2)
        self.client.protocol, self.server.protocol = client, server

    def connect(self):
        self.client.protocol.makeConnection(self.client)
        self.server.protocol.makeConnection(self.server)

    def pump(self, fins=True):
        """Deliver what both ends sent until nothing moves; without
        ``fins``, only the bytes (a TCP FIN or close waits)."""
        while self._deliver(self.client, self.server, fins) | self._deliver(self.server, self.client, fins):
            pass

    def _deliver(self, source, peer, fins):
        moved = False
        while source.events:
            kind = source.events[0][0]
            if kind != "data" and not fins:
                break
            event = source.events.pop(0)
            moved = True
            if kind == "data":
                if not peer.gone and not peer.closed:
                    peer.protocol.dataReceived(event[1])
            elif kind == "fin":
                if not peer.gone:
                    peer.protocol.readConnectionLost()
                if not source.gone:
                    source.protocol.writeConnectionLost()
            elif kind == "close":
                self._lost(source, ConnectionDone())
                if not peer.gone and not peer.closed:
                    peer.protocol.readConnectionLost()  # the peer's end of input
                elif peer.closed:
                    self._lost(peer, ConnectionDone())
            elif kind == "abort":
                self._lost(source, ConnectionAborted())
                self._lost(peer, ConnectionLost())  # a reset
        return moved

    @staticmethod
    def _lost(end, reason):
        if not end.gone:
            end.gone = True
            end.protocol.connectionLost(Failure(reason))


@implementer(IHalfCloseableProtocol, IHandshakeListener)
class Collector(Protocol):
    """Keeps what arrives, its end of input and how the connection ended;
    ``on_handshake`` is written when the handshake completes."""

    def __init__(self, on_handshake=b""):
        self.data = bytearray()
        self.eofs = 0
        self.reason = None
        self.handshakes = 0
        self.on_handshake = on_handshake

    def dataReceived(self, data):
        self.data += data

    def readConnectionLost(self):
        self.eofs += 1

    def writeConnectionLost(self):
        pass

    def handshakeCompleted(self):
        self.handshakes += 1
        if self.on_handshake:
            self.transport.write(self.on_handshake)

    def connectionLost(self, reason):
        self.reason = reason


def make_pair(contexts, client_proto=None, server_proto=None, connect=True, clock=None):
    """A client and a server `TLSTransport` on one `Link`; connected (and
    the handshake done) unless ``connect`` is False."""
    server_ctx, client_ctx = contexts
    server_conn = SSL.Connection(server_ctx, None)
    server_conn.set_accept_state()
    client_conn = SSL.Connection(client_ctx, None)
    client_conn.set_connect_state()
    client_proto = client_proto or Collector()
    server_proto = server_proto or Collector()
    client = TLSTransport(client_proto, client_conn, clock=clock)
    server = TLSTransport(server_proto, server_conn, clock=clock)
    link = Link(client, server)
    if connect:
        link.connect()
        link.pump()
        assert client._handshake_done and server._handshake_done
    return link, client, server, client_proto, server_proto


def test_each_connection_takes_the_chosen_data_path(contexts, data_path):
    link, client, server, client_proto, server_proto = make_pair(contexts)
    assert client._fast is data_path and server._fast is data_path
    client.write(b"x" * 100_000)
    link.pump()
    assert server_proto.data == b"x" * 100_000


def test_it_is_a_tls_stream_transport(contexts, data_path):
    link, client, server, client_proto, server_proto = make_pair(contexts)
    for end, tcp in ((client, link.client), (server, link.server)):
        assert verifyObject(IStreamTransport, end)
        assert end.kind == "tls" and end.tcp is tcp and isinstance(end.tls, SSL.Connection)
        assert end.getHandle() is end.tls
    assert client.tls.get_alpn_proto_negotiated() == b"mtop"
    assert client.negotiatedProtocol == b"mtop"
    assert client.getPeer() == link.client.getPeer() and server.getHost() == link.server.getHost()


def test_close_notify_from_the_peer_is_end_of_input_and_writes_go_on(contexts, data_path):
    link, client, server, client_proto, server_proto = make_pair(contexts)
    server.write(b"last words")
    server.loseWriteConnection()
    link.pump(fins=False)  # close_notify arrives, the TCP FIN not yet
    assert client_proto.data == b"last words" and client_proto.eofs == 1
    assert client_proto.reason is None and not link.client.write_shut and not link.client.closed
    # The other direction goes on (half-close).
    client.write(b"reply")
    link.pump()
    assert server_proto.data == b"reply"
    # The FIN after close_notify is not a second end of input.
    assert client_proto.eofs == 1 and client_proto.reason is None
    client.write(b"more")
    link.pump()
    assert server_proto.data == b"replymore"


def test_lose_write_connection_sends_close_notify_then_fin_and_reading_goes_on(contexts, data_path):
    link, client, server, client_proto, server_proto = make_pair(contexts)
    client.write(b"request")
    client.loseWriteConnection()
    # The record, close_notify, then the TCP FIN; the connection stays.
    (_, record), (_, close_notify), fin = link.client.events
    assert fin == ("fin",) and not link.client.closed
    client.write(b"ignored")  # nothing is written after close_notify
    assert link.client.late_writes == 0 and len(link.client.events) == 3
    server.dataReceived(record)
    assert server_proto.data == b"request" and server_proto.eofs == 0
    server.dataReceived(close_notify)
    assert server_proto.eofs == 1  # close_notify alone ends the input
    link.client.events[:2] = []
    link.pump()
    assert server_proto.eofs == 1 and server_proto.reason is None
    # Reading goes on.
    server.write(b"response")
    server.loseWriteConnection()
    link.pump()
    assert client_proto.data == b"response" and client_proto.eofs == 1
    # The server's side, done both ways, closed its TCP connection; the
    # client's protocol, told of its end of input, decides for its own.
    assert server_proto.reason.check(ConnectionDone) and link.server.closed
    assert client_proto.reason is None and not link.client.closed


def test_lose_connection_sends_close_notify_and_closes(contexts, data_path):
    link, client, server, client_proto, server_proto = make_pair(contexts)
    client.write(b"bye")
    client.loseConnection()
    assert client.disconnecting and link.client.events[-1] == ("close",)
    link.pump(fins=False)
    assert server_proto.data == b"bye" and server_proto.eofs == 1
    link.pump()
    assert client_proto.reason.check(ConnectionDone)
    server.loseConnection()
    link.pump()
    assert server_proto.reason.check(ConnectionDone)


def test_abort_sends_nothing_more(contexts, data_path):
    link, client, server, client_proto, server_proto = make_pair(contexts)
    client.abortConnection()
    client.write(b"after")
    assert link.client.events == [("abort",)]
    link.pump()
    assert client_proto.reason.check(ConnectionAborted) and server_proto.reason.check(ConnectionLost)
    assert server_proto.data == b"" and server_proto.eofs == 0


def test_corrupt_record_ends_the_connection_with_a_tls_error(contexts, data_path):
    link, client, server, client_proto, server_proto = make_pair(contexts)
    server.write(b"x" * 1000)
    record = bytearray(link.server.data())
    link.server.events.clear()
    record[-3] ^= 0xFF  # break the authentication tag
    client.dataReceived(bytes(record))
    assert client_proto.data == b""
    # An alert saying why, then the TCP connection is closed.
    assert [event[0] for event in link.client.events] == ["data", "close"]
    client.dataReceived(b"more")  # nothing more is read
    link.pump()
    assert client_proto.reason.check(SSL.Error) and client_proto.data == b"" and client_proto.eofs == 0
    # The peer hears the alert: its end fails too, with the reason.
    assert server_proto.reason.check(SSL.Error) and "bad record mac" in str(server_proto.reason.value)
    assert server_proto.eofs == 0


def test_data_written_during_the_handshake_goes_out_after_it(contexts, data_path):
    server_proto = Collector(on_handshake=b"+welcome")
    link, client, server, client_proto, server_proto = make_pair(contexts, server_proto=server_proto, connect=False)
    link.connect()
    client.write(b"early")
    client.write(b" bytes")
    client.loseWriteConnection()  # waits for the handshake too
    assert [event[0] for event in link.client.events] == ["data"]  # the ClientHello alone
    assert not link.client.write_shut
    link.pump()
    # What was written during the handshake comes first, before what the
    # protocol writes when it hears the handshake is done.
    assert server_proto.data == b"early bytes" and server_proto.eofs == 1
    assert client_proto.data == b"+welcome"
    assert client_proto.handshakes == server_proto.handshakes == 1
    assert link.client.write_shut and link.client.late_writes == 0


def test_handshake_time_writes_keep_their_order_with_the_handshake_listener(contexts, data_path):
    client_proto = Collector(on_handshake=b"+hello")
    link, client, server, client_proto, server_proto = make_pair(contexts, client_proto, connect=False)
    link.connect()
    client.write(b"early")
    link.pump()
    assert server_proto.data == b"early+hello"


def test_fin_during_the_handshake_fails_the_connection(contexts, data_path):
    link, client, server, client_proto, server_proto = make_pair(contexts, connect=False)
    link.connect()
    link.server.events.clear()  # the server never hears the ClientHello
    client.readConnectionLost()
    link.pump()
    assert client_proto.reason.check(SSL.Error) and "during the TLS handshake" in str(client_proto.reason.value)
    assert client_proto.handshakes == 0 and client_proto.eofs == 0


def test_fin_after_the_handshake_is_end_of_input(contexts, data_path):
    """A TCP FIN without close_notify (a peer that only shut TCP) still
    ends the input: the protocol hears it once."""
    link, client, server, client_proto, server_proto = make_pair(contexts)
    server.write(b"data")
    link.pump()
    client.readConnectionLost()
    assert client_proto.data == b"data" and client_proto.eofs == 1


def test_flow_control_is_the_tcp_transports(contexts, data_path):
    link, client, server, client_proto, server_proto = make_pair(contexts)

    @implementer(IPushProducer)
    class Producer:
        def pauseProducing(self):
            pass

        def resumeProducing(self):
            pass

        def stopProducing(self):
            pass

    producer = Producer()
    client.registerProducer(producer, True)
    assert link.client.producer is producer
    client.pauseProducing()
    assert link.client.paused
    client.resumeProducing()
    assert not link.client.paused
    client.unregisterProducer()
    assert link.client.producer is None
    client.setTcpNoDelay(True)
    assert link.client.no_delay and client.getTcpNoDelay()


def test_large_writes_give_their_buffer_back_only_on_the_fast_path(contexts, data_path):
    clock = Clock()
    link, client, server, client_proto, server_proto = make_pair(contexts, clock=clock)
    server.write(b"y" * 300_000)
    link.pump()
    assert bool(clock.getDelayedCalls()) == (data_path is not None)
    for _ in range(3):  # quiet for a whole period: the buffer is given back
        clock.advance(QUIET_SECONDS)
    assert not clock.getDelayedCalls()
    server.write(b"after")
    link.pump()
    assert client_proto.data == b"y" * 300_000 + b"after"


def test_the_server_prefers_aes_128_gcm_and_still_takes_what_a_client_insists_on(contexts, data_path):
    # Ours against ours: AES-128-GCM-SHA256, the server's first choice.
    link, client, server, client_proto, server_proto = make_pair(contexts)
    assert client.tls.get_cipher_name() == server.tls.get_cipher_name() == "TLS_AES_128_GCM_SHA256"
    # A client that offers only the others gets one of them (OpenSSL's
    # default client order puts AES-256 first: the server's order wins).
    server_ctx, _ = contexts
    for only in ("TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"):
        picky = SSL.Context(SSL.TLS_CLIENT_METHOD)
        picky.set_verify(SSL.VERIFY_NONE)
        picky.set_alpn_protos([b"mtop"])
        picky.set_tls13_ciphersuites(only.encode())
        link, client, server, client_proto, server_proto = make_pair((server_ctx, picky))
        assert server.tls.get_cipher_name() == only
        client.write(b"ping")
        link.pump()
        assert server_proto.data == b"ping"
    default_client = SSL.Context(SSL.TLS_CLIENT_METHOD)
    default_client.set_verify(SSL.VERIFY_NONE)
    link, client, server, client_proto, server_proto = make_pair((server_ctx, default_client))
    assert server.tls.get_cipher_name() == "TLS_AES_128_GCM_SHA256"
