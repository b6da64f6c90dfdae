"""mtop.websocket in memory: the stream's framing, half-close marker,
keep-alive and dead-peer cut, and the client address behind proxies."""

from __future__ import annotations

import ipaddress

import pytest
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

from mtop.websocket import WebSocketStream, forwarded_client


class Lower:
    """What a WebSocketStream runs on: records writes and closes."""

    tcp = tls = None
    disconnecting = False

    def __init__(self):
        self.written = b""
        self.closed = self.aborted = False
        self.paused = 0

    def write(self, data):
        self.written += data

    def loseConnection(self):
        self.closed = True

    def abortConnection(self):
        self.aborted = True

    def pauseProducing(self):
        self.paused += 1

    def getPeer(self):
        return None


class Recorder(Protocol):
    def __init__(self):
        self.data = b""
        self.eof = False
        self.lost = False

    def dataReceived(self, data):
        self.data += data

    def readConnectionLost(self):
        self.eof = True

    def connectionLost(self, reason=None):
        self.lost = True


def server_stream(clock, ping=30.0):
    """A server-side stream past the handshake, and a wsproto client
    connection playing the peer."""
    lower, inner = Lower(), Recorder()
    ws = Connection(ConnectionType.SERVER)
    stream = WebSocketStream(lower, ws, clock, ping)
    stream.attach(inner)
    return stream, lower, inner, Connection(ConnectionType.CLIENT)


def events(peer: Connection, lower: Lower):
    peer.receive_data(lower.written)
    lower.written = b""
    return list(peer.events())


def test_bytes_go_as_binary_messages_and_come_back_as_bytes():
    stream, lower, inner, peer = server_stream(Clock())
    stream.write(b"hello")
    stream.writeSequence([b"a", b"b"])
    got = events(peer, lower)
    assert [e.data for e in got] == [b"hello", b"ab"] and all(isinstance(e, BytesMessage) for e in got)
    stream.receive(peer.send(BytesMessage(data=b"up")) + peer.send(BytesMessage(data=b"")))
    assert inner.data == b"up"


def test_half_close_is_an_empty_text_message_both_ways():
    stream, lower, inner, peer = server_stream(Clock())
    stream.loseWriteConnection()
    stream.write(b"after")  # nothing goes after the marker
    got = events(peer, lower)
    assert len(got) == 1 and isinstance(got[0], TextMessage) and got[0].data == ""
    stream.receive(peer.send(BytesMessage(data=b"still")) + peer.send(TextMessage(data="")))
    assert inner.data == b"still" and inner.eof
    # The tunnel is over: a close frame, then the connection.
    stream.loseConnection()
    got = events(peer, lower)
    assert isinstance(got[0], CloseConnection) and got[0].code == 1000 and lower.closed


def test_text_with_data_is_refused_with_1003():
    stream, lower, inner, peer = server_stream(Clock())
    stream.receive(peer.send(TextMessage(data="x")))
    got = events(peer, lower)
    assert isinstance(got[0], CloseConnection) and got[0].code == 1003 and lower.closed
    assert inner.data == b""


def test_a_frame_announcing_gigabytes_is_streamed_not_buffered():
    stream, lower, inner, peer = server_stream(Clock())
    header = b"\x82\xff" + (1 << 40).to_bytes(8, "big") + b"\x00\x00\x00\x00"  # masked, key 0
    stream.receive(header + b"a" * 1000)
    assert inner.data == b"a" * 1000  # delivered as it came


def test_pings_keep_it_alive_and_a_silent_peer_is_cut():
    clock = Clock()
    stream, lower, inner, peer = server_stream(clock, ping=30.0)
    clock.advance(30)
    assert any(isinstance(e, Ping) for e in events(peer, lower))
    stream.receive(peer.send(Pong()))
    clock.advance(30)  # heard from since the last ping: another ping
    assert any(isinstance(e, Ping) for e in events(peer, lower)) and not lower.aborted
    clock.advance(30)  # nothing at all for a whole interval after a ping
    assert lower.aborted


def test_a_ping_is_answered():
    stream, lower, inner, peer = server_stream(Clock())
    stream.receive(peer.send(Ping(payload=b"p")))
    got = events(peer, lower)
    assert isinstance(got[0], Pong) and got[0].payload == b"p"


def test_no_pings_when_the_interval_is_zero():
    clock = Clock()
    stream, lower, inner, peer = server_stream(clock, ping=0)
    clock.advance(1000)
    assert lower.written == b"" and not clock.getDelayedCalls()


def test_the_client_queues_writes_until_the_upgrade_is_accepted():
    lower, inner = Lower(), Recorder()
    ws = WSConnection(ConnectionType.CLIENT)
    stream = WebSocketStream(lower, ws, Clock(), 30.0, opened=False)
    stream.attach(inner)
    stream.write(b"auth")
    assert lower.written == b""


TRUSTED = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("10.0.0.0/8"))


@pytest.mark.parametrize(
    "headers, peer, client",
    [
        ([(b"x-forwarded-for", b"203.0.113.9")], "127.0.0.1", "203.0.113.9"),
        # The nearest untrusted address: a client cannot prepend a lie.
        ([(b"x-forwarded-for", b"198.51.100.1, 203.0.113.9, 10.1.1.1")], "127.0.0.1", "203.0.113.9"),
        ([(b"forwarded", b'for=192.0.2.60;proto=http, for="[2001:db8::1]:4711"')], "127.0.0.1", "2001:db8::1"),
        # Forwarded wins over X-Forwarded-For.
        ([(b"x-forwarded-for", b"203.0.113.9"), (b"forwarded", b"for=192.0.2.60")], "127.0.0.1", "192.0.2.60"),
        ([(b"x-forwarded-for", b"203.0.113.9:1234")], "127.0.0.1", "203.0.113.9"),
        # An untrusted peer: the header is ignored.
        ([(b"x-forwarded-for", b"203.0.113.9")], "192.0.2.1", None),
        # Junk or "unknown": no address from it.
        ([(b"x-forwarded-for", b"not-an-ip")], "127.0.0.1", None),
        ([(b"forwarded", b"for=unknown")], "127.0.0.1", None),
        ([], "127.0.0.1", None),
    ],
)
def test_forwarded_client(headers, peer, client):
    assert forwarded_client(headers, peer, TRUSTED) == client


def test_nobody_is_trusted_by_default():
    assert forwarded_client([(b"x-forwarded-for", b"203.0.113.9")], "127.0.0.1", ()) is None
