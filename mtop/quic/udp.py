"""A Twisted UDP port that reads bursts: `BurstPort`.

With ``UDP_GRO`` (Linux 5.0+) the kernel hands the datagrams of one flow
that arrived together to one ``recvmsg``, with their size in a control
message; the protocol gets them as a list (``datagramsReceived(datagrams,
address)``), so a burst costs one system call and one call into the QUIC
driver instead of one each.  Where the option is refused the port reads
one datagram at a time, as Twisted's does.
"""

from __future__ import annotations

import errno
import socket
import sys
from typing import Any

from twisted.internet import udp
from twisted.python import log

SOL_UDP = getattr(socket, "SOL_UDP", 17)
UDP_GRO = 104
#: Largest burst one read returns (the kernel's GRO limit is 64 KiB).
BURST = 65535
_ANCILLARY = socket.CMSG_SPACE(4) if hasattr(socket, "CMSG_SPACE") else 0
_IGNORE = frozenset((errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR, errno.EMSGSIZE, errno.ENOBUFS))
_REFUSED = frozenset((errno.ECONNREFUSED,))


class BurstPort(udp.Port):
    """`twisted.internet.udp.Port`, reading bursts with ``UDP_GRO`` when the
    kernel allows it; the protocol must have ``datagramsReceived``."""

    gro = False

    def startListening(self) -> None:
        super().startListening()
        if _ANCILLARY:
            try:
                self.socket.setsockopt(SOL_UDP, UDP_GRO, 1)
                self.gro = True
            except OSError:
                pass

    def doRead(self) -> None:
        if not self.gro:
            super().doRead()
            return
        read = 0
        sock = self.socket
        v6 = self.addressFamily == socket.AF_INET6
        while read < self.maxThroughput:
            try:
                data, ancillary, _, address = sock.recvmsg(BURST, _ANCILLARY)
            except OSError as e:
                if e.errno in _IGNORE or e.errno in _REFUSED:
                    return
                raise
            read += len(data)
            if v6:
                address = address[:2]
            size = 0
            for level, kind, value in ancillary:
                if level == SOL_UDP and kind == UDP_GRO:
                    size = int.from_bytes(value[:4], sys.byteorder)
            try:
                if size and len(data) > size:
                    self.protocol.datagramsReceived([data[i:i + size] for i in range(0, len(data), size)], address)
                else:
                    self.protocol.datagramReceived(data, address)
            except BaseException:
                log.err()


def listen(reactor: Any, port: int, protocol: Any, interface: str) -> BurstPort:
    """``reactor.listenUDP`` with a `BurstPort`."""
    p = BurstPort(port, protocol, interface, BURST, reactor)
    p.startListening()
    return p
