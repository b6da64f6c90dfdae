"""At the QUIC layer, with the packets between the two ends in the test's
hands: a stream's FIN never rides with its last data, and leaves only after
that data is acknowledged (the original's client drops bytes that arrive
together with a stream's end).  Also: the stream limit a server announces,
and a paused reader holding its peer to a bounded amount of data.

The server end is the adapter's own driver on a fake clock; the client end
is the library's bare sans-IO connection, so what it reports is what came
off the wire.  Each test runs once per QUIC library."""

from __future__ import annotations

import ssl

import pytest
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock

from mtop.certs import init_certs
from mtop.quic import backend as backends
from mtop.quic.connection import HOLD_HIGH, HOLD_QUEUE, QuicDriver, new_connection, tuned_configuration
from mtop.quic.server import server_configuration
from mtop.quic.stream import QuicStreamTransport

pytestmark = pytest.mark.usefixtures("quic_backend")

SERVER = ("127.0.0.1", 4433)
CLIENT = ("127.0.0.1", 5555)


class Sender(Protocol):
    """Writes ``payload`` and ends its sending side once the client's
    first bytes arrive."""

    def __init__(self, payload: bytes):
        self.payload = payload
        self.received = b""

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.payload:
            self.transport.write(self.payload)
            self.payload = b""
            self.transport.loseWriteConnection()


class Driver(QuicDriver):
    def __init__(self, clock, quic, outbox, protocol_factory):
        super().__init__(clock, quic, lambda data, address: outbox.append(data), None)
        self.protocol_factory = protocol_factory
        self.protocols = []

    def accept_stream(self, stream_id):
        protocol = self.protocol_factory()
        self.protocols.append(protocol)
        stream = QuicStreamTransport(self, stream_id, protocol)
        stream.start()
        return stream


class Link:
    """A client connection and a server driver, and the datagrams between
    them (delivered only when the test says)."""

    def __init__(self, tmp_path, protocol_factory, max_streams: int = 512):
        paths = init_certs(str(tmp_path), ["localhost"], ["127.0.0.1"])
        self.clock = Clock()
        self.clock.advance(1000)
        self.to_server: list[bytes] = []
        self.to_client: list[bytes] = []
        client_config = tuned_configuration(
            "auto", is_client=True, alpn_protocols=["mtop"], server_name="localhost", verify_mode=ssl.CERT_NONE
        )
        self.client = new_connection(client_config)
        self.client.connect(SERVER, self.clock.seconds())
        self.client_send()
        library = backends.load("auto")
        first = library.header(self.to_server[0], client_config.connection_id_length)
        server_config = server_configuration(paths.server_crt, paths.server_key, "mtop", 30)
        quic = new_connection(server_config, max_streams, original_destination_connection_id=first.destination_cid)
        self.server = Driver(self.clock, quic, self.to_client, protocol_factory)
        self.events: list = []
        self.events_module = library.events

    def client_send(self) -> None:
        self.to_server.extend(data for data, _ in self.client.datagrams_to_send(self.clock.seconds()))

    def deliver_to_server(self) -> None:
        batch, self.to_server[:] = list(self.to_server), []
        for data in batch:
            self.server.datagram_received(data, CLIENT)
        self.turn()

    def deliver_to_client(self) -> None:
        batch, self.to_client[:] = list(self.to_client), []
        for data in batch:
            self.client.receive_datagram(data, SERVER, self.clock.seconds())
        while (event := self.client.next_event()) is not None:
            self.events.append(event)
        self.client_send()

    def turn(self, seconds: float = 0.0) -> None:
        self.clock.advance(seconds)

    def handshake(self) -> None:
        for _ in range(10):
            self.deliver_to_server()
            self.deliver_to_client()
            self.turn(0.001)
        assert any(type(e) is self.events_module.HandshakeCompleted for e in self.events)

    def stream_data(self, stream_id: int) -> list:
        return [e for e in self.events if type(e) is self.events_module.StreamDataReceived and e.stream_id == stream_id]


def test_the_fin_leaves_alone_after_the_data_is_acknowledged(tmp_path):
    payload = bytes(range(256)) * 20  # 5,120 bytes: inside the first congestion window
    link = Link(tmp_path, lambda: Sender(payload))
    link.handshake()
    stream_id = link.client.get_next_available_stream_id()
    link.client.send_stream_data(stream_id, b"go")
    link.client_send()
    link.deliver_to_server()
    assert link.server.protocols and link.server.protocols[0].received == b"go"

    # The data reaches the client; the client's acknowledgements are held.
    for _ in range(5):
        link.deliver_to_client()
        link.to_server.clear()
        link.turn(0.001)
    received = link.stream_data(stream_id)
    assert b"".join(e.data for e in received) == payload
    assert not any(e.end_stream for e in received), "the FIN came before the data was acknowledged"

    # Acknowledgements in: the FIN follows, in a frame without data.
    for _ in range(5):
        link.turn(0.03)  # past the client's ACK delay
        link.client_send()
        link.deliver_to_server()
        link.deliver_to_client()
    received = link.stream_data(stream_id)
    assert b"".join(e.data for e in received) == payload
    ends = [e for e in received if e.end_stream]
    assert len(ends) == 1 and ends[0].data == b"", ends


def test_the_server_announces_max_streams(tmp_path):
    link = Link(tmp_path, lambda: Sender(b""), max_streams=300)
    link.handshake()
    # 300 streams, each with data, without closing any: all reach the server.
    ids = []
    for _ in range(300):
        stream_id = link.client.get_next_available_stream_id()
        link.client.send_stream_data(stream_id, b"x")
        ids.append(stream_id)
    for _ in range(10):
        link.client_send()
        link.deliver_to_server()
        link.deliver_to_client()
        link.turn(0.01)
    assert len(link.server.protocols) == 300
    assert all(p.received == b"x" for p in link.server.protocols)


class Stalled(Protocol):
    """Stops reading (pauses its transport) at once."""

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        self.received = 0

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)


def test_a_paused_reader_bounds_what_the_peer_can_send(tmp_path):
    link = Link(tmp_path, Stalled)
    link.handshake()
    stream_id = link.client.get_next_available_stream_id()
    sent = 16 << 20
    link.client.send_stream_data(stream_id, b"\0" * sent)
    for _ in range(400):
        link.client_send()
        link.deliver_to_server()
        link.deliver_to_client()
        link.turn(0.005)
    (stream,) = link.server.streams.values()
    waiting = stream._inbox_size + link.server._held_size
    # One window (plus what was in flight when the reader stopped), never
    # the 16 MiB the client wants to send.
    assert 0 < waiting <= HOLD_HIGH + HOLD_QUEUE + (1 << 20), waiting
    # The reader resumes: everything arrives, nothing is lost.
    stream.resumeProducing()
    protocol = link.server.protocols[0]
    for _ in range(4000):
        if protocol.received == sent:
            break
        link.client_send()
        link.deliver_to_server()
        link.deliver_to_client()
        link.turn(0.005)
    assert protocol.received == sent


def test_gso_batches_join_runs_of_one_size_to_one_address():
    from mtop.quic.connection import GSO_BYTES, GSO_SEGMENTS, gso_batches

    a, b = ("127.0.0.1", 1), ("127.0.0.1", 2)
    full, short = b"x" * 1350, b"y" * 300
    batches = gso_batches([(full, a), (full, a), (short, a), (full, a), (full, b), (full, b), (full, b)])
    assert batches == [(full * 2 + short, a, 1350), (full, a, 0), (full * 3, b, 1350)]
    many = gso_batches([(full, a)] * (GSO_SEGMENTS + 1))
    per_send = min(GSO_SEGMENTS, GSO_BYTES // 1350)
    assert [(len(d), s) for d, _, s in many] == [(1350 * per_send, 1350), (1350 * (GSO_SEGMENTS + 1 - per_send), 1350)]


def test_a_burst_port_hands_a_burst_over_whole(tmp_path):
    """With UDP_GRO, datagrams that arrive together are read at once and
    reach the protocol as a list, each intact, in order."""
    import socket as _socket

    from twisted.internet import reactor as real_reactor

    from mtop.quic import udp

    class Collect:
        def __init__(self):
            self.single, self.bursts = [], []

        def makeConnection(self, transport):
            self.transport = transport

        def doStart(self):
            pass

        def doStop(self):
            pass

        def datagramReceived(self, data, address):
            self.single.append(data)

        def datagramsReceived(self, datagrams, address):
            self.bursts.append(list(datagrams))

    protocol = Collect()
    port = udp.BurstPort(0, protocol, "127.0.0.1", udp.BURST, real_reactor)
    port.startListening()
    try:
        real_reactor.removeReader(port)  # read by hand below
        sent = [bytes([i]) * 1200 for i in range(8)] + [b"z" * 500]
        with _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM) as s:
            s.connect(("127.0.0.1", port.getHost().port))
            batch = b"".join(sent)
            try:
                s.sendmsg([batch], [(17, 103, (1200).to_bytes(2, "little"))])
            except OSError:
                for data in sent:
                    s.send(data)
        import time

        time.sleep(0.1)
        port.doRead()
        got = protocol.single + [d for burst in protocol.bursts for d in burst]
        assert got == sent
        if port.gro:
            assert protocol.bursts, "no burst read although UDP_GRO is on"
    finally:
        port.stopListening()


def test_the_fin_follows_promptly_when_the_client_has_ended_its_side(tmp_path):
    """The client sends its request and its FIN; the server answers and
    ends its side: the FIN must reach the client after one more exchange,
    even though the server's last packets (acknowledging the client's FIN)
    elicit no acknowledgement of their own."""
    link = Link(tmp_path, lambda: Sender(b"pong" * 5))
    link.handshake()
    stream_id = link.client.get_next_available_stream_id()
    link.client.send_stream_data(stream_id, b"ping", end_stream=True)
    link.client_send()
    for _ in range(40):  # 40 x 30 ms of fake time, everything delivered
        link.deliver_to_server()
        link.deliver_to_client()
        link.turn(0.03)
        if any(e.end_stream for e in link.stream_data(stream_id)):
            break
    received = link.stream_data(stream_id)
    assert b"".join(e.data for e in received) == b"pong" * 5
    assert any(e.end_stream for e in received), "no FIN within 1.2 s"


def test_ended_stream_ids_are_pruned_in_passes_not_per_stream(tmp_path):
    """A long-lived connection remembers a bounded number of ended stream
    ids, and pruning them is amortised: one pass per FINISHED_KEPT / 2
    ended streams (a pass per stream made tunnel setup slow once a
    connection had carried 4,096 tunnels)."""
    from mtop.quic.connection import FINISHED_KEPT

    link = Link(tmp_path, Protocol)
    link.handshake()
    ended = 4 * FINISHED_KEPT
    passes = 0
    for n in range(ended):
        before = len(link.server._finished_ids)
        stream = QuicStreamTransport(link.server, 4 * n, Protocol())
        link.server.add_stream(stream)
        link.server.forget_stream(stream)
        after = len(link.server._finished_ids)
        if after <= before:  # this forget ran a pruning pass
            passes += 1
            assert after <= FINISHED_KEPT // 2 + 1
    assert len(link.server._finished_ids) <= FINISHED_KEPT
    assert 4 * (ended - 1) in link.server._finished_ids  # the newest are kept
    assert 4 * (ended - FINISHED_KEPT // 2) in link.server._finished_ids
    assert passes <= (ended - FINISHED_KEPT) // (FINISHED_KEPT // 2) + 1


class Recorder(Protocol):
    def connectionMade(self) -> None:
        self.chunks: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)


def test_a_streams_data_from_one_burst_is_handed_on_in_one_piece(tmp_path):
    """The pieces of a stream's data read in one turn reach its protocol as
    one write (with several streams interleaved, one per packet was a
    system call per 1.3 KB); an event of another kind between them hands on
    what came before it first, and nothing after it is lost."""
    link = Link(tmp_path, Recorder)
    link.handshake()
    events = link.events_module
    queued = [
        events.StreamDataReceived(data=b"a1", end_stream=False, stream_id=0),
        events.StreamDataReceived(data=b"b1", end_stream=False, stream_id=4),
        events.StreamDataReceived(data=b"a2", end_stream=False, stream_id=0),
        events.ConnectionIdIssued(connection_id=b"\x01" * 8),
        events.StreamDataReceived(data=b"a3", end_stream=False, stream_id=0),
        events.StreamDataReceived(data=b"b2", end_stream=False, stream_id=4),
        events.StreamDataReceived(data=b"a4", end_stream=False, stream_id=0),
    ]
    real = link.server.quic.next_event
    link.server.quic.next_event = lambda: queued.pop(0) if queued else real()
    link.server._process_events(hand_on=False)  # as after a burst of input
    first, second = link.server.protocols
    assert (first.chunks, second.chunks) == ([b"a1a2"], [b"b1"])  # handed on before the other event
    link.server.flush()  # the flush the input scheduled
    assert (first.chunks, second.chunks) == ([b"a1a2", b"a3a4"], [b"b1", b"b2"])
