"""Listening services for ``server.listen`` addresses.

Socket activation: a listening TCP socket passed by systemd (a ``.socket``
unit: ``LISTEN_PID``/``LISTEN_FDS``) that is bound to a listen address is
adopted for it instead of binding a new one; configs stay as they are.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Mapping
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import AdoptedStreamServerEndpoint, TCP4ServerEndpoint, TCP6ServerEndpoint

from mtop.config import ListenAddress
from mtop.logs import logger


def _ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::", 0))
        return True
    except OSError:
        return False


_systemd_sockets: list[socket.socket] | None = None


def systemd_sockets(environ: Mapping[str, str] | None = None, start: int | None = None) -> list[socket.socket]:
    """The listening TCP sockets systemd passed and nobody adopted yet.

    ``environ`` and ``start`` are for tests."""
    global _systemd_sockets
    if _systemd_sockets is None:
        from twisted.python.systemd import ListenFDs

        if environ is None and start is None:
            # Importing twisted.internet.endpoints read the variables (and
            # removed them, so nobody adopts a socket twice); its systemd:
            # endpoint parser keeps what it found.
            from twisted.internet.endpoints import _SystemdParser

            passed = getattr(_SystemdParser, "_sddaemon", None) or ListenFDs.fromEnvironment()
        else:
            passed = ListenFDs.fromEnvironment(environ, start)
        found = []
        for fd in passed.inheritedDescriptors():
            try:
                sock = socket.socket(fileno=fd)
            except OSError:
                continue
            listening = sock.type == socket.SOCK_STREAM and sock.family in (socket.AF_INET, socket.AF_INET6)
            if listening and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                found.append(sock)
            else:
                sock.detach()
        _systemd_sockets = found
    return _systemd_sockets


def _bound_to(sock: socket.socket, address: ListenAddress) -> bool:
    host, port = sock.getsockname()[:2]
    if port != address.port:
        return False
    if address.host is None:
        return host in ("::", "0.0.0.0")
    try:
        return ipaddress.ip_address(host) == ipaddress.ip_address(address.host)
    except ValueError:
        return False


def _adopt(reactor: Any, address: ListenAddress) -> Any:
    for sock in systemd_sockets():
        if _bound_to(sock, address):
            systemd_sockets().remove(sock)
            family = sock.family
            # The endpoint closes the descriptor once the reactor has its copy.
            return AdoptedStreamServerEndpoint(reactor, sock.detach(), family)
    return None


def server_endpoint(reactor: Any, address: ListenAddress, backlog: int = 1024) -> Any:
    """A TCP server endpoint for ``address``: the socket systemd passed for
    it, if any; otherwise a new one.  No host means every interface, IPv4 and
    IPv6 on one dual-stack socket where the system has IPv6."""
    adopted = _adopt(reactor, address)
    if adopted is not None:
        return adopted
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
