"""Outbound connections to tunnel targets, through the destination ACL.

Domain names are resolved (by the reactor's resolver, getaddrinfo in a
thread by default) and every resolved address is judged by the
`mtop.acl.DestinationACL`; only allowed addresses are tried, IPv4 and IPv6
Happy-Eyeballs style by ``HostnameEndpoint``, so a name resolving to a
refused address can never be reached (no second resolution that could
answer differently).  The whole attempt has one deadline.  Cancelling the
returned Deferred (the client left) cancels the attempt.

A refused target fails the Deferred with `DestinationRefused`.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import (
    IHostnameResolver,
    IReactorPluggableNameResolver,
    IResolutionReceiver,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from mtop.acl import DestinationACL, parse_address
from mtop.connect import connect_address
from mtop.interfaces import ISettingsConsumer
from mtop.wire import ip_literal


class DestinationRefused(Exception):
    """The ACL refuses the target; the message says why."""


@implementer(IResolutionReceiver)
class _FilteringReceiver:
    """Passes on the resolved addresses the ACL allows, remembers why the
    others were refused."""

    def __init__(self, receiver: Any, acl: DestinationACL, refused: list[str]):
        self.receiver = receiver
        self.acl = acl
        self.refused = refused

    def resolutionBegan(self, resolution: Any) -> None:
        self.receiver.resolutionBegan(resolution)

    def addressResolved(self, address: Any) -> None:
        parsed = parse_address(address.host)
        why = None if parsed is None else self.acl.address_refusal(parsed)
        if why is None:
            self.receiver.addressResolved(address)
        else:
            self.refused.append(why)

    def resolutionComplete(self) -> None:
        self.receiver.resolutionComplete()


@implementer(IHostnameResolver)
class _FilteringResolver:
    def __init__(self, resolver: Any, acl: DestinationACL):
        self.resolver = resolver
        self.acl = acl
        self.refused: list[str] = []

    def resolveHostName(self, receiver: Any, hostName: str, portNumber: int = 0, addressTypes: Any = None, transportSemantics: str = "TCP") -> Any:
        return self.resolver.resolveHostName(
            _FilteringReceiver(receiver, self.acl, self.refused), hostName, portNumber, addressTypes, transportSemantics
        )


@implementer(IReactorPluggableNameResolver)
class _ReactorWithResolver:
    """The reactor, as ``HostnameEndpoint`` sees it, with our resolver."""

    def __init__(self, reactor: Any, resolver: _FilteringResolver):
        self._reactor = reactor
        self.nameResolver = resolver

    def installNameResolver(self, resolver: Any) -> Any:
        raise NotImplementedError

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


@implementer(ISettingsConsumer)
class Dialer:
    """Connects tunnels to their targets.  ``acl`` defaults to the built-in
    one (no loopback, private, link-local... targets); the configuration's
    replaces it (`ISettingsConsumer`)."""

    def __init__(self, reactor: Any, connect_timeout: float = 10.0, acl: DestinationACL | None = None):
        self.reactor = reactor
        self.connect_timeout = connect_timeout
        self.acl = acl if acl is not None else DestinationACL()

    def apply_settings(self, settings: Any) -> None:
        """`ISettingsConsumer`: the ACL and connect timeout of new tunnels."""
        self.acl = settings.acl
        self.connect_timeout = settings.connect_timeout

    def connect(self, host: str, port: int, factory: Any) -> Deferred:
        why = self.acl.refusal(host, port)
        if why is not None:
            return fail(DestinationRefused(why))
        # An address (judged just now) needs no resolution: HostnameEndpoint
        # would still send it through getaddrinfo in the thread pool, a
        # thread round trip and about a tenth of the CPU of a tunnel.
        if ip_literal(host) is not None:
            return connect_address(self.reactor, host, port, factory, self.connect_timeout)
        resolver = _FilteringResolver(self.reactor.nameResolver, self.acl)
        reactor = _ReactorWithResolver(self.reactor, resolver)
        d = self._connect(HostnameEndpoint(reactor, host, port, timeout=self.connect_timeout), factory)

        def refused(failure: Failure) -> Failure:
            if failure.check(DNSLookupError) and resolver.refused:
                return Failure(DestinationRefused(f"{host} resolves only to refused addresses: {resolver.refused[0]}"))
            return failure

        d.addErrback(refused)
        return d

    def connect_unchecked(self, host: str, port: int, factory: Any) -> Deferred:
        """Connect without the ACL, for destinations the operator
        configured (the fallback web server)."""
        return self._connect(HostnameEndpoint(self.reactor, host, port, timeout=self.connect_timeout), factory)

    def _connect(self, endpoint: Any, factory: Any) -> Deferred:
        """``endpoint.connect(factory)`` under the one deadline."""
        d = endpoint.connect(factory)
        d.addTimeout(self.connect_timeout, self.reactor)
        return d

