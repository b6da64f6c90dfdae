"""The qh3 backend: `Connection`, qh3's `QuicConnection` (its packet path
is native code) held to the same contract as the aioquic backend, plus the
header and configuration helpers (the surface `mtop.quic.backend`
documents).

Where qh3 differs, and what is done about it:

* qh3 extends a stream's receive window as data is delivered, with no
  hook for what the application consumed.  `HOLDS_WINDOWS` is False, and
  the driver holds a connection's input while one of its streams has more
  than a window waiting (`mtop.quic.connection.QuicDriver.hold_input`).
* Its stream limit is fixed at 100: the limit given to the native core
  and the one announced in the transport parameters are replaced by
  ``max_streams``.
* Zero padding after a client's Initial packet counts toward the
  anti-amplification budget (`_header_with_padding`).
* A qh3 server accepts 0-RTT whenever a client offers it; here the
  server's tickets carry no early-data permission and early data offered
  anyway is declined, as with aioquic.
"""

from __future__ import annotations

from typing import Any

import qh3
import qh3.quic.connection as _qh3_connection
from qh3 import tls
from qh3._hazmat import Buffer
from qh3._hazmat import pull_quic_header as _pull_quic_header
from qh3.quic import events  # noqa: F401  (the adapter's event types)
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.packet import (
    QuicPacketType,
    encode_quic_version_negotiation,
    pull_quic_transport_parameters,
    push_quic_transport_parameters,
)
from qh3.tls import SessionTicket  # noqa: F401

from mtop.quic.backend import Header

NAME = "qh3"
VERSION = qh3.__version__
HOLDS_WINDOWS = False
SMALLEST_MAX_DATAGRAM_SIZE = 1200

_INITIAL = int(QuicPacketType.INITIAL)
_VERSION_NEGOTIATION = int(QuicPacketType.VERSION_NEGOTIATION)


def header(data: bytes, cid_length: int) -> Header:
    """The fields of a datagram's first packet header the listener routes
    by; ValueError when it is not a QUIC packet."""
    fields = _pull_quic_header(data, 0, cid_length)
    kind = fields[1]
    return Header(fields[0] or None, kind == _INITIAL, kind == _VERSION_NEGOTIATION, fields[3], fields[4])


def version_negotiation(source_cid: bytes, destination_cid: bytes, versions: list[int]) -> bytes:
    return encode_quic_version_negotiation(
        source_cid=source_cid, destination_cid=destination_cid, supported_versions=versions
    )


def configuration(**settings: Any) -> QuicConfiguration:
    """A `QuicConfiguration`.  Path MTU probing stays off: the configured
    packet size is what is sent (qh3's congestion control is its own)."""
    settings.pop("congestion_control_algorithm", None)
    settings.setdefault("probe_datagram_size", False)
    return QuicConfiguration(**settings)


# The native core takes its stream limit as an argument qh3 fixes at 100;
# the core is built through this stand-in, which substitutes the limit of
# the connection being set up.
_NativeCore = _qh3_connection.QuicConnectionCore
_CORE_PARAMETERS = [p.strip() for p in (_NativeCore.__text_signature__ or "()").strip("()").split(",")]
_core_stream_limit: list[int] = []


def _core(*args: Any, **kwargs: Any) -> Any:
    if _core_stream_limit and "local_max_streams_bidi" in _CORE_PARAMETERS:
        bound = dict(zip(_CORE_PARAMETERS, args))
        bound.update(kwargs)
        bound["local_max_streams_bidi"] = _core_stream_limit[-1]
        return _NativeCore(**bound)
    return _NativeCore(*args, **kwargs)


_qh3_connection.QuicConnectionCore = _core


# qh3 cuts a datagram into its packets and counts only the packets' bytes
# toward the server's anti-amplification budget (three times what the
# client sent).  aioquic's client pads its Initial datagram with zeros
# *after* the packet: a 1200-byte datagram counted as ~500 bytes leaves the
# server too little budget for its first flight, and qh3 fails the
# connection ("packet builder capacity exhausted").  Zero padding after a
# long-header packet is taken as part of that packet here, as RFC 9000
# 14.1 counts the whole datagram.
def _header_with_padding(data: Any, offset: int, cid_length: Any) -> Any:
    fields = _pull_quic_header(data, offset, cid_length)
    end = fields[9]
    size = len(data)
    if end < size and data.count(0, end) == size - end:
        return (*fields[:9], size)
    return fields


_qh3_connection._pull_quic_header = _header_with_padding


class Connection(_qh3_connection.QuicConnection):
    """qh3's connection with ``max_streams`` concurrent bidirectional
    streams for the peer and no 0-RTT (see the module's text)."""

    def __init__(self, *, stream_window: int, max_streams: int, **kwargs: Any):
        # stream_window: qh3 has no hook for it (see the module's text).
        super().__init__(**kwargs)
        self.max_streams = max_streams
        #: stream id -> the newest packet number that may carry its last data.
        self._fin_marks: dict[int, int] = {}

    # The adapter's surface

    @property
    def closing(self) -> bool:
        return self._close_event is not None

    @property
    def close_event(self) -> Any:
        return self._close_event

    def track(self, stream_id: int) -> None:
        pass

    def untrack(self, stream_id: int) -> None:
        pass

    def delivered(self, stream_id: int, size: int) -> None:
        pass

    def send_backlog(self, stream_id: int) -> int:
        """Bytes written to ``stream_id`` and not yet sent (qh3 does not
        tell sent from acknowledged per stream; what is in flight is bounded
        by the congestion window)."""
        try:
            return self.get_send_buffer_size(stream_id)
        except Exception:  # an unknown or finished stream
            return 0

    def data_acked(self, stream_id: int) -> bool:
        """Everything written to ``stream_id`` has been sent, and every
        packet that may carry it has been acknowledged (or declared lost,
        which puts its data back in the backlog)."""
        marks = self._fin_marks
        if self.send_backlog(stream_id):
            marks.pop(stream_id, None)
            return False
        core = self._core
        outstanding = core.outstanding_application_packets if core is not None else ()
        # Only packets that elicit an acknowledgement get one for sure.
        waiting = [number for number, _, eliciting in outstanding if eliciting]
        mark = marks.get(stream_id)
        if mark is None:
            if not waiting:
                return True
            mark = marks[stream_id] = max(waiting)
        return not any(number <= mark for number in waiting)

    def fin_settled(self, stream_id: int) -> None:
        """The driver waits no more for ``stream_id``'s FIN: its mark goes."""
        self._fin_marks.pop(stream_id, None)

    def knows_stream(self, stream_id: int) -> bool:
        return False

    # qh3 internals (qh3 2.1)

    # qh3 2.1 walks every datagram it sends for its QUIC logger even when
    # there is none: a header parse per packet (ours also looks at the
    # padding) and a copy, 5-8% of the sender's CPU in a bulk transfer.
    # Without a logger, these two do what qh3's do minus that walk.

    def datagrams_to_send(self, now: float) -> list:
        core = self._core
        if core is None or self._quic_logger is not None:
            return super().datagrams_to_send(now)
        datagrams = []
        call, poll = self._call_core, core.poll_transmit
        while (transmit := call(poll, now)) is not None:
            datagrams.append((transmit[0], transmit[1]))
        return datagrams

    def receive_many_datagrams(self, datagrams: list, addr: Any, now: float) -> None:
        core = self._core
        if core is None or self._quic_logger is not None or not self._handshake_complete or not datagrams:
            super().receive_many_datagrams(datagrams, addr, now)
            return
        self._call_core(core.receive_many_datagrams, datagrams, self._normalize_address(addr), now)
        self._drain_core()

    def _create_core(self, remote_addr: Any, initial_dcid: bytes, now: float) -> None:
        _core_stream_limit.append(self.max_streams)
        try:
            super()._create_core(remote_addr, initial_dcid, now)
        finally:
            _core_stream_limit.pop()

    def _create_tls(self, remote_source_cid: bytes | None) -> Any:
        bridge = super()._create_tls(remote_source_cid)
        context = bridge.tls
        context.handshake_extensions = [
            (kind, self._with_stream_limit(data) if kind == tls.ExtensionType.QUIC_TRANSPORT_PARAMETERS else data)
            for kind, data in context.handshake_extensions
        ]
        if not self._is_client:
            context._max_early_data = None
            install = context.update_traffic_key_cb

            def no_early_data(direction: Any, epoch: Any, cipher_suite: Any, secret: bytes) -> None:
                if epoch == tls.Epoch.ZERO_RTT:
                    context.early_data_accepted = False
                    return
                install(direction, epoch, cipher_suite, secret)

            context.update_traffic_key_cb = no_early_data
        return bridge

    def _with_stream_limit(self, data: bytes) -> bytes:
        parameters = pull_quic_transport_parameters(Buffer(data=data))
        parameters.initial_max_streams_bidi = self.max_streams
        buf = Buffer(capacity=len(data) + 16)
        push_quic_transport_parameters(buf, parameters)
        return buf.data

