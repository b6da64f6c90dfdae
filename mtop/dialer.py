"""Outbound connections to tunnel targets.

Domain names are resolved (by the reactor's resolver, getaddrinfo in a
thread by default), IPv4 and IPv6 addresses are tried Happy-Eyeballs style by
``HostnameEndpoint``, and the whole attempt has one deadline.  Cancelling the
returned Deferred (the client left) cancels the attempt.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint


class Dialer:
    def __init__(self, reactor: Any, connect_timeout: float = 10.0):
        self.reactor = reactor
        self.connect_timeout = connect_timeout

    def connect(self, host: str, port: int, factory: Any) -> Deferred:
        endpoint = HostnameEndpoint(self.reactor, host, port, timeout=self.connect_timeout)
        d = endpoint.connect(factory)
        d.addTimeout(self.connect_timeout, self.reactor)
        return d
