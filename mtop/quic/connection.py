"""One QUIC connection driven from Twisted: `QuicDriver`.

aioquic's `QuicConnection` is sans-IO.  The driver feeds it the datagrams a
UDP port receives, sends what it produces, keeps its timer on the reactor,
and turns its events into calls on `QuicStreamTransport`\\ s.

Sending is batched: a datagram received, or a stream write, only schedules
a flush for the next turn of the event loop, so a burst of incoming
datagrams (one read of the UDP socket delivers many) or of writes is
answered by one call to ``datagrams_to_send``.

Flow control, both ways, per stream:

* **receiving**: aioquic doubles a stream's receive window whenever the
  peer has sent half of it, whatever the application did with the data, so
  a stream whose consumer stopped reading would buffer without bound.
  `FlowControlledConnection` instead keeps each window at "bytes the
  application consumed + ``stream_window``", so a paused stream stops the
  peer after at most one window;
* **sending**: aioquic buffers whatever is written.  The stream transport
  pauses its registered producer once aioquic holds more than
  ``SEND_HIGH_WATER`` unacknowledged bytes for the stream, and the driver
  resumes it below ``SEND_LOW_WATER`` after acknowledgements come in.
"""

from __future__ import annotations

import errno
import socket
from typing import TYPE_CHECKING, Any, Callable

from aioquic import tls
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import MAX_STREAM_DATA_FRAME_CAPACITY, QuicConnection
from aioquic.quic.packet import QuicFrameType

from mtop.config import DEFAULT_QUIC_PACKET_SIZE
from mtop.logs import logger
from mtop.timers import cancel

if TYPE_CHECKING:
    from mtop.quic.stream import QuicStreamTransport

#: Per-stream receive window: what a peer may send beyond what the
#: application has consumed.
STREAM_WINDOW = 1 << 20
#: Connection receive window to start with (aioquic doubles it as used; the
#: per-stream windows are what bounds memory).
CONNECTION_WINDOW = 16 << 20
#: Unacknowledged bytes per stream above which the writer is paused...
SEND_HIGH_WATER = 1 << 20
#: ... and below which it is resumed.
SEND_LOW_WATER = 256 << 10
#: UDP payload size.  There is no path MTU discovery, so the default fits
#: every usual path; on loopback or jumbo-frame LANs larger packets are much
#: faster (the per-packet cost in Python dominates).
MAX_DATAGRAM_SIZE = DEFAULT_QUIC_PACKET_SIZE
#: Socket buffers asked for, so bursts are not dropped by the kernel.
SOCKET_BUFFER = 4 << 20

#: Application error code for streams we abort (the original uses 0 too).
STREAM_ABORTED = 0


def tuned_configuration(**settings: Any) -> QuicConfiguration:
    """A `QuicConfiguration` with our windows, packet size and congestion
    control; ``settings`` are further `QuicConfiguration` fields."""
    settings.setdefault("max_datagram_size", MAX_DATAGRAM_SIZE)
    settings.setdefault("max_data", CONNECTION_WINDOW)
    settings.setdefault("max_stream_data", STREAM_WINDOW)
    settings.setdefault("congestion_control_algorithm", "reno")
    return QuicConfiguration(**settings)


def size_socket_buffers(port: Any, size: int = SOCKET_BUFFER) -> None:
    """Ask for ``size``-byte send and receive buffers on a Twisted UDP port's socket
    (``SO_RCVBUFFORCE`` when privileged, else up to the system's maximum)."""
    sock = port.getHandle()
    for force, plain in ((getattr(socket, "SO_RCVBUFFORCE", None), socket.SO_RCVBUF),
                         (getattr(socket, "SO_SNDBUFFORCE", None), socket.SO_SNDBUF)):
        for option in (force, plain):
            if option is None:
                continue
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, size)
                break
            except OSError:
                continue


class FlowControlledConnection(QuicConnection):
    """A `QuicConnection` whose stream receive windows follow what the
    application consumed (``consumed[stream_id]``), instead of doubling as
    data arrives."""

    def __init__(self, *, stream_window: int = STREAM_WINDOW, **kwargs: Any):
        super().__init__(**kwargs)
        self.stream_window = stream_window
        self.consumed: dict[int, int] = {}

    # No 0-RTT: a tunnel's first bytes are a login, and early data can be
    # replayed.  Servers issue tickets without the early-data permission and
    # decline early data a client offers anyway (the client then sends it
    # again as ordinary 1-RTT data).

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        if not self._is_client:
            self.tls._max_early_data = None

    def _update_traffic_key(self, direction: Any, epoch: Any, cipher_suite: Any, secret: bytes) -> None:
        if epoch == tls.Epoch.ZERO_RTT and not self._is_client:
            self.tls.early_data_accepted = False
            return
        super()._update_traffic_key(direction, epoch, cipher_suite, secret)

    def _write_stream_limits(self, builder: Any, space: Any, stream: Any) -> None:
        # Overrides aioquic's private hook (aioquic 1.x); the frame is built
        # exactly as aioquic builds it.
        if not stream.max_stream_data_local:
            return
        window = self.stream_window
        consumed = self.consumed.get(stream.stream_id, stream.receiver.highest_offset)
        wanted = consumed + window
        # Announce in steps of a quarter window, not per packet.
        if wanted - stream.max_stream_data_local >= window // 4:
            stream.max_stream_data_local = wanted
        if stream.max_stream_data_local_sent != stream.max_stream_data_local:
            buf = builder.start_frame(
                QuicFrameType.MAX_STREAM_DATA,
                capacity=MAX_STREAM_DATA_FRAME_CAPACITY,
                handler=self._on_max_stream_data_delivery,
                handler_args=(stream,),
            )
            buf.push_uint_var(stream.stream_id)
            buf.push_uint_var(stream.max_stream_data_local)
            stream.max_stream_data_local_sent = stream.max_stream_data_local

    def send_buffered(self, stream_id: int) -> int:
        """Bytes written to ``stream_id`` and not yet acknowledged."""
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        return len(stream.sender._buffer)


class QuicDriver:
    """Runs one `FlowControlledConnection` on the reactor.

    ``send(datagram, address)`` puts a datagram on the wire.  Subclasses
    (server and client side) say what happens when the handshake completes,
    when the peer opens a stream, and when the connection ends.
    """

    _log = logger()

    def __init__(self, reactor: Any, quic: FlowControlledConnection, send: Callable[[bytes, Any], None], peer: Any):
        self.reactor = reactor
        self.quic = quic
        self._send = send
        self.peer = peer  # a Twisted address, for getPeer
        self.host: Any = None
        self.streams: dict[int, QuicStreamTransport] = {}
        self._finished_ids: set[int] = set()
        self._write_blocked: set[QuicStreamTransport] = set()
        self._timer: Any = None
        self._timer_at: float | None = None
        self._flush_call: Any = None
        self.handshake_complete = False
        self.terminated = False
        self.close_reason: str | None = None

    # Input

    def datagram_received(self, data: bytes, address: Any) -> None:
        if self.terminated:
            return
        try:
            self.quic.receive_datagram(data, address, self.reactor.seconds())
        except Exception as e:  # malformed input must close, never escape
            self._log.debug("QUIC packet from {peer} rejected: {error!r}", peer=address, error=e)
            self.close(reason="bad packet")
            return
        self._process_events()
        if self.quic._close_event is not None:
            self.flush()
        else:
            self.schedule_flush()

    # Output

    def schedule_flush(self) -> None:
        """Send what aioquic has to send, on the next turn of the loop (so
        many writes or datagrams give one batch)."""
        if self._flush_call is None and not self.terminated:
            self._flush_call = self.reactor.callLater(0, self.flush)

    def flush(self) -> None:
        self._flush_call = None
        send = self._send
        for data, address in self.quic.datagrams_to_send(self.reactor.seconds()):
            try:
                send(data, address)
            except OSError as e:
                # A full socket buffer or an unreachable peer drops the
                # datagram; QUIC's loss recovery sends it again.
                if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS, errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    self._log.debug("QUIC send to {peer} failed: {error}", peer=address, error=e)
        if self._write_blocked:
            self._resume_writers()
        self._process_events()
        closing = self.quic._close_event
        if closing is not None:
            # aioquic reports the end only after the closing period (three
            # probe timeouts); the tunnels end now.
            self.abandon(describe_close(closing))
            return
        self._set_timer()

    def _set_timer(self) -> None:
        at = self.quic.get_timer()
        if at == self._timer_at and self._timer is not None and self._timer.active():
            return
        cancel(self._timer)
        self._timer = None
        self._timer_at = at
        if at is not None:
            self._timer = self.reactor.callLater(max(0.0, at - self.reactor.seconds()), self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer = None
        self._timer_at = None
        self.quic.handle_timer(self.reactor.seconds())
        self._process_events()
        self.flush()

    # Flow control of writers

    def write_blocked(self, stream: "QuicStreamTransport") -> None:
        self._write_blocked.add(stream)

    def _resume_writers(self) -> None:
        buffered = self.quic.send_buffered
        for stream in list(self._write_blocked):
            if stream.lost or buffered(stream.stream_id) <= SEND_LOW_WATER:
                self._write_blocked.discard(stream)
                stream.resume_writer()

    # Events

    def _process_events(self) -> None:
        quic = self.quic
        while True:
            event = quic.next_event()
            if event is None:
                return
            kind = type(event)
            if kind is events.StreamDataReceived:
                stream = self._stream_for(event.stream_id)
                if stream is not None:
                    stream.data_received(event.data, event.end_stream)
            elif kind is events.StreamReset:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.reset_by_peer(event.error_code)
            elif kind is events.StopSendingReceived:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.stopped_by_peer(event.error_code)
            elif kind is events.HandshakeCompleted:
                self.handshake_complete = True
                self.handshake_completed(event)
            elif kind is events.ConnectionTerminated:
                self._terminated(event)
                return
            elif kind is events.ConnectionIdIssued:
                self.connection_id_issued(event.connection_id)
            elif kind is events.ConnectionIdRetired:
                self.connection_id_retired(event.connection_id)

    def _stream_for(self, stream_id: int) -> "QuicStreamTransport | None":
        stream = self.streams.get(stream_id)
        if stream is not None or stream_id in self._finished_ids:
            return stream
        stream = self.accept_stream(stream_id)
        if stream is None:
            self._finished_ids.add(stream_id)
            self._refuse(stream_id)
        return stream

    def _refuse(self, stream_id: int) -> None:
        try:
            self.quic.stop_stream(stream_id, STREAM_ABORTED)
        except ValueError:
            pass
        try:
            self.quic.reset_stream(stream_id, STREAM_ABORTED)
        except ValueError:
            pass
        self.schedule_flush()

    def add_stream(self, stream: "QuicStreamTransport") -> None:
        self.streams[stream.stream_id] = stream
        self.quic.consumed[stream.stream_id] = 0

    def forget_stream(self, stream: "QuicStreamTransport") -> None:
        """``stream`` is closed for the application; data still arriving
        for it is dropped."""
        self.streams.pop(stream.stream_id, None)
        self.quic.consumed.pop(stream.stream_id, None)
        self._write_blocked.discard(stream)
        self._finished_ids.add(stream.stream_id)
        if len(self._finished_ids) > 4096:
            # aioquic discards finished streams and ignores their frames, so
            # only ids it still knows need remembering.
            known = self.quic._streams
            self._finished_ids = {i for i in self._finished_ids if i in known}
        self.stream_closed(stream)

    def _terminated(self, event: events.ConnectionTerminated) -> None:
        self.abandon(describe_close(event))

    def abandon(self, reason: str) -> None:
        """Stop driving the connection (it ended, or its socket is going
        away): timers off, every stream lost, `connection_terminated`."""
        if self.terminated:
            return
        self.terminated = True
        self.close_reason = reason
        for call in (self._timer, self._flush_call):
            cancel(call)
        self._timer = self._flush_call = None
        for stream in list(self.streams.values()):
            stream.connection_lost(reason)
        self.connection_terminated(reason)

    def close(self, error_code: int = 0, reason: str = "") -> None:
        """Close the whole connection (every stream on it)."""
        if self.terminated:
            return
        self.quic.close(error_code=error_code, reason_phrase=reason)
        self.flush()

    # For subclasses

    def accept_stream(self, stream_id: int) -> "QuicStreamTransport | None":
        """The peer opened ``stream_id``: a transport for it, or None to
        refuse it."""
        return None

    def handshake_completed(self, event: events.HandshakeCompleted) -> None:
        pass

    def stream_closed(self, stream: "QuicStreamTransport") -> None:
        pass

    def connection_terminated(self, reason: str) -> None:
        pass

    def connection_id_issued(self, cid: bytes) -> None:
        pass

    def connection_id_retired(self, cid: bytes) -> None:
        pass


def describe_close(event: events.ConnectionTerminated) -> str:
    """A sentence for why a connection ended."""
    phrase = event.reason_phrase or "no reason given"
    if event.error_code == 0 and not event.reason_phrase:
        return "closed"
    return f"{phrase} (error {event.error_code:#x})"
