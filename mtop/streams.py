"""Plain TCP as an `mtop.interfaces.IStreamTransport`.

TLS (`mtop.tlstransport.TLSTransport`) and QUIC streams
(`mtop.quic.stream.QuicStreamTransport`) provide the interface themselves;
Twisted's TCP connection does not, so the relay sees it through
`TCPStream`, a thin adapter that forwards every call.  The relay's hot
path (writes) does not go through it: `mtop.relay.writer_for` uses the
connection (``stream.tcp``) directly.
"""

from __future__ import annotations

from typing import Any

from zope.interface import implementer

from mtop import fastpath

from mtop.interfaces import IStreamTransport


def half_close(tcp: Any) -> None:
    """``tcp.loseWriteConnection()``; with the fast path, the FIN goes now
    when nothing is queued (`mtop.fastpath.FastPath.half_close`)."""
    if fastpath.active is not None:
        fastpath.active.half_close(tcp)
    else:
        tcp.loseWriteConnection()


@implementer(IStreamTransport)
class TCPStream:
    """``tcp`` (a Twisted TCP transport: ``ITCPTransport``, half-closeable)
    as an `IStreamTransport`."""

    __slots__ = ("tcp",)
    kind = "tcp"
    tls = None

    def __init__(self, tcp: Any):
        self.tcp = tcp

    @property
    def disconnecting(self) -> bool:
        return self.tcp.disconnecting

    # ITransport

    def write(self, data: bytes) -> None:
        self.tcp.write(data)

    def writeSequence(self, data: list[bytes]) -> None:
        self.tcp.writeSequence(data)

    def loseConnection(self) -> None:
        self.tcp.loseConnection()

    def loseWriteConnection(self) -> None:
        half_close(self.tcp)

    def abortConnection(self) -> None:
        self.tcp.abortConnection()

    def getPeer(self) -> Any:
        return self.tcp.getPeer()

    def getHost(self) -> Any:
        return self.tcp.getHost()

    # IConsumer

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.tcp.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.tcp.unregisterProducer()

    # IPushProducer

    def pauseProducing(self) -> None:
        self.tcp.pauseProducing()

    def resumeProducing(self) -> None:
        self.tcp.resumeProducing()

    def stopProducing(self) -> None:
        self.tcp.stopProducing()


def as_stream(transport: Any) -> IStreamTransport:
    """``transport`` itself if it provides `IStreamTransport`, else (a
    Twisted TCP transport) a `TCPStream` over it."""
    if IStreamTransport.providedBy(transport):
        return transport
    return TCPStream(transport)
