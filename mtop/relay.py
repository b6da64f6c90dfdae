"""The relay: splices two connected stream transports.

Shared by the server (client TLS connection <-> target TCP connection) and
climber (local application <-> MTop tunnel).  What it guarantees:

* **flow control**: each transport is the other's streaming producer, so a
  peer that stops reading pauses reading from the other side; memory per
  tunnel stays at the transports' own buffers (`TUNNEL_BUFFER_SIZE`, 256
  KiB, each way plus one read);
* **half-close**: end of input one way (TCP FIN, TLS ``close_notify``) becomes
  ``loseWriteConnection`` on the other side; the other direction goes on
  until it ends too;
* **lingering close**: when the target goes away while the client is still
  sending, the client's side is shut for writing (after what the target
  sent) and what the client still sends is read and dropped until its end
  of input, for at most `LINGER_SECONDS`: closing a connection with unread
  input makes the kernel send a reset, which can destroy the last bytes
  relayed to the client before it reads them (an HTTP server's early 413
  answer to an upload, say);
* **idle timeout** on an injected clock, without per-chunk timer work: a
  periodic check compares byte counters;
* **byte counts** both ways and an outcome, reported once through
  ``on_finished`` when both sides are gone;
* an optional **meter** (``relay.meter``, e.g. a per-user rate limit) told of
  every chunk, which may pause either side through its `Valve` for its own
  reasons without disturbing flow control.

The two protocols that own the transports forward their events to
`Relay.client_data`, `Relay.client_eof`, `Relay.client_lost` and the
``target_`` equivalents.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from twisted.internet.interfaces import IPushProducer, IReactorTime, ITCPTransport
from zope.interface import implementer

from mtop import fastpath
from mtop.interfaces import IStreamTransport
from mtop.timers import cancel

#: What a tunnel's TCP connections read at once, and how much each may hold
#: for writing before it pauses its producer.  Twisted's 64 KiB default
#: makes every 64 KiB read of a busy tunnel cost a full round of Python
#: calls, and its TLS records (a little over 64 KiB) pause and resume the
#: other side every time; four times that is four times fewer rounds, still
#: well within the server's 1 MiB per tunnel.
TUNNEL_BUFFER_SIZE = 1 << 18

#: How long a lingering close reads (and drops) what a peer still sends
#: before the connection is cut: here a client whose target is gone, in the
#: server and climber one refused with an error reply.
LINGER_SECONDS = 2.0


def large_buffers(transport: IStreamTransport, size: int = TUNNEL_BUFFER_SIZE) -> None:
    """Give the TCP connection under ``transport`` (``transport.tcp``: the
    connection of plain TCP, the one TLS runs on) ``size`` byte reads,
    write buffer and sends.  QUIC streams are left alone, and so is
    everything on the portable data path (no fast path: Twisted's own
    sizes; see `mtop.fastpath`)."""
    fast = fastpath.active
    if fast is not None and transport.tcp is not None:
        fast.tune_buffers(transport.tcp, size)


def writer_for(transport: IStreamTransport) -> Callable[[bytes], None]:
    """A ``write`` for the relay: ``transport.write``, or for plain TCP with
    the fast path a write that first offers the data straight to the
    socket when nothing is queued (`mtop.fastpath.FastPath.socket_writer`:
    Twisted's own ``write`` only queues, for the next turn of the loop)."""
    fast = fastpath.active
    if fast is not None and transport.kind == "tcp":
        direct = fast.socket_writer(transport.tcp)
        if direct is not None:
            return direct
    return transport.write  # TLS encrypts first; QUIC has no TCP


def no_delay(transport: Any) -> None:
    """Turn Nagle's algorithm off, as Go does for every TCP connection: a
    relay's small writes (replies, interactive traffic) must not wait for
    the peer's delayed ACK (about 40 ms).  On the TCP connection under
    ``transport`` (an `IStreamTransport`; none for a QUIC stream), or on
    ``transport`` itself, a Twisted TCP transport as a protocol gets it in
    ``connectionMade``."""
    if IStreamTransport.providedBy(transport):
        tcp = transport.tcp
    elif ITCPTransport.providedBy(transport):
        tcp = transport  # a raw Twisted TCP transport
    else:
        return
    if tcp is None:
        return
    try:
        tcp.setTcpNoDelay(True)
    except OSError:
        pass


class IdleWatch:
    """Calls ``on_idle`` once ``progress()`` (a byte counter) has not
    changed for ``timeout`` seconds.  No timer work per chunk: a periodic
    check every quarter of the timeout compares the counter."""

    def __init__(self, clock: IReactorTime, timeout: float, progress: Callable[[], int], on_idle: Callable[[], None]):
        self.clock = clock
        self.timeout = timeout
        self.progress = progress
        self.on_idle = on_idle
        self._seen = progress()
        self._since = clock.seconds()
        self._call: Any = clock.callLater(self._interval(), self._check)

    def _interval(self) -> float:
        return max(self.timeout / 4, 0.05)

    def _check(self) -> None:
        self._call = None
        now = self.clock.seconds()
        seen = self.progress()
        if seen != self._seen:
            self._seen = seen
            self._since = now
        elif now - self._since >= self.timeout:
            self.on_idle()
            return
        self._call = self.clock.callLater(self._interval(), self._check)

    def stop(self) -> None:
        cancel(self._call)
        self._call = None


@implementer(IPushProducer)
class Valve:
    """A push producer standing in front of a transport: the transport is
    paused while any reason holds ("flow" from the consumer it is
    registered with, others such as "rate" from a meter) and resumed when
    none does.  Transports' pause/resume do not count, so two independent
    pausers of one transport need this."""

    __slots__ = ("transport", "reasons")

    def __init__(self, transport: Any):
        self.transport = transport
        self.reasons: set[str] = set()

    def pause(self, reason: str) -> None:
        if not self.reasons:
            self.transport.pauseProducing()
        self.reasons.add(reason)

    def resume(self, reason: str) -> None:
        if reason not in self.reasons:
            return
        self.reasons.discard(reason)
        if not self.reasons:
            self.transport.resumeProducing()

    def open(self) -> None:
        """Resume the transport whatever held it."""
        if self.reasons:
            self.reasons.clear()
            self.transport.resumeProducing()

    # IPushProducer, for the consumer this valve is registered with.

    def pauseProducing(self) -> None:
        self.pause("flow")

    def resumeProducing(self) -> None:
        self.resume("flow")

    def stopProducing(self) -> None:
        self.transport.stopProducing()


class Meter(Protocol):
    """What a relay tells of its traffic (see `mtop.ratelimit`)."""

    def spent_up(self, relay: "Relay", size: int) -> None: ...

    def spent_down(self, relay: "Relay", size: int) -> None: ...


class Relay:
    """Both directions of one tunnel.  "Up" is client to target; both
    sides are `mtop.interfaces.IStreamTransport`s (a Twisted TCP transport
    goes through `mtop.streams.TCPStream`).

    ``client_valve`` and ``target_valve`` pause reading from each side;
    ``meter``, when set, is told of every chunk."""

    bytes_up = 0
    bytes_down = 0
    outcome: str | None = None
    _client_eof = False
    _target_eof = False
    _client_lost = False
    _target_lost = False
    _finished = False
    _closing = False
    #: The target is gone and the client is being drained (see `target_lost`).
    _draining = False

    def __init__(
        self,
        clock: IReactorTime,
        client: IStreamTransport,
        target: IStreamTransport,
        idle_timeout: float = 0.0,
        on_finished: Callable[["Relay"], None] | None = None,
    ):
        self.clock = clock
        self.client = client
        self.target = target
        self.idle_timeout = idle_timeout
        self.on_finished = on_finished
        self._idle: IdleWatch | None = None
        self._linger: Any = None
        self.client_valve = Valve(client)
        self.target_valve = Valve(target)
        self._write_client = writer_for(client)
        self._write_target = writer_for(target)
        self.meter: Meter | None = None

    def start(self) -> None:
        """Register the producers and start the idle timer.  Call once both
        transports are connected."""
        large_buffers(self.client)
        large_buffers(self.target)
        # A full write buffer on one side pauses reading from the other.
        self.client.registerProducer(self.target_valve, True)
        self.target.registerProducer(self.client_valve, True)
        if self.idle_timeout > 0:
            self._idle = IdleWatch(
                self.clock, self.idle_timeout, lambda: self.bytes_up + self.bytes_down, self._idle_expired
            )

    def _idle_expired(self) -> None:
        self.close("idle-timeout", abort=True)

    # Events from the client side.

    def client_data(self, data: bytes) -> None:
        if self._draining:
            return  # the target is gone: nowhere to go
        self.bytes_up += len(data)
        self._write_target(data)
        if self.meter is not None:
            self.meter.spent_up(self, len(data))

    def client_eof(self) -> None:
        if self._client_eof:
            return
        self._client_eof = True
        if self._draining:
            self.client.loseConnection()  # drained: nothing unread is left
        elif self._target_eof:
            self.close("done")
        elif not self._target_lost:
            # Nothing more comes from the client: the target's producer is
            # finished, and a registered producer would keep it from closing.
            self.target.unregisterProducer()
            self.target.loseWriteConnection()

    def client_lost(self) -> None:
        self._client_lost = True
        self._stop_lingering()
        if not self._target_lost:
            self._set_outcome("done" if self._client_eof and self._target_eof else "client-closed")
            self.target.unregisterProducer()
            self.target.loseConnection()
        self._maybe_finished()

    # Events from the target side.

    def target_data(self, data: bytes) -> None:
        self.bytes_down += len(data)
        self._write_client(data)
        if self.meter is not None:
            self.meter.spent_down(self, len(data))

    def target_eof(self) -> None:
        if self._target_eof:
            return
        self._target_eof = True
        if self._client_eof:
            self.close("done")
        elif not self._client_lost:
            self.client.unregisterProducer()
            self.client.loseWriteConnection()

    def target_lost(self) -> None:
        self._target_lost = True
        if not self._client_lost:
            self._set_outcome("done" if self._client_eof and self._target_eof else "target-closed")
            self.client.unregisterProducer()
            if self._client_eof or self._closing:
                self.client.loseConnection()
            else:
                self._drain_client()
        self._maybe_finished()

    def _drain_client(self) -> None:
        """The lingering close: what the target sent goes first, then our
        end of output; the client is read (and dropped) until its end of
        input or `LINGER_SECONDS`."""
        self._draining = True
        if not self._target_eof:
            self.client.loseWriteConnection()
        # Whatever paused reading (flow control towards the target, a rate
        # limit) no longer applies.
        self.client_valve.open()
        self._linger = self.clock.callLater(LINGER_SECONDS, self.client.abortConnection)

    def _stop_lingering(self) -> None:
        cancel(self._linger)
        self._linger = None

    # Both.

    def close(self, outcome: str, abort: bool = False) -> None:
        """End the tunnel: both sides are closed (after flushing what they
        hold, unless ``abort``)."""
        self._set_outcome(outcome)
        self._closing = True
        for transport, lost in ((self.client, self._client_lost), (self.target, self._target_lost)):
            if lost:
                continue
            transport.unregisterProducer()
            if abort:
                transport.abortConnection()
            else:
                transport.loseConnection()

    def _set_outcome(self, outcome: str) -> None:
        if self.outcome is None:
            self.outcome = outcome

    def _maybe_finished(self) -> None:
        if self._finished or not (self._client_lost and self._target_lost):
            return
        self._finished = True
        if self._idle is not None:
            self._idle.stop()
            self._idle = None
        if self.on_finished is not None:
            self.on_finished(self)
