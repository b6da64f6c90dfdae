"""climber's QUIC servers (``servers[].type: quic``): tunnels as streams.

`QuicConnector` gives `climber.tunnel.TunnelOpener` what `ServerConnector`
gives it for TLS: ``connect(reactor, protocol, timeout)`` connects a
`climber.tunnel.ServerTunnel` to the server, here over a new stream of a pooled
QUIC connection (see `mtop.quic.client`).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from climber.config import ServerEntry
from mtop.logs import logger
from mtop.quic.client import QuicClientPool, client_configuration

#: QUIC idle timeout when tunnels never idle out (``idle_timeout: 0``);
#: keepalive PINGs hold connections with tunnels open anyway.
DEFAULT_IDLE = 300.0


class QuicConnector:
    """QUIC settings and the connection pool for one server."""

    _log = logger()

    def __init__(self, reactor: Any, entry: ServerEntry, idle_timeout: float = DEFAULT_IDLE):
        self.entry = entry
        configuration = client_configuration(
            entry.sni or entry.host, entry.proto, entry.ca or None, entry.insecure, idle_timeout or DEFAULT_IDLE,
            entry.quic_packet_size, entry.quic_backend,
        )
        self.pool = QuicClientPool(reactor, entry.host, entry.port, configuration, entry.max_streams)
        if entry.insecure:
            self._log.warn(
                "INSECURE: server {server} has insecure: true; its certificate is not verified and "
                "anyone on the path can read your traffic and password",
                server=entry.name,
            )

    def connect(self, reactor: Any, protocol: Any, timeout: float) -> Deferred:
        """Connect ``protocol`` over a new stream; fails with
        `mtop.quic.client.QuicConnectError` when no connection can be made."""

        def opened(stream: Any) -> Any:
            protocol.resumed = stream.driver.resumed
            return stream

        return self.pool.open(protocol, timeout).addCallback(opened)

    def save_session(self, tls: Any) -> None:
        """Sessions are the pool's business (QUIC tickets)."""

    def close(self) -> None:
        self.pool.close_all()
