"""The contracts between the pieces, as interfaces a reader can open.

Each is declared by its implementations (``@implementer``) and checked with
``zope.interface.verify.verifyObject`` in the tests; code asks an object
what it is through these, never by probing it with ``hasattr``.

`IStreamTransport`
    What a tunnel end runs on and what `mtop.relay.Relay` splices: a
    reliable byte stream with flow control, half-close and abort.  TLS over
    TCP (`mtop.tlstransport.TLSTransport`), a QUIC stream
    (`mtop.quic.stream.QuicStreamTransport`) and plain TCP
    (`mtop.streams.TCPStream`, an adapter) provide it.
"""

from __future__ import annotations

from twisted.internet.interfaces import IConsumer, IPushProducer, ITransport
from zope.interface import Attribute


class IStreamTransport(ITransport, IPushProducer, IConsumer):
    """A connected byte stream a tunnel end runs on.

    Besides `ITransport` (write, loseConnection, getPeer, getHost), it is
    an `IPushProducer` (pausing it pauses reading; pausing or resuming after
    it closed does nothing) and an `IConsumer` (a producer registered on it
    is paused while its write buffer is full; ``unregisterProducer`` with
    none registered does nothing, as Twisted's TCP transports allow)."""

    kind = Attribute("What it is: 'tcp', 'tls' (TLS over TCP) or 'quic' (a QUIC stream).")

    tcp = Attribute(
        "The Twisted TCP connection the stream's bytes travel on, for socket "
        "options and the relay's direct socket writes: the connection itself for "
        "plain TCP, the one TLS runs on, None for a QUIC stream."
    )

    tls = Attribute("The ``OpenSSL.SSL.Connection`` of a TLS stream (ALPN, session), else None.")

    def loseWriteConnection() -> None:
        """Half-close: no more writes (after what is queued); reading goes
        on (TCP FIN, TLS ``close_notify``, QUIC FIN)."""

    def abortConnection() -> None:
        """Close now, dropping what is queued (TCP RST, QUIC reset)."""


from zope.interface import Interface  # noqa: E402  (appended with the interface below)


class ISettingsConsumer(Interface):
    """A long-lived object that takes its settings from the configuration.

    `mtop.settings.runtime_settings` builds one `mtop.settings.RuntimeSettings`
    per configuration; ``makeService`` hands it to every consumer once, and
    `mtop.reload.ConfigReloader` hands each reloaded one to the same
    consumers.  The tunnel factory (its limits, throttle and login gate
    included), the dialer, the authenticator, the client list watcher, the
    server's listeners (their certificates) and the log level are consumers.
    What a running process cannot take on is `mtop.settings.NEEDS_RESTART`."""

    def apply_settings(settings: "mtop.settings.RuntimeSettings") -> None:  # noqa: F821
        """Use ``settings`` from now on: for new connections and logins
        (what is open goes on as it is).  Takes the part it needs."""
