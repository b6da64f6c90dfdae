"""Listening on a TCP address: endpoints and the service that listens.

Used by everything that accepts connections: the server's TLS listeners
(`mtop.listeners`), the metrics listener and climber's proxies and port
forwards.  Outbound connections are elsewhere (`mtop.dialer`,
`climber.tunnel`).

Socket activation: a listening TCP socket passed by systemd (a ``.socket``
unit: ``LISTEN_PID``/``LISTEN_FDS``) that is bound to a listen address is
adopted for it instead of binding a new one; configs stay as they are.

A server TLS listener with ``server.tcp_fast_open: N`` gets ``TCP_FASTOPEN``
(queue length N) on its listening socket once it listens; a kernel that
refuses it gets one warning and the listener goes on without it.

A listener that cannot listen does not stop anything itself: it logs one
critical line naming the address and the cause and raises `ListenFailed`
from its start; the tap's root service (`mtop.startup.TapService`) decides
what that means for the process.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Mapping
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import AdoptedStreamServerEndpoint, TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.python.failure import Failure

from mtop.config import ListenAddress, ListenerConfig
from mtop.logs import logger

#: The accept queue of every listening socket we open.
BACKLOG = 1024
#: Linux's ``TCP_FASTOPEN`` (23), should the socket module lack it.
TCP_FASTOPEN = getattr(socket, "TCP_FASTOPEN", 23)


class ListenFailed(Exception):
    """A listener could not listen; the message is the sentence already
    logged, e.g. ``MTop TLS cannot listen on 127.0.0.1:8443: address
    already in use``."""


def listen_failure_cause(error: BaseException) -> str:
    """Why listening failed, as the end of a sentence: ``address already in
    use``, ``permission denied``, ..."""
    if isinstance(error, CannotListenError) and error.socketError is not None:
        error = error.socketError
    text = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    return text[:1].lower() + text[1:]


def listen_failed(log: Any, label: str, address: Any, error: BaseException) -> ListenFailed:
    """Log the one critical line of a listener that cannot listen on
    ``address``; the `ListenFailed` to raise."""
    cause = listen_failure_cause(error)
    log.critical("{label} cannot listen on {address}: {cause}", label=label, address=str(address), cause=cause)
    return ListenFailed(f"{label} cannot listen on {address}: {cause}")


def ipv6_available() -> bool:
    """Whether this system can bind IPv6 sockets (an IPv6-less kernel or
    container cannot)."""
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


def listening_endpoint(reactor: Any, address: ListenAddress, backlog: int = BACKLOG) -> Any:
    """A TCP server endpoint (`IStreamServerEndpoint`) for ``address``: the
    socket systemd passed for it, if any; otherwise a new one.  No host
    means every interface, IPv4 and IPv6 on one dual-stack socket where the
    system has IPv6."""
    adopted = _adopt(reactor, address)
    if adopted is not None:
        return adopted
    if address.host is None:
        if ipv6_available():
            return TCP6ServerEndpoint(reactor, address.port, backlog=backlog, interface="::")
        return TCP4ServerEndpoint(reactor, address.port, backlog=backlog, interface="0.0.0.0")
    if ":" in address.host:
        return TCP6ServerEndpoint(reactor, address.port, backlog=backlog, interface=address.host)
    return TCP4ServerEndpoint(reactor, address.port, backlog=backlog, interface=address.host)


class ListeningService(Service):
    """Listens on an endpoint while running (an `IService`); logs the
    address actually bound (useful with port 0).

    The endpoint listens in `privilegedStartService` (before twistd sheds
    root), or in `startService` when started without it.  If it cannot, the
    service logs one critical line and raises `ListenFailed` from there.
    Every endpoint we use answers at once; one that fails later is only
    logged (nobody is left to raise to)."""

    _log = logger()
    #: The server listener's config, for a server TLS listener
    #: (`mtop.listeners.TLSListener` sets it): its ``tcp_fast_open`` is
    #: set on the listening socket.
    listener: ListenerConfig | None = None

    def __init__(self, endpoint: Any, factory: Any, label: str, address: ListenAddress, note: str = ""):
        """``address``: what ``endpoint`` listens on, as configured (for
        the log lines); ``note``: the end of the listening line."""
        self.endpoint = endpoint
        self.factory = factory
        self.label = label
        self.address = address
        self.note = note
        self.port: Any = None
        self._listening: Deferred | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        if self._listening is None:
            self._listen()
        super().startService()

    def _listen(self) -> None:
        failed: list[ListenFailed] = []

        def failure(reason: Failure) -> None:
            failed.append(listen_failed(self._log, self.label, self.address, reason.value))

        self._listening = self.endpoint.listen(self.factory)
        self._listening.addCallbacks(self._listened, failure)
        if failed:
            self._listening = None
            raise failed[0]

    def _listened(self, port: Any) -> None:
        self.port = port
        if self.listener is not None and self.listener.tcp_fast_open:
            self._set_fast_open(port, self.listener.tcp_fast_open)
        host = port.getHost()
        shown = f"[{host.host}]:{host.port}" if ":" in host.host else f"{host.host}:{host.port}"
        self._log.info("{label} listening on {address}{note}", label=self.label, address=shown, port=host.port, note=self.note)

    def _set_fast_open(self, port: Any, queue: int) -> None:
        """Set ``TCP_FASTOPEN`` (``queue``: pending Fast Open requests at
        most) on ``port``'s listening socket, which Linux takes after
        listen() too; through a copy of its descriptor (``fileno`` is
        public, the port's socket object is not).  Servers issue Fast Open
        cookies only with bit 2 of ``net.ipv4.tcp_fastopen`` set (2 or 3)."""
        try:
            with socket.socket(fileno=os.dup(port.fileno())) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN, queue)
        except OSError as e:
            self._log.warn(
                "{label} on {address}: server.tcp_fast_open is {queue} but the kernel refused it ({error}); "
                "listening without TCP Fast Open",
                label=self.label,
                address=str(self.address),
                queue=queue,
                error=e.strerror or str(e),
            )

    def stop_accepting(self) -> Deferred | None:
        """Close the listening socket (a drain begins); connections already
        accepted go on."""
        if self.port is None:
            return None
        port, self.port = self.port, None
        return port.stopListening()

    def stopService(self) -> Deferred | None:
        super().stopService()
        self._listening = None
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None
