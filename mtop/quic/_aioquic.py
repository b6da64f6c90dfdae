"""The aioquic backend: `Connection`, aioquic's `QuicConnection` with
receive windows that follow what the application consumed, a configurable
stream limit, and no 0-RTT; plus the header and configuration helpers the
adapter needs (the surface `mtop.quic.backend` documents)."""

from __future__ import annotations

from typing import Any

import aioquic
from aioquic import tls
from aioquic.buffer import Buffer
from aioquic.quic import events  # noqa: F401  (the adapter's event types)
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration  # noqa: F401
from aioquic.quic.connection import MAX_STREAM_DATA_FRAME_CAPACITY, QuicConnection
from aioquic.quic.packet import QuicFrameType, QuicPacketType, encode_quic_version_negotiation, pull_quic_header
from aioquic.tls import SessionTicket  # noqa: F401

from mtop.quic.backend import Header

NAME = "aioquic"
VERSION = aioquic.__version__
#: The library holds each stream's receive window to what the application
#: consumed (`Connection.delivered`), so the adapter need not hold input.
HOLDS_WINDOWS = True


def header(data: bytes, cid_length: int) -> Header:
    """The fields of a datagram's first packet header the listener routes
    by; ValueError when it is not a QUIC packet."""
    h = pull_quic_header(Buffer(data=data), host_cid_length=cid_length)
    return Header(
        h.version,
        h.packet_type == QuicPacketType.INITIAL,
        h.packet_type == QuicPacketType.VERSION_NEGOTIATION,
        h.destination_cid,
        h.source_cid,
    )


def version_negotiation(source_cid: bytes, destination_cid: bytes, versions: list[int]) -> bytes:
    return encode_quic_version_negotiation(
        source_cid=source_cid, destination_cid=destination_cid, supported_versions=versions
    )


def configuration(**settings: Any) -> QuicConfiguration:
    """A `QuicConfiguration`; Reno congestion control (aioquic's CUBIC costs
    more per packet in Python and gained nothing on the paths measured)."""
    settings.setdefault("congestion_control_algorithm", "reno")
    return QuicConfiguration(**settings)


class Connection(QuicConnection):
    """aioquic's connection, held to the adapter's contract:

    * each stream's receive window is "bytes the application consumed
      (`delivered`) + ``stream_window``", not aioquic's doubling as data
      arrives, so a paused stream stops the peer after one window;
    * ``max_streams`` concurrent bidirectional streams for the peer;
    * no 0-RTT: a tunnel's first bytes are a login, and early data can be
      replayed.  Servers issue tickets without the early-data permission
      and decline early data a client offers anyway (the client then sends
      it again as ordinary 1-RTT data)."""

    def __init__(self, *, stream_window: int, max_streams: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.stream_window = stream_window
        self._local_max_streams_bidi.value = max_streams
        self._consumed: dict[int, int] = {}

    # The adapter's surface

    @property
    def closing(self) -> bool:
        """The connection is closing or closed (no new streams on it)."""
        return self._close_event is not None or self._close_pending

    @property
    def close_event(self) -> Any:
        """The `events.ConnectionTerminated` once it is closing, else None."""
        return self._close_event

    def track(self, stream_id: int) -> None:
        self._consumed[stream_id] = 0

    def untrack(self, stream_id: int) -> None:
        self._consumed.pop(stream_id, None)

    def delivered(self, stream_id: int, size: int) -> None:
        """``size`` more bytes of ``stream_id`` were handed to the application."""
        consumed = self._consumed
        if stream_id in consumed:
            consumed[stream_id] += size

    def send_backlog(self, stream_id: int) -> int:
        """Bytes written to ``stream_id`` and not yet acknowledged."""
        stream = self._streams.get(stream_id)
        return 0 if stream is None else len(stream.sender._buffer)

    def data_acked(self, stream_id: int) -> bool:
        """Everything written to ``stream_id`` has been acknowledged."""
        return self.send_backlog(stream_id) == 0

    def fin_settled(self, stream_id: int) -> None:
        """The driver waits no more for ``stream_id``'s FIN (nothing kept here)."""

    def knows_stream(self, stream_id: int) -> bool:
        return stream_id in self._streams

    # aioquic's private hooks (aioquic 1.x)

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
        # The frame is built exactly as aioquic builds it.
        if not stream.max_stream_data_local:
            return
        window = self.stream_window
        consumed = self._consumed.get(stream.stream_id, stream.receiver.highest_offset)
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
