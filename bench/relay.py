"""The plain relay baseline: a minimal SOCKS5 relay (no auth, CONNECT to
IPv4 literals only, no TLS) on Twisted, spliced like
``twisted.protocols.portforward`` with each transport the other's streaming
producer.  It is what one hop of Python relaying costs without TLS or MTop's
bookkeeping, the reference the tunnel figures can be compared to.

Run as ``python -m bench.relay``: it runs on the asyncio reactor (like
``twistd -r asyncio mtop``), prints one JSON line ``{"port": N}`` and serves
until killed.
"""

from __future__ import annotations

import json
import socket
import struct
import sys

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from zope.interface import implementer


@implementer(IHalfCloseableProtocol)
class _Side(Protocol):
    peer: "_Side | None" = None

    def dataReceived(self, data: bytes) -> None:
        self.peer.transport.write(data)

    def readConnectionLost(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.loseWriteConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason=None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.loseConnection()
            self.peer.peer = None
        self.peer = None


class _TargetSide(_Side):
    def __init__(self, client: "SocksRelay"):
        self.client = client

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        client = self.client
        self.peer, client.peer = client, self
        client.transport.registerProducer(self.transport, True)
        self.transport.registerProducer(client.transport, True)
        client.transport.write(b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00")
        client.state = "relay"
        if client.buffer:
            self.transport.write(client.buffer)
            client.buffer = b""
        client.transport.resumeProducing()


class _TargetFactory(ClientFactory):
    noisy = False

    def __init__(self, client: "SocksRelay"):
        self.client = client

    def buildProtocol(self, addr):
        return _TargetSide(self.client)

    def clientConnectionFailed(self, connector, reason) -> None:
        self.client.transport.write(b"\x05\x05\x00\x01\x00\x00\x00\x00\x00\x00")
        self.client.transport.loseConnection()


class SocksRelay(_Side):
    """One client: greeting, CONNECT request, then bytes both ways."""

    def __init__(self, reactor):
        self.reactor = reactor
        self.state = "greeting"
        self.buffer = b""

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)

    def dataReceived(self, data: bytes) -> None:
        if self.state == "relay":
            self.peer.transport.write(data)
            return
        self.buffer += data
        if self.state == "greeting":
            if len(self.buffer) < 2 or len(self.buffer) < 2 + self.buffer[1]:
                return
            self.buffer = self.buffer[2 + self.buffer[1] :]
            self.transport.write(b"\x05\x00")
            self.state = "request"
        if self.state == "request" and len(self.buffer) >= 10:
            if self.buffer[:4] != b"\x05\x01\x00\x01":
                self.transport.loseConnection()
                return
            host = socket.inet_ntoa(self.buffer[4:8])
            (port,) = struct.unpack("!H", self.buffer[8:10])
            self.buffer = self.buffer[10:]
            self.state = "connecting"
            self.transport.pauseProducing()
            self.reactor.connectTCP(host, port, _TargetFactory(self), timeout=10)


class SocksRelayFactory(Factory):
    noisy = False

    def __init__(self, reactor):
        self.reactor = reactor

    def buildProtocol(self, addr):
        return SocksRelay(self.reactor)


def main() -> None:
    from twisted.internet import asyncioreactor

    asyncioreactor.install()
    from twisted.internet import reactor

    port = reactor.listenTCP(0, SocksRelayFactory(reactor), backlog=4096, interface="127.0.0.1")
    print(json.dumps({"port": port.getHost().port}), flush=True)
    sys.stdout.flush()
    reactor.run()


if __name__ == "__main__":
    main()
