"""The QUIC adapter: MTop over QUIC (aioquic), presented to Twisted.

Every ``asyncio`` and ``aioquic`` import of the project lives in this
subpackage.  aioquic's `QuicConnection` is sans-IO; here it is driven from a
Twisted `DatagramProtocol`, with timers on the reactor, and each
bidirectional stream is presented to the existing protocol code (the
server's `TunnelProtocol`, climber's `ServerTunnel`) as a Twisted transport with
half-close and producer/consumer flow control.

Modules:

``connection``  one QUIC connection: datagrams in and out, timers, events,
                stream flow control in both directions;
``stream``      `QuicStreamTransport`, one stream as a Twisted transport;
``server``      the UDP listener that accepts connections (``server.type: quic``);
``client``      connections to a server, each carrying many streams.

The server and climber taps require Twisted's asyncio reactor when QUIC is
configured (`reactor_problem` says what to run otherwise).
"""

from __future__ import annotations

from typing import Any


def reactor_problem(reactor: Any, command: str) -> str | None:
    """Why ``reactor`` cannot serve QUIC (with ``command``, the line to run
    instead), or None when it can."""
    try:
        import aioquic  # noqa: F401
    except ImportError:
        return "QUIC needs the aioquic package: pip install 'mtop[quic]'"
    from twisted.internet.asyncioreactor import AsyncioSelectorReactor

    if not isinstance(reactor, AsyncioSelectorReactor):
        return (
            f"QUIC runs on Twisted's asyncio reactor, but this process runs {type(reactor).__name__}; "
            f"run: {command}"
        )
    return None
