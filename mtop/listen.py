"""Listening services for ``server.listen`` addresses."""

from __future__ import annotations

import socket
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint

from mtop.config import ListenAddress
from mtop.logs import logger


def _ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::", 0))
        return True
    except OSError:
        return False


def server_endpoint(reactor: Any, address: ListenAddress, backlog: int = 1024) -> Any:
    """A TCP server endpoint for ``address``.  No host means every interface,
    IPv4 and IPv6 on one dual-stack socket where the system has IPv6."""
    if address.host is None:
        if _ipv6_available():
            return TCP6ServerEndpoint(reactor, address.port, backlog=backlog, interface="::")
        return TCP4ServerEndpoint(reactor, address.port, backlog=backlog, interface="0.0.0.0")
    if ":" in address.host:
        return TCP6ServerEndpoint(reactor, address.port, backlog=backlog, interface=address.host)
    return TCP4ServerEndpoint(reactor, address.port, backlog=backlog, interface=address.host)


class ListenerService(Service):
    """Listens on an endpoint while running; logs the address actually bound
    (useful with port 0)."""

    _log = logger()

    def __init__(self, endpoint: Any, factory: Any, label: str, note: str = ""):
        self.endpoint = endpoint
        self.factory = factory
        self.label = label
        self.note = note
        self.port: Any = None
        self._listening: Deferred | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._listening = self.endpoint.listen(self.factory)
        self._listening.addCallbacks(self._listened, self._failed)

    def startService(self) -> None:
        if self._listening is None:
            self.privilegedStartService()
        super().startService()

    def _listened(self, port: Any) -> None:
        self.port = port
        host = port.getHost()
        shown = f"[{host.host}]:{host.port}" if ":" in host.host else f"{host.host}:{host.port}"
        self._log.info("{label} listening on {address}{note}", label=self.label, address=shown, port=host.port, note=self.note)

    def _failed(self, failure: Any) -> None:
        self._log.critical("{label} cannot listen: {error}", label=self.label, error=failure.getErrorMessage())
        from twisted.internet import reactor

        reactor.callLater(0, reactor.stop)

    def stopService(self) -> Deferred | None:
        super().stopService()
        self._listening = None
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None
