"""Port forwards: every connection accepted on a local port is tunnelled to
one fixed target, like ``ssh -L``."""

from __future__ import annotations

from climber.frontend import Climber, LocalConnection
from climber.tunnel import TunnelError


class ForwardConnection(LocalConnection):
    """A connection to a forwarded port; there is no handshake of its own."""

    kind = "forward"
    needs_handshake = False

    def __init__(self, climber: Climber, timeout: float, host: str, port: int):
        super().__init__(climber, timeout)
        self.forward_host = host
        self.forward_port = port

    def connectionMade(self) -> None:
        super().connectionMade()
        self.open_tunnel(self.forward_host, self.forward_port)

    def tunnel_failed(self, error: TunnelError) -> None:
        # Nothing to say in-band: the application sees the connection close.
        self.close_after(b"")
