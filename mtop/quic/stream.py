"""`QuicStreamTransport`: one bidirectional QUIC stream as a Twisted
transport, so the MTop protocol code runs unchanged over QUIC.

What maps to what:

* ``write`` -> stream data; ``loseWriteConnection`` -> FIN (reading goes
  on); a FIN from the peer -> ``readConnectionLost`` (for an
  ``IHalfCloseableProtocol``; others are closed);
* ``loseConnection`` -> FIN after the data written, plus STOP_SENDING when
  the peer has not finished; ``abortConnection`` -> RESET_STREAM and
  STOP_SENDING;
* a RESET_STREAM or STOP_SENDING from the peer, or the loss of the whole
  connection, -> ``connectionLost`` with a `ConnectionLost` failure; both
  directions finished -> ``connectionLost`` with `ConnectionDone`;
* ``pauseProducing`` stops delivering data (kept here, at most one receive
  window, since the window is only extended as data is delivered);
  ``registerProducer`` producers are paused while the library holds more
  than a high-water mark of the stream's data;
* ``loseWriteConnection`` and ``loseConnection`` send the FIN once what
  was written is acknowledged (`QuicDriver.send_fin`).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IConsumer,
    IHalfCloseableProtocol,
    IProtocol,
    IPushProducer,
    ITransport,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from mtop.interfaces import IStreamTransport
from mtop.quic.connection import HOLD_HIGH, HOLD_LOW, SEND_HIGH_WATER, STREAM_ABORTED, QuicDriver
from mtop.timers import cancel


@implementer(ITransport, IPushProducer, IConsumer, IStreamTransport)
class QuicStreamTransport:
    """The transport of one stream of ``driver``'s connection
    (`mtop.interfaces.IStreamTransport`: ``kind`` ``quic``, no TCP, no TLS
    connection of its own)."""

    kind = "quic"
    tcp = None
    tls = None
    connected = True
    disconnecting = False
    lost = False
    _read_done = False
    _write_done = False
    _paused = False
    _inbox_fin = False
    _producer: Any = None
    _producer_paused = False
    #: Bytes in ``_inbox``, and whether they hold the connection's input.
    _inbox_size = 0
    _holding = False

    def __init__(self, driver: QuicDriver, stream_id: int, protocol: IProtocol):
        self.driver = driver
        self.stream_id = stream_id
        self.protocol = protocol
        self._inbox: list[bytes] = []
        self._lost_call: Any = None
        driver.add_stream(self)

    def start(self) -> None:
        """Connect the protocol (``makeConnection``)."""
        self.protocol.makeConnection(self)

    # Events from the driver

    def data_received(self, data: bytes, fin: bool) -> None:
        if self.lost or self._read_done or self.disconnecting:
            return
        if self._paused or self._inbox:
            if data:
                self._inbox.append(data)
                self._inbox_size += len(data)
                if self._inbox_size > HOLD_HIGH and not self._holding:
                    self._holding = True
                    self.driver.hold_input(self)
            self._inbox_fin = self._inbox_fin or fin
            return
        if data:
            self._deliver(data)
        if fin:
            self._end_of_input()

    def reset_by_peer(self, error_code: int) -> None:
        self._abort_both()
        self._lose(Failure(ConnectionLost(f"the peer reset the QUIC stream (error {error_code})")))

    def stopped_by_peer(self, error_code: int) -> None:
        # aioquic has already reset our sending side.
        self._write_done = True
        if not self._read_done:
            self._stop_reading()
        self._lose(Failure(ConnectionLost(f"the peer stopped reading the QUIC stream (error {error_code})")))

    def connection_lost(self, reason: str) -> None:
        self._lose(Failure(ConnectionLost(f"QUIC connection lost: {reason}")))

    def resume_writer(self) -> None:
        if self._producer is not None and self._producer_paused:
            self._producer_paused = False
            self._producer.resumeProducing()

    # Delivery

    def _deliver(self, data: bytes) -> None:
        self.driver.quic.delivered(self.stream_id, len(data))
        self.protocol.dataReceived(data)

    def _end_of_input(self) -> None:
        self._read_done = True
        if IHalfCloseableProtocol.providedBy(self.protocol):
            self.protocol.readConnectionLost()
        else:
            self.loseConnection()
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self._read_done and self._write_done and not self.lost:
            self._lose_soon(Failure(ConnectionDone("the QUIC stream ended both ways")))

    # ITransport

    def write(self, data: bytes) -> None:
        if self._write_done or self.lost or self.disconnecting or not data:
            return
        driver = self.driver
        driver.quic.send_stream_data(self.stream_id, bytes(data))
        driver.schedule_flush()
        if (
            self._producer is not None
            and not self._producer_paused
            and driver.quic.send_backlog(self.stream_id) > SEND_HIGH_WATER
        ):
            self._producer_paused = True
            driver.write_blocked(self)
            self._producer.pauseProducing()

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def loseWriteConnection(self) -> None:
        """Send FIN after what was written; reading goes on."""
        if self._write_done or self.lost or self.disconnecting:
            return
        self._send_fin()
        self._maybe_done()

    def loseConnection(self) -> None:
        """FIN after what was written; the peer is asked to stop sending."""
        if self.lost or self.disconnecting:
            return
        self.disconnecting = True
        if not self._write_done:
            self._send_fin()
        if not self._read_done:
            self._stop_reading()
        self._lose_soon(Failure(ConnectionDone("the QUIC stream was closed")))

    def abortConnection(self) -> None:
        if self.lost:
            return
        self.disconnecting = True
        self._abort_both()
        self._lose_soon(Failure(ConnectionAborted("the QUIC stream was reset")))

    def getPeer(self) -> Any:
        return self.driver.peer

    def getHost(self) -> Any:
        return self.driver.host

    # IConsumer

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self._producer = producer
        self._producer_paused = False
        if not streaming:
            producer.resumeProducing()

    def unregisterProducer(self) -> None:
        self._producer = None
        self._producer_paused = False

    # IPushProducer

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        if not self._paused:
            return
        self._paused = False
        if self._inbox and not self.lost:
            data = b"".join(self._inbox)
            self._inbox.clear()
            self._inbox_size = 0
            self._deliver(data)
        if self._holding and self._inbox_size <= HOLD_LOW:
            self._holding = False
            self.driver.release_input(self)
        if self._inbox_fin and not self._inbox and not self._paused and not self.lost and not self._read_done:
            self._inbox_fin = False
            self._end_of_input()
        # The receive window has moved: tell the peer.
        self.driver.schedule_flush()

    def stopProducing(self) -> None:
        self.abortConnection()

    # Internals

    def _send_fin(self) -> None:
        self._write_done = True
        self.driver.send_fin(self.stream_id)

    def _stop_reading(self) -> None:
        self._read_done = True
        self._inbox.clear()
        self._inbox_size = 0
        try:
            self.driver.quic.stop_stream(self.stream_id, STREAM_ABORTED)
        except Exception:  # the library refuses (the stream is gone)
            pass
        self.driver.schedule_flush()

    def _abort_both(self) -> None:
        # A FIN still waiting for acknowledgements is replaced by a reset.
        if self.driver.cancel_fin(self.stream_id) or not self._write_done:
            self._write_done = True
            try:
                self.driver.quic.reset_stream(self.stream_id, STREAM_ABORTED)
            except Exception:  # the library refuses (the stream is gone)
                pass
        if not self._read_done:
            self._stop_reading()
        self.driver.schedule_flush()

    def _lose_soon(self, reason: Failure) -> None:
        """connectionLost on the next turn, as a TCP transport does (never
        from inside the protocol's own call)."""
        if self._lost_call is None and not self.lost:
            self._lost_call = self.driver.reactor.callLater(0, self._lose, reason)

    def _lose(self, reason: Failure) -> None:
        cancel(self._lost_call)
        self._lost_call = None
        if self.lost:
            return
        self.lost = True
        self.connected = False
        self._read_done = self._write_done = True
        self._inbox.clear()
        self._inbox_size = 0
        self._producer = None
        self.driver.forget_stream(self)
        self.protocol.connectionLost(reason)
