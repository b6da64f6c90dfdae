"""One QUIC connection driven from Twisted: `QuicDriver`.

The QUIC library (aioquic or qh3, `mtop.quic.backend`) is sans-IO.  The
driver feeds its connection the datagrams a UDP port receives, sends what
it produces, keeps its timer on the reactor, and turns its events into
calls on `QuicStreamTransport`\\ s.

Sending is batched: a datagram received, or a stream write, only schedules
a flush for the next turn of the event loop, so a burst of incoming
datagrams (one read of the UDP socket delivers many) or of writes is
answered by one call to ``datagrams_to_send``.

Flow control, both ways, per stream:

* **receiving**: both libraries extend a stream's receive window as data
  arrives, whatever the application did with it, so a stream whose
  consumer stopped reading would buffer without bound.  The aioquic
  backend keeps each window at "bytes the application consumed +
  ``stream_window``", so a paused stream stops the peer after one window.
  qh3 has no such hook: the driver holds the connection's input while a
  stream has more than `HOLD_HIGH` bytes waiting (`QuicDriver.hold_input`);
* **sending**: the library buffers whatever is written.  The stream
  transport pauses its registered producer once more than
  ``SEND_HIGH_WATER`` bytes of the stream wait (unacknowledged with
  aioquic, unsent with qh3), and the driver resumes it below
  ``SEND_LOW_WATER``.

A stream's FIN is sent once the data before it is acknowledged (`FIN_WAIT`
at most), in a frame of its own (`QuicDriver.send_fin`): the original's
client loses the bytes that arrive together with a stream's end.
"""

from __future__ import annotations

import errno
import socket
import sys
from typing import TYPE_CHECKING, Any, Callable

from mtop.quic import backend as backends
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
#: Concurrent bidirectional streams a server lets a client open on one
#: connection (``quic.max_streams``); the original's client opens streams
#: on one connection without a deadline, and one past the limit stalls it.
DEFAULT_MAX_STREAMS = 512
#: Longest a FIN waits for the acknowledgement of the data before it.
FIN_WAIT = 0.1
#: Ids of ended streams remembered per connection (so late frames for
#: them do not open a new stream); pruned to the newest half past this.
FINISHED_KEPT = 4096
#: A backend that does not hold windows to consumption (qh3): a
#: connection's input is held while one of its streams has more than this
#: many bytes waiting for a paused reader...
HOLD_HIGH = STREAM_WINDOW
#: ... and let go below this.
HOLD_LOW = STREAM_WINDOW // 4
#: Datagrams kept while input is held (later ones are dropped; the peer
#: sends them again).
HOLD_QUEUE = 1 << 20
#: While input is held, one kept datagram is let through this often, so
#: neither side's idle timeout ends the connection.
HOLD_TRICKLE = 1.0


def tuned_configuration(backend: str = "auto", **settings: Any) -> Any:
    """A QUIC configuration of the library ``backend`` names
    (`mtop.quic.backend`), with our windows and packet size; ``settings``
    are further fields of it."""
    settings.setdefault("max_datagram_size", MAX_DATAGRAM_SIZE)
    settings.setdefault("max_data", CONNECTION_WINDOW)
    settings.setdefault("max_stream_data", STREAM_WINDOW)
    return backends.load(backend).configuration(**settings)


def new_connection(configuration: Any, max_streams: int = DEFAULT_MAX_STREAMS, **kwargs: Any) -> Any:
    """A sans-IO connection (the backend's ``Connection``) for
    ``configuration``, with our stream window; ``kwargs`` go to the
    library's ``QuicConnection``."""
    return backends.of(configuration).Connection(
        configuration=configuration, stream_window=STREAM_WINDOW, max_streams=max_streams, **kwargs
    )


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


class QuicDriver:
    """Runs one sans-IO connection (the backend's ``Connection``) on the
    reactor.

    ``send(datagram, address)`` puts a datagram on the wire.  Subclasses
    (server and client side) say what happens when the handshake completes,
    when the peer opens a stream, and when the connection ends.
    """

    _log = logger()

    def __init__(self, reactor: Any, quic: Any, send: Callable[[bytes, Any], None], peer: Any):
        self.reactor = reactor
        self.quic = quic
        self.events = backends.of(quic.configuration).events
        self._holds_windows = backends.of(quic.configuration).HOLDS_WINDOWS
        #: The library's call taking a burst of datagrams, if it has one.
        self._receive_many = getattr(quic, "receive_many_datagrams", None)
        self._send = send
        self.peer = peer  # a Twisted address, for getPeer
        self.host: Any = None
        self.streams: dict[int, QuicStreamTransport] = {}
        self._finished_ids: set[int] = set()
        self._write_blocked: set[QuicStreamTransport] = set()
        #: Streams whose FIN waits until their data is acknowledged.
        self._fins: set[int] = set()
        #: Streams with more than `HOLD_HIGH` bytes waiting (qh3), and the
        #: datagrams kept meanwhile.
        self._holding: set[QuicStreamTransport] = set()
        self._held: list[tuple[bytes, Any]] = []
        self._held_size = 0
        self._trickle: Any = None
        self._timer: Any = None
        self._timer_at: float | None = None
        self._flush_call: Any = None
        #: Stream data read but not handed on yet: stream -> [pieces, fin].
        self._arrived: dict[QuicStreamTransport, list] = {}
        self.handshake_complete = False
        self.terminated = False
        self.close_reason: str | None = None

    # Input

    def datagram_received(self, data: bytes, address: Any) -> None:
        if self.terminated:
            return
        if self._holding:
            if self._held_size + len(data) <= HOLD_QUEUE:
                self._held.append((data, address))
                self._held_size += len(data)
            return
        self._feed(data, address)
        self._answer()

    def _answer(self) -> None:
        """After input: send at once when closing, else on the next turn."""
        if self.quic.close_event is not None:
            self.flush()
        else:
            self.schedule_flush()

    def datagrams_received(self, datagrams: list[bytes], address: Any) -> None:
        """A burst from one address (`mtop.quic.udp.BurstPort`): fed to the
        library in one call where it takes bursts (qh3)."""
        if self.terminated:
            return
        many = self._receive_many
        if self._holding or many is None:
            for data in datagrams:
                self.datagram_received(data, address)
            return
        try:
            many(datagrams, address, self.reactor.seconds())
        except Exception as e:  # malformed input must close, never escape
            self._log.debug("QUIC packets from {peer} rejected: {error!r}", peer=address, error=e)
            self.close(reason="bad packet")
            return
        self._process_events(hand_on=False)
        self._answer()

    def _feed(self, data: bytes, address: Any) -> None:
        try:
            self.quic.receive_datagram(data, address, self.reactor.seconds())
        except Exception as e:  # malformed input must close, never escape
            self._log.debug("QUIC packet from {peer} rejected: {error!r}", peer=address, error=e)
            self.close(reason="bad packet")
            return
        self._process_events(hand_on=False)

    # Holding input (backends that extend windows as data arrives)

    def hold_input(self, stream: "QuicStreamTransport") -> None:
        """``stream`` has more than `HOLD_HIGH` bytes its reader has not
        taken: stop feeding the connection's datagrams to the library (they
        are kept, up to `HOLD_QUEUE` bytes) until it drains, so the peer is
        slowed by missing acknowledgements instead of filling memory."""
        if self._holds_windows or self.terminated:
            return
        self._holding.add(stream)
        if self._trickle is None:
            self._trickle = self.reactor.callLater(HOLD_TRICKLE, self._let_one_through)

    def release_input(self, stream: "QuicStreamTransport") -> None:
        """``stream`` drained (or ended): feed what was kept once no stream
        holds the connection."""
        self._holding.discard(stream)
        if self._holding or self.terminated:
            return
        cancel(self._trickle)
        self._trickle = None
        held, self._held, self._held_size = self._held, [], 0
        for data, address in held:
            if self.terminated:
                return
            self._feed(data, address)
        self.schedule_flush()

    def _let_one_through(self) -> None:
        self._trickle = None
        if not self._holding or self.terminated:
            return
        if self._held:
            data, address = self._held.pop(0)
            self._held_size -= len(data)
            self._feed(data, address)
            self.schedule_flush()
        self._trickle = self.reactor.callLater(HOLD_TRICKLE, self._let_one_through)

    # Output

    def schedule_flush(self) -> None:
        """Send what the library has to send, on the next turn of the loop
        (so many writes or datagrams give one batch)."""
        if self._flush_call is None and not self.terminated:
            self._flush_call = self.reactor.callLater(0, self.flush)

    def flush(self) -> None:
        self._flush_call = None
        if self._arrived:
            self._hand_on()
        if self._fins:
            self._send_fins()
        send = self._send
        try:
            datagrams = self.quic.datagrams_to_send(self.reactor.seconds())
        except Exception as e:  # the library failed on its own state: end it
            self._library_failed("send", e)
            return
        sock = self.socket() if len(datagrams) > 1 else None
        if sock is not None and _gso[0]:
            batches = gso_batches(datagrams)
        else:
            batches = [(data, address, 0) for data, address in datagrams]
        for data, address, segment in batches:
            try:
                if segment:
                    sock.sendmsg([data], [(SOL_UDP, UDP_SEGMENT, segment.to_bytes(2, "little"))], 0, address)
                else:
                    send(data, address)
            except OSError as e:
                if segment and e.errno in GSO_UNSUPPORTED:
                    _gso[0] = False  # the kernel or route cannot: one by one from now on
                    for offset in range(0, len(data), segment):
                        self._send_one(send, data[offset:offset + segment], address)
                    continue
                self._dropped(address, e)
        if self._write_blocked:
            self._resume_writers()
        self._process_events()
        closing = self.quic.close_event
        if closing is not None:
            # The library reports the end only after the closing period
            # (three probe timeouts); the tunnels end now.
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

    def socket(self) -> Any:
        """The UDP socket (for sending bursts with GSO), or None."""
        return None

    def _send_one(self, send: Callable[[bytes, Any], None], data: bytes, address: Any) -> None:
        try:
            send(data, address)
        except OSError as e:
            self._dropped(address, e)

    def _dropped(self, address: Any, e: OSError) -> None:
        # A full socket buffer or an unreachable peer drops the datagram;
        # QUIC's loss recovery sends it again.
        if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS, errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
            self._log.debug("QUIC send to {peer} failed: {error}", peer=address, error=e)

    def _library_failed(self, doing: str, error: Exception) -> None:
        self._log.debug("QUIC library error ({doing}) with {peer}: {error!r}", doing=doing, peer=self.peer, error=error)
        self.abandon(f"QUIC library error: {error}")

    def _timer_fired(self) -> None:
        self._timer = None
        self._timer_at = None
        try:
            self.quic.handle_timer(self.reactor.seconds())
        except Exception as e:
            self._library_failed("timer", e)
            return
        self._process_events()
        self.flush()

    # FIN after the data is acknowledged

    def send_fin(self, stream_id: int) -> None:
        """End ``stream_id``'s sending side: the FIN goes in a frame of its
        own once everything written before it is acknowledged.  The
        original's client drops the bytes that arrive together with a
        stream's end; this way none do."""
        self._fins.add(stream_id)
        self.schedule_flush()
        self.reactor.callLater(FIN_WAIT, self._fin_due, stream_id)

    def _fin_due(self, stream_id: int) -> None:
        """`FIN_WAIT` has passed: the FIN goes now, acknowledged or not (a
        peer that stopped acknowledging must not keep the stream open)."""
        if stream_id in self._fins and not self.terminated:
            self._fin_now(stream_id)
            self.schedule_flush()

    def _send_fins(self) -> None:
        acked = self.quic.data_acked
        for stream_id in [i for i in self._fins if acked(i)]:
            self._fin_now(stream_id)

    def _fin_now(self, stream_id: int) -> None:
        self._fin_settled(stream_id)
        try:
            self.quic.send_stream_data(stream_id, b"", end_stream=True)
        except Exception:  # the stream was reset meanwhile
            pass

    def _fin_settled(self, stream_id: int) -> None:
        """No FIN waits for ``stream_id`` any more (sent, or not wanted)."""
        self._fins.discard(stream_id)
        self.quic.fin_settled(stream_id)

    def cancel_fin(self, stream_id: int) -> bool:
        """No FIN for ``stream_id`` after all (it is being reset); whether
        one was waiting."""
        if stream_id in self._fins:
            self._fin_settled(stream_id)
            return True
        return False

    # Flow control of writers

    def write_blocked(self, stream: "QuicStreamTransport") -> None:
        self._write_blocked.add(stream)

    def _resume_writers(self) -> None:
        backlog = self.quic.send_backlog
        for stream in list(self._write_blocked):
            if stream.lost or backlog(stream.stream_id) <= SEND_LOW_WATER:
                self._write_blocked.discard(stream)
                stream.resume_writer()

    # Events

    def _process_events(self, hand_on: bool = True) -> None:
        """Hand the library's events on.  A stream's data is gathered
        (`_arrived`) and goes to it in one piece: after the input of one
        turn of the loop (``hand_on`` false: the flush that input scheduled
        hands it on), else when the events are read, and before any event
        of another kind.  With several streams interleaved each packet's
        piece would otherwise be a write of its own to the local socket (a
        system call per 1.3 KB)."""
        quic = self.quic
        events = self.events
        arrived = self._arrived
        while True:
            event = quic.next_event()
            if event is None:
                break
            kind = type(event)
            if kind is events.StreamDataReceived:
                stream = self._stream_for(event.stream_id)
                if stream is not None:
                    pending = arrived.get(stream)
                    if pending is None:
                        arrived[stream] = [[event.data], event.end_stream]
                    else:
                        pending[0].append(event.data)
                        pending[1] = pending[1] or event.end_stream
                continue
            if arrived:
                self._hand_on()
                arrived = self._arrived
            if kind is events.StreamReset:
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.reset_by_peer(event.error_code)
            elif kind is events.StopSendingReceived:
                self._fin_settled(event.stream_id)
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
        if self._arrived and hand_on:
            self._hand_on()

    def _hand_on(self) -> None:
        arrived = self._arrived
        self._arrived = {}
        for stream, (pieces, fin) in arrived.items():
            stream.data_received(pieces[0] if len(pieces) == 1 else b"".join(pieces), fin)

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
        except Exception:
            pass
        try:
            self.quic.reset_stream(stream_id, STREAM_ABORTED)
        except Exception:
            pass
        self.schedule_flush()

    def add_stream(self, stream: "QuicStreamTransport") -> None:
        self.streams[stream.stream_id] = stream
        self.quic.track(stream.stream_id)

    def forget_stream(self, stream: "QuicStreamTransport") -> None:
        """``stream`` is closed for the application; data still arriving
        for it is dropped."""
        self.streams.pop(stream.stream_id, None)
        self.quic.untrack(stream.stream_id)
        self._write_blocked.discard(stream)
        if stream in self._holding:
            self.release_input(stream)
        finished = self._finished_ids
        finished.add(stream.stream_id)
        if len(finished) > FINISHED_KEPT:
            # Only ids the library still knows, or recent ones, need
            # remembering: it ignores frames of streams it has discarded.
            # Keeping half leaves room for FINISHED_KEPT / 2 more before
            # the next pass (keeping all that fit ran a pass per stream).
            known = self.quic.knows_stream
            recent = max(finished) - 4 * (FINISHED_KEPT // 2)
            self._finished_ids = {i for i in finished if i > recent or known(i)}
        self.stream_closed(stream)

    def _terminated(self, event: Any) -> None:
        self.abandon(describe_close(event))

    def abandon(self, reason: str) -> None:
        """Stop driving the connection (it ended, or its socket is going
        away): timers off, every stream lost, `connection_terminated`."""
        if self.terminated:
            return
        if self._arrived:
            self._hand_on()  # what came before the end reaches the streams first
        self.terminated = True
        self.close_reason = reason
        for call in (self._timer, self._flush_call, self._trickle):
            cancel(call)
        self._timer = self._flush_call = self._trickle = None
        self._held, self._held_size, self._fins = [], 0, set()
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

    def handshake_completed(self, event: Any) -> None:
        pass

    def stream_closed(self, stream: "QuicStreamTransport") -> None:
        pass

    def connection_terminated(self, reason: str) -> None:
        pass

    def connection_id_issued(self, cid: bytes) -> None:
        pass

    def connection_id_retired(self, cid: bytes) -> None:
        pass


#: UDP generic segmentation offload (Linux 4.18+): one ``sendmsg`` carries
#: a burst of same-size datagrams, cut by the kernel.
SOL_UDP = getattr(socket, "SOL_UDP", 17)
UDP_SEGMENT = 103
#: Segments per GSO send (the kernel's limit is 64) and bytes per send.
GSO_SEGMENTS = 64
GSO_BYTES = 65000
#: Errors meaning the path cannot do GSO (then datagrams go one by one).
GSO_UNSUPPORTED = frozenset(
    e for e in (errno.EIO, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOPROTOOPT, getattr(errno, "ENOTSUP", None)) if e
)
#: Whether GSO is used (switched off for the process at the first refusal).
_gso = [sys.platform == "linux"]


def gso_batches(datagrams: list[tuple[bytes, Any]]) -> list[tuple[bytes, Any, int]]:
    """``datagrams`` as (payload, address, segment size) sends: runs of
    datagrams to one address of one size (the last of a run may be
    shorter) joined for one GSO ``sendmsg``; segment size 0 for a datagram
    sent alone."""
    batches: list[tuple[bytes, Any, int]] = []
    run: list[bytes] = []
    size = 0
    to = None

    def close() -> None:
        if len(run) == 1:
            batches.append((run[0], to, 0))
        elif run:
            batches.append((b"".join(run), to, size))

    for data, address in datagrams:
        n = len(data)
        if run and address == to and n <= size and len(run) < GSO_SEGMENTS and (len(run) + 1) * size <= GSO_BYTES:
            run.append(data)
            if n < size:  # a shorter one ends the run
                close()
                run = []
            continue
        close()
        run, size, to = [data], n, address
    close()
    return batches


def describe_close(event: Any) -> str:
    """A sentence for why a connection ended."""
    phrase = event.reason_phrase or "no reason given"
    if event.error_code == 0 and not event.reason_phrase:
        return "closed"
    return f"{phrase} (error {event.error_code:#x})"
