"""The QUIC adapter: MTop over QUIC (qh3 or aioquic), presented to Twisted.

Every ``asyncio``, ``aioquic`` and ``qh3`` import of the project lives in
this subpackage.  Both libraries are sans-IO (`backend` chooses one: qh3,
whose packet path is native code, when installed); here a connection is
driven from a Twisted `DatagramProtocol`, with timers on the reactor, and each
bidirectional stream is presented to the existing protocol code (the
server's `TunnelProtocol`, climber's `ServerTunnel`) as a Twisted transport with
half-close and producer/consumer flow control.

Modules:

``backend``     which library: ``quic.backend`` (``_qh3``, ``_aioquic``:
                the only modules that import one);
``connection``  one QUIC connection: datagrams in and out, timers, events,
                stream flow control in both directions;
``stream``      `QuicStreamTransport`, one stream as a Twisted transport;
``server``      the UDP listener that accepts connections (``server.type: quic``);
``client``      connections to a server, each carrying many streams.

QUIC runs on Twisted's asyncio reactor.  When QUIC is configured and no
reactor is installed yet (``twistd mtop`` without ``-r``), the taps install
it (`install_reactor`); otherwise twistd's default stays (epoll on Linux,
which costs less per TCP connection).  A reactor chosen with ``-r`` that
cannot host QUIC is a usage error (`reactor_problem` says what to run).
"""

from __future__ import annotations

from typing import Any


def install_reactor() -> None:
    """Install Twisted's asyncio reactor unless a reactor is installed
    already (``twistd -r ...``, or an earlier import of
    ``twisted.internet.reactor``), which is then left as it is."""
    import sys

    if "twisted.internet.reactor" in sys.modules:
        return
    from twisted.internet import asyncioreactor

    asyncioreactor.install()


def reactor_problem(reactor: Any, command: str) -> str | None:
    """Why ``reactor`` cannot serve QUIC (with ``command``, the line to run
    instead), or None when it can."""
    from mtop.quic.backend import installed

    if not installed():
        return "QUIC needs the qh3 or the aioquic package: pip install 'mtop[quic]'"
    from twisted.internet.asyncioreactor import AsyncioSelectorReactor

    if not isinstance(reactor, AsyncioSelectorReactor):
        return (
            f"QUIC runs on Twisted's asyncio reactor, but this process runs {type(reactor).__name__}; "
            f"run twistd without -r (it picks the asyncio reactor for QUIC by itself) or: {command}"
        )
    return None
