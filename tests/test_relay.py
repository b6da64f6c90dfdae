"""The relay in memory: two fake stream transports and a `Clock`.

`mtop.relay.Relay` splices two `mtop.interfaces.IStreamTransport`s; these
tests drive it the way the protocols owning the transports do (their
``dataReceived``, ``readConnectionLost`` and ``connectionLost`` become
``client_data``/``target_data``, ``client_eof``/``target_eof`` and
``client_lost``/``target_lost``) and play the transports' part by hand: a
full write buffer is the consumer calling its registered producer's
``pauseProducing``, a closed connection is the matching ``*_lost`` call.
"""

import pytest
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mtop.interfaces import IStreamTransport
from mtop.relay import LINGER_SECONDS, IdleWatch, Relay, Valve


@implementer(IStreamTransport)
class FakeStream(StringTransport):
    """A plain `IStreamTransport` in memory: `StringTransport` plus
    half-close, abort and a log of what the relay asked of it.

    ``tcp`` is None, so the relay writes through ``write`` (its direct
    socket writes need a real TCP connection).  Like Twisted's TCP
    transports, and unlike `StringTransport`, it tolerates
    ``unregisterProducer`` with no producer and pausing or resuming after
    ``loseConnection``."""

    kind = "tcp"
    tcp = None
    tls = None

    def __init__(self, name: str = "stream"):
        super().__init__(lenient=True)
        self.name = name
        self.write_closed = False
        self.aborted = False
        #: Calls in order: ("write", bytes), ("loseWriteConnection",), ...
        self.log: list[tuple] = []
        #: What was written after our end of output: must stay empty.
        self.late_writes: list[bytes] = []

    def __repr__(self) -> str:
        return f"<FakeStream {self.name}>"

    def write(self, data: bytes) -> None:
        if self.write_closed or self.disconnecting:
            self.late_writes.append(data)
        self.log.append(("write", data))
        super().write(data)

    def loseConnection(self) -> None:
        self.log.append(("loseConnection",))
        super().loseConnection()

    def loseWriteConnection(self) -> None:
        self.log.append(("loseWriteConnection",))
        self.write_closed = True

    def abortConnection(self) -> None:
        self.log.append(("abortConnection",))
        self.aborted = True
        super().abortConnection()

    def registerProducer(self, producer, streaming) -> None:
        self.log.append(("registerProducer", producer, streaming))
        super().registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.log.append(("unregisterProducer",))
        self.producer = None
        self.streaming = None

    def pauseProducing(self) -> None:
        self.log.append(("pauseProducing",))
        super().pauseProducing()

    def resumeProducing(self) -> None:
        self.log.append(("resumeProducing",))
        super().resumeProducing()

    def calls(self, name: str) -> int:
        """How many times the relay called ``name``."""
        return sum(1 for entry in self.log if entry[0] == name)


class FakeMeter:
    """A `mtop.relay.Meter` that remembers every chunk it is told of."""

    def __init__(self):
        self.chunks: list[tuple[str, Relay, int]] = []

    def spent_up(self, relay: Relay, size: int) -> None:
        self.chunks.append(("up", relay, size))

    def spent_down(self, relay: Relay, size: int) -> None:
        self.chunks.append(("down", relay, size))


class Tunnel:
    """A started relay between two fake streams, with its clock and the
    relays ``on_finished`` was called with."""

    def __init__(self, idle_timeout: float = 0.0, start: bool = True):
        self.clock = Clock()
        self.client = FakeStream("client")
        self.target = FakeStream("target")
        self.finished: list[tuple[Relay, str | None]] = []
        self.relay = Relay(
            self.clock,
            self.client,
            self.target,
            idle_timeout=idle_timeout,
            on_finished=lambda relay: self.finished.append((relay, relay.outcome)),
        )
        if start:
            self.relay.start()

    def lose_both(self, first: str = "client") -> None:
        """Both connections end (as their transports report it), ``first`` first."""
        if first == "client":
            self.relay.client_lost()
            self.relay.target_lost()
        else:
            self.relay.target_lost()
            self.relay.client_lost()

    def assert_finished_once(self, outcome: str) -> None:
        assert self.finished == [(self.relay, outcome)]
        assert self.relay.outcome == outcome
        # Nothing of the relay's is left on the clock (idle watch, linger).
        assert self.clock.getDelayedCalls() == []


def elapse(clock: Clock, seconds: float, step: float = 0.1) -> None:
    """Let ``seconds`` pass in small steps, as a running reactor would
    (one ``advance`` runs a periodic call once, however far it jumps)."""
    steps = round(seconds / step)
    clock.pump([step] * steps)
    clock.advance(seconds - steps * step)


@pytest.fixture
def tunnel() -> Tunnel:
    return Tunnel()


# The fake itself.


def test_fake_stream_provides_the_stream_transport_interface():
    stream = FakeStream()
    assert verifyObject(IStreamTransport, stream)
    assert (stream.kind, stream.tcp, stream.tls) == ("tcp", None, None)
    stream.unregisterProducer()  # none registered: tolerated, as by TCP
    assert stream.producer is None


def test_valve_is_a_push_producer():
    # Valve does not declare IPushProducer; it has its methods.
    assert verifyObject(IPushProducer, Valve(FakeStream()), tentative=True)


# Data and counts.


def test_data_goes_both_ways_and_is_counted(tunnel):
    relay, client, target = tunnel.relay, tunnel.client, tunnel.target
    relay.client_data(b"GET / HTTP/1.1\r\n")
    relay.client_data(b"\r\n")
    relay.target_data(b"HTTP/1.1 200 OK\r\n\r\n")
    relay.target_data(b"x" * 100_000)
    relay.client_data(b"more")

    assert target.value() == b"GET / HTTP/1.1\r\n\r\nmore"
    assert client.value() == b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 100_000
    assert relay.bytes_up == len(target.value()) == 22
    assert relay.bytes_down == len(client.value()) == 100_019
    # Each chunk is written as it came, in order, through transport.write.
    assert [entry[1] for entry in target.log if entry[0] == "write"] == [b"GET / HTTP/1.1\r\n", b"\r\n", b"more"]
    assert relay.outcome is None and tunnel.finished == []


def test_data_before_start_goes_through_and_counts():
    # The tunnel ends hand the relay the client's early bytes before start.
    tunnel = Tunnel(start=False)
    tunnel.relay.client_data(b"early")
    tunnel.relay.start()
    tunnel.relay.client_data(b" and later")
    assert tunnel.target.value() == b"early and later"
    assert tunnel.relay.bytes_up == 15


def test_empty_chunks_count_nothing(tunnel):
    tunnel.relay.client_data(b"")
    tunnel.relay.target_data(b"")
    assert (tunnel.relay.bytes_up, tunnel.relay.bytes_down) == (0, 0)


def test_meter_is_told_of_every_chunk_both_ways(tunnel):
    relay = tunnel.relay
    meter = relay.meter = FakeMeter()
    relay.client_data(b"abc")
    relay.target_data(b"defgh")
    relay.client_data(b"ij")
    relay.target_data(b"k")
    assert meter.chunks == [("up", relay, 3), ("down", relay, 5), ("up", relay, 2), ("down", relay, 1)]
    # Told after the write: the chunk is already on its way.
    assert tunnel.target.value() == b"abcij" and tunnel.client.value() == b"defghk"


def test_no_meter_by_default(tunnel):
    assert tunnel.relay.meter is None
    tunnel.relay.client_data(b"x")  # and no meter needed
    assert tunnel.target.value() == b"x"


# Flow control.


def test_start_registers_each_side_as_the_others_streaming_producer(tunnel):
    relay, client, target = tunnel.relay, tunnel.client, tunnel.target
    # What the client's buffer holds comes from the target, and vice versa.
    assert client.producer is relay.target_valve and client.streaming is True
    assert target.producer is relay.client_valve and target.streaming is True
    assert relay.client_valve.transport is client
    assert relay.target_valve.transport is target


def test_full_target_buffer_pauses_reading_from_the_client(tunnel):
    client, target = tunnel.client, tunnel.target
    tunnel.relay.client_data(b"a" * 1000)
    target.producer.pauseProducing()  # the target's write buffer is full
    assert client.producerState == "paused"
    assert target.producerState == "producing"  # the other way goes on
    tunnel.relay.target_data(b"reply")
    assert client.value() == b"reply"

    target.producer.resumeProducing()  # drained
    assert client.producerState == "producing"
    assert client.calls("pauseProducing") == client.calls("resumeProducing") == 1


def test_full_client_buffer_pauses_reading_from_the_target(tunnel):
    client, target = tunnel.client, tunnel.target
    client.producer.pauseProducing()
    assert target.producerState == "paused"
    assert client.producerState == "producing"
    client.producer.resumeProducing()
    assert target.producerState == "producing"


def test_flow_and_rate_hold_a_valve_independently(tunnel):
    relay, client, target = tunnel.relay, tunnel.client, tunnel.target

    # Flow first, then a meter's rate limit: the client stays paused until both let go.
    target.producer.pauseProducing()
    relay.client_valve.pause("rate")
    assert client.producerState == "paused"
    target.producer.resumeProducing()
    assert client.producerState == "paused"
    relay.client_valve.resume("rate")
    assert client.producerState == "producing"

    # Rate first, then flow.
    relay.client_valve.pause("rate")
    target.producer.pauseProducing()
    relay.client_valve.resume("rate")
    assert client.producerState == "paused"
    target.producer.resumeProducing()
    assert client.producerState == "producing"

    # The transport itself was paused and resumed once per stretch.
    assert client.calls("pauseProducing") == client.calls("resumeProducing") == 2


def test_a_meter_pauses_a_side_without_disturbing_flow_control(tunnel):
    relay, client, target = tunnel.relay, tunnel.client, tunnel.target

    class PausingMeter(FakeMeter):
        def spent_down(self, relay, size):
            super().spent_down(relay, size)
            relay.target_valve.pause("rate")

    relay.meter = PausingMeter()
    relay.target_data(b"burst")
    assert target.producerState == "paused"
    client.producer.pauseProducing()
    client.producer.resumeProducing()  # the client drained: the rate still holds
    assert target.producerState == "paused"
    relay.target_valve.resume("rate")
    assert target.producerState == "producing"


def test_valve_reasons():
    stream = FakeStream()
    valve = Valve(stream)
    valve.pause("flow")
    valve.pause("flow")  # a reason holds or does not: no count
    assert stream.calls("pauseProducing") == 1
    valve.resume("rate")  # not holding: nothing happens
    assert stream.producerState == "paused" and stream.calls("resumeProducing") == 0
    valve.resume("flow")
    assert stream.producerState == "producing" and stream.calls("resumeProducing") == 1
    valve.resume("flow")  # already resumed
    assert stream.calls("resumeProducing") == 1
    assert valve.reasons == set()


def test_valve_push_producer_methods_are_the_flow_reason():
    stream = FakeStream()
    valve = Valve(stream)
    valve.pauseProducing()
    assert valve.reasons == {"flow"} and stream.producerState == "paused"
    valve.resumeProducing()
    assert valve.reasons == set() and stream.producerState == "producing"
    valve.stopProducing()
    assert stream.producerState == "stopped"


def test_valve_open_resumes_whatever_held_it():
    stream = FakeStream()
    valve = Valve(stream)
    valve.pause("flow")
    valve.pause("rate")
    valve.open()
    assert valve.reasons == set()
    assert stream.producerState == "producing"
    assert stream.calls("resumeProducing") == 1
    valve.open()  # nothing holds it: the transport is left alone
    assert stream.calls("resumeProducing") == 1
    valve.resume("rate")  # a late resume from the meter changes nothing
    assert stream.calls("resumeProducing") == 1 and stream.calls("pauseProducing") == 1


# Half-close.


def test_client_eof_half_closes_the_target_and_the_target_keeps_sending(tunnel):
    relay, client, target = tunnel.relay, tunnel.client, tunnel.target
    relay.client_data(b"request")
    relay.client_eof()

    assert target.write_closed and not target.disconnecting
    assert target.log[-2:] == [("unregisterProducer",), ("loseWriteConnection",)]
    assert target.producer is None  # the finished client no longer feeds it
    assert not client.write_closed and not client.disconnecting

    relay.target_data(b"response, ")
    relay.target_data(b"long")
    assert client.value() == b"response, long"
    assert relay.bytes_down == 14 and relay.outcome is None

    relay.target_eof()
    assert relay.outcome == "done"
    assert client.disconnecting and target.disconnecting
    assert not client.aborted and not target.aborted
    assert tunnel.finished == []  # not before both are gone
    tunnel.lose_both()
    tunnel.assert_finished_once("done")
    assert client.late_writes == target.late_writes == []
    assert (relay.bytes_up, relay.bytes_down) == (7, 14)


def test_target_eof_half_closes_the_client_and_the_client_keeps_sending(tunnel):
    relay, client, target = tunnel.relay, tunnel.client, tunnel.target
    relay.target_data(b"banner\r\n")
    relay.target_eof()

    assert client.write_closed and not client.disconnecting
    assert client.log[-2:] == [("unregisterProducer",), ("loseWriteConnection",)]
    assert client.producer is None
    assert not target.write_closed and not target.disconnecting

    relay.client_data(b"upload")
    assert target.value() == b"upload"

    relay.client_eof()
    assert relay.outcome == "done"
    assert client.disconnecting and target.disconnecting
    tunnel.lose_both(first="target")
    tunnel.assert_finished_once("done")
    assert client.late_writes == target.late_writes == []
    assert (relay.bytes_up, relay.bytes_down) == (6, 8)


def test_a_second_eof_changes_nothing(tunnel):
    relay, target = tunnel.relay, tunnel.target
    relay.client_eof()
    relay.client_eof()
    assert target.calls("loseWriteConnection") == 1
    relay.target_eof()
    relay.target_eof()
    assert tunnel.client.calls("loseWriteConnection") == 0  # both ended: a close instead
    assert tunnel.client.calls("loseConnection") == 1 and target.calls("loseConnection") == 1


def test_flow_control_goes_on_the_open_way_after_client_eof(tunnel):
    relay, client, target = tunnel.relay, tunnel.client, tunnel.target
    relay.client_eof()
    client.producer.pauseProducing()  # the client reads the response slowly
    assert target.producerState == "paused"
    client.producer.resumeProducing()
    assert target.producerState == "producing"


def test_flow_control_goes_on_the_open_way_after_target_eof(tunnel):
    relay, client, target = tunnel.relay, tunnel.client, tunnel.target
    relay.target_eof()
    target.producer.pauseProducing()  # the target reads the upload slowly
    assert client.producerState == "paused"
    target.producer.resumeProducing()
    assert client.producerState == "producing"


# Lingering close: the target is gone while the client still sends.


def test_target_lost_while_the_client_sends_lingers(tunnel):
    relay, client, target = tunnel.relay, tunnel.client, tunnel.target
    meter = relay.meter = FakeMeter()
    relay.client_data(b"POST /upload HTTP/1.1\r\n\r\n")
    relay.target_data(b"HTTP/1.1 413 Payload Too Large\r\n\r\n")
    up, down = relay.bytes_up, relay.bytes_down
    relay.target_lost()

    assert relay.outcome == "target-closed"
    # What the target sent goes first, then the client's end of output; its
    # input is still read (a close with unread input would be a reset).
    assert client.value() == b"HTTP/1.1 413 Payload Too Large\r\n\r\n"
    writes = [i for i, entry in enumerate(client.log) if entry[0] == "write"]
    assert client.log.index(("loseWriteConnection",)) > max(writes)
    assert client.write_closed and not client.disconnecting and not client.aborted
    assert client.producerState == "producing"
    assert client.producer is None

    # What the client still sends is dropped, uncounted, and not metered.
    chunks = len(meter.chunks)
    relay.client_data(b"x" * 65536)
    relay.client_data(b"y" * 10)
    assert target.value() == b"POST /upload HTTP/1.1\r\n\r\n"
    assert (relay.bytes_up, relay.bytes_down) == (up, down)
    assert len(meter.chunks) == chunks
    assert tunnel.finished == []

    # The client's end of input: nothing unread is left, so a plain close.
    relay.client_eof()
    assert client.disconnecting and not client.aborted
    assert target.calls("loseWriteConnection") == 0  # the target is gone: left alone
    relay.client_lost()
    tunnel.assert_finished_once("target-closed")
    assert client.late_writes == []


def test_lingering_client_is_aborted_after_linger_seconds(tunnel):
    relay, client = tunnel.relay, tunnel.client
    relay.client_data(b"upload")
    relay.target_lost()
    tunnel.clock.advance(LINGER_SECONDS - 0.01)
    relay.client_data(b"still sending")
    assert not client.aborted and not client.disconnecting
    tunnel.clock.advance(0.01)
    assert client.aborted
    assert client.calls("abortConnection") == 1
    relay.client_lost()
    tunnel.assert_finished_once("target-closed")
    assert relay.bytes_up == 6


def test_client_lost_while_lingering_cancels_the_linger(tunnel):
    relay, client = tunnel.relay, tunnel.client
    relay.target_lost()
    assert len(tunnel.clock.getDelayedCalls()) == 1
    relay.client_lost()  # a reset, say
    tunnel.assert_finished_once("target-closed")
    tunnel.clock.advance(LINGER_SECONDS * 2)
    assert not client.aborted


def test_lingering_releases_flow_control_and_rate_pauses(tunnel):
    relay, client, target = tunnel.relay, tunnel.client, tunnel.target
    target.producer.pauseProducing()  # the target was not reading
    relay.client_valve.pause("rate")  # and the user was over the rate
    assert client.producerState == "paused"
    relay.target_lost()
    # The client is read (and dropped) until its EOF, whatever held it.
    assert client.producerState == "producing"
    assert relay.client_valve.reasons == set()
    relay.client_valve.resume("rate")  # the meter's later resume: harmless
    assert client.producerState == "producing"


def test_target_lost_after_its_eof_lingers_without_a_second_half_close(tunnel):
    relay, client = tunnel.relay, tunnel.client
    relay.target_data(b"bye")
    relay.target_eof()
    relay.target_lost()
    assert relay.outcome == "target-closed"
    assert client.calls("loseWriteConnection") == 1
    relay.client_data(b"dropped")
    assert relay.bytes_up == 0
    relay.client_eof()
    assert client.disconnecting and not client.aborted
    relay.client_lost()
    tunnel.assert_finished_once("target-closed")


def test_target_lost_after_client_eof_closes_the_client_at_once(tunnel):
    # Nothing more comes from the client: nothing to drain.
    relay, client = tunnel.relay, tunnel.client
    relay.client_eof()
    relay.target_data(b"partial")
    relay.target_lost()
    assert relay.outcome == "target-closed"
    assert client.disconnecting and not client.aborted
    assert client.calls("loseWriteConnection") == 0
    assert tunnel.clock.getDelayedCalls() == []  # no linger
    relay.client_lost()
    tunnel.assert_finished_once("target-closed")


def test_target_lost_after_close_does_not_linger(tunnel):
    relay, client = tunnel.relay, tunnel.client
    relay.close("shutdown")
    relay.target_lost()
    assert client.disconnecting and client.calls("loseWriteConnection") == 0
    assert tunnel.clock.getDelayedCalls() == []
    relay.client_lost()
    tunnel.assert_finished_once("shutdown")


def test_close_while_lingering_closes_the_client_only(tunnel):
    relay, client, target = tunnel.relay, tunnel.client, tunnel.target
    relay.target_lost()
    target_calls = len(target.log)
    relay.close("shutdown", abort=True)
    assert client.aborted
    assert len(target.log) == target_calls  # the lost side is left alone
    assert relay.outcome == "target-closed"  # the first outcome stays
    relay.client_lost()
    tunnel.assert_finished_once("target-closed")


# Closing.


def test_close_flushes_both_sides(tunnel):
    relay, client, target = tunnel.relay, tunnel.client, tunnel.target
    relay.close("refused")
    assert relay.outcome == "refused"
    for stream in (client, target):
        assert stream.disconnecting and not stream.aborted
        assert stream.producer is None  # a registered producer would hold the close
        assert stream.log[-2:] == [("unregisterProducer",), ("loseConnection",)]
    tunnel.lose_both()
    tunnel.assert_finished_once("refused")


def test_close_with_abort_aborts_both_sides(tunnel):
    relay, client, target = tunnel.relay, tunnel.client, tunnel.target
    relay.close("kicked", abort=True)
    assert relay.outcome == "kicked"
    for stream in (client, target):
        assert stream.aborted
        assert stream.producer is None
    tunnel.lose_both(first="target")
    tunnel.assert_finished_once("kicked")


def test_the_first_outcome_stays(tunnel):
    relay = tunnel.relay
    relay.close("quota")
    relay.close("idle-timeout", abort=True)
    assert relay.outcome == "quota"
    tunnel.lose_both()
    tunnel.assert_finished_once("quota")


def test_client_lost_closes_the_target(tunnel):
    relay, client, target = tunnel.relay, tunnel.client, tunnel.target
    relay.client_data(b"half a request")
    relay.client_lost()
    assert relay.outcome == "client-closed"
    assert target.disconnecting and not target.aborted and target.producer is None
    assert client.calls("loseConnection") == 0  # already gone
    assert tunnel.finished == []
    relay.target_lost()
    tunnel.assert_finished_once("client-closed")


# Exactly one outcome event.


def _client_gone_first(relay):
    relay.client_lost()
    relay.target_lost()


def _target_gone_first(relay):
    relay.target_lost()
    relay.client_lost()


def _both_eof_client_lost_first(relay):
    relay.client_eof()
    relay.target_eof()
    relay.client_lost()
    relay.target_lost()


def _both_eof_target_lost_first(relay):
    relay.target_eof()
    relay.client_eof()
    relay.target_lost()
    relay.client_lost()


def _close_then_target_lost_first(relay):
    relay.close("shutdown")
    relay.target_lost()
    relay.client_lost()


def _abort_then_client_lost_first(relay):
    relay.close("kicked", abort=True)
    relay.client_lost()
    relay.target_lost()


def _lost_twice(relay):
    relay.client_lost()
    relay.client_lost()
    relay.target_lost()
    relay.target_lost()
    relay.client_lost()


def _client_eof_then_target_reset(relay):
    relay.client_eof()
    relay.target_lost()
    relay.client_lost()


def _target_eof_then_client_reset(relay):
    relay.target_eof()
    relay.client_lost()
    relay.target_lost()


@pytest.mark.parametrize(
    "events, outcome",
    [
        (_client_gone_first, "client-closed"),
        (_target_gone_first, "target-closed"),
        (_both_eof_client_lost_first, "done"),
        (_both_eof_target_lost_first, "done"),
        (_close_then_target_lost_first, "shutdown"),
        (_abort_then_client_lost_first, "kicked"),
        (_lost_twice, "client-closed"),
        (_client_eof_then_target_reset, "target-closed"),
        (_target_eof_then_client_reset, "client-closed"),
    ],
)
def test_on_finished_is_called_once_with_the_outcome(events, outcome):
    tunnel = Tunnel(idle_timeout=30)
    tunnel.relay.client_data(b"up")
    tunnel.relay.target_data(b"down")
    events(tunnel.relay)
    tunnel.assert_finished_once(outcome)
    assert (tunnel.finished[0][0].bytes_up, tunnel.finished[0][0].bytes_down) == (2, 4)
    tunnel.relay.client_lost()
    tunnel.relay.target_lost()
    assert len(tunnel.finished) == 1


def test_on_finished_may_be_none():
    clock = Clock()
    relay = Relay(clock, FakeStream("client"), FakeStream("target"), idle_timeout=5)
    relay.start()
    relay.client_lost()
    relay.target_lost()
    assert relay.outcome == "client-closed"
    assert clock.getDelayedCalls() == []


# Idle timeout.


def test_idle_tunnel_is_aborted_after_the_timeout():
    tunnel = Tunnel(idle_timeout=10)
    relay, client, target = tunnel.relay, tunnel.client, tunnel.target
    elapse(tunnel.clock, 9.9)
    assert relay.outcome is None and not client.disconnecting
    # Found by a check every quarter of the timeout: at most that late.
    elapse(tunnel.clock, 0.1 + 10 / 4)
    assert relay.outcome == "idle-timeout"
    assert client.aborted and target.aborted
    tunnel.lose_both()
    tunnel.assert_finished_once("idle-timeout")


def test_traffic_keeps_the_tunnel_open():
    tunnel = Tunnel(idle_timeout=10)
    relay = tunnel.relay
    for _ in range(59):
        elapse(tunnel.clock, 1)
        # One way is enough: a download with nothing sent up is not idle.
        relay.target_data(b"tick")
    assert relay.outcome is None
    elapse(tunnel.clock, 9.9)  # the last chunk was 9.9 seconds ago
    assert relay.outcome is None
    elapse(tunnel.clock, 0.1 + 10 / 4)
    assert relay.outcome == "idle-timeout"


def test_traffic_just_before_the_timeout_restarts_it():
    tunnel = Tunnel(idle_timeout=10)
    relay = tunnel.relay
    elapse(tunnel.clock, 9)
    relay.client_data(b"keepalive")
    elapse(tunnel.clock, 9.9)  # 18.9 s in, 9.9 s after the data
    assert relay.outcome is None
    elapse(tunnel.clock, 0.1 + 10 / 4)
    assert relay.outcome == "idle-timeout"


def test_no_timer_work_per_chunk():
    tunnel = Tunnel(idle_timeout=10)
    relay, clock = tunnel.relay, tunnel.clock
    relay.meter = FakeMeter()
    (call,) = clock.getDelayedCalls()
    due = call.getTime()
    for _ in range(1000):
        relay.client_data(b"u" * 100)
        relay.target_data(b"d" * 100)
    # The same single check, neither moved nor replaced.
    assert clock.getDelayedCalls() == [call]
    assert call.getTime() == due and call.active()
    assert (relay.bytes_up, relay.bytes_down) == (100_000, 100_000)


def test_idle_timeout_zero_never_idles():
    tunnel = Tunnel(idle_timeout=0)
    assert tunnel.clock.getDelayedCalls() == []
    elapse(tunnel.clock, 3600, step=1)
    assert tunnel.relay.outcome is None
    assert not tunnel.client.disconnecting and not tunnel.target.disconnecting


def test_the_idle_watch_stops_when_the_tunnel_ends():
    tunnel = Tunnel(idle_timeout=10)
    elapse(tunnel.clock, 3)
    tunnel.lose_both()
    tunnel.assert_finished_once("client-closed")
    elapse(tunnel.clock, 100)
    assert not tunnel.client.aborted


def test_idle_watch_calls_on_idle_once():
    clock = Clock()
    counter = [0]
    idle = []
    IdleWatch(clock, 1.0, lambda: counter[0], lambda: idle.append(clock.seconds()))
    elapse(clock, 0.5)
    counter[0] += 1
    elapse(clock, 5, step=0.25)
    # Progress seen at the 0.75 s check; idle one timeout after that.
    assert idle == [1.75]
    assert clock.getDelayedCalls() == []


def test_idle_watch_checks_at_least_every_50_ms():
    clock = Clock()
    watch = IdleWatch(clock, 0.01, lambda: 0, lambda: None)
    (call,) = clock.getDelayedCalls()
    assert call.getTime() == pytest.approx(0.05)
    watch.stop()
    assert clock.getDelayedCalls() == []
    watch.stop()  # twice is fine


def test_idle_watch_stop_cancels_the_check():
    clock = Clock()
    idle = []
    watch = IdleWatch(clock, 1.0, lambda: 0, lambda: idle.append(True))
    elapse(clock, 0.5)
    watch.stop()
    elapse(clock, 10)
    assert idle == []
