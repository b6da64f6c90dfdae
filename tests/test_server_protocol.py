"""The handshake state machine in memory: StringTransport, Clock, fakes."""

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from twisted.internet.address import IPv4Address

from zope.interface import implementer
from zope.interface.verify import verifyObject

from mtop import wire
from mtop.interfaces import IStreamTransport
from mtop.dialer import DestinationRefused
from mtop.limits import AuthThrottle, ConnectionLimits, LimitSettings, ThrottleSettings
from mtop.tls import FALLBACK_ALPN
from mtop.userstore import UserRecord
from mtop.server import TunnelSettings, TunnelFactory


@implementer(IStreamTransport)
class Transport(StringTransport):
    """StringTransport with half-close, abort and producer bookkeeping, as
    a TLS `IStreamTransport` (its ``tls`` is itself: the app data and ALPN
    of the SSL connection)."""

    kind = "tls"
    tcp = None

    def __init__(self):
        super().__init__()
        self.write_closed = False
        self.aborted = False

    def loseWriteConnection(self):
        self.write_closed = True

    def abortConnection(self):
        self.aborted = True
        self.disconnecting = True

    def unregisterProducer(self):
        # Like TCP transports, and unlike StringTransport, tolerate "none".
        self.producer = None

    # Like `mtop.tlstransport.TLSTransport`'s SSL connection.
    tls_app_data = None
    alpn = None

    @property
    def tls(self):
        return self

    def get_app_data(self):
        return self.tls_app_data

    def get_alpn_proto_negotiated(self):
        return self.alpn


class StreamTransport(Transport):
    """Like a QUIC stream: no TLS connection of its own."""

    kind = "quic"
    tls = None


class FakeAuth:
    """Logs everyone in (``result`` True) or no one (False); a Deferred
    ``result`` is returned as it is."""

    def __init__(self, result=True):
        self.result = result
        self.calls = []

    def login(self, username, password, client=""):
        self.calls.append(username)
        if isinstance(self.result, Deferred):
            return self.result
        return succeed(UserRecord(username, "", "") if self.result else None)


class FakeDialer:
    def __init__(self):
        self.attempts = []

    def connect(self, host, port, factory):
        d = Deferred(lambda d: self.attempts[-1].__setitem__("cancelled", True))
        self.attempts.append({"host": host, "port": port, "factory": factory, "d": d, "cancelled": False})
        return d

    def succeed(self):
        attempt = self.attempts[-1]
        protocol = attempt["factory"].buildProtocol(None)
        transport = Transport()
        protocol.makeConnection(transport)
        attempt["d"].callback(protocol)
        return protocol, transport

    def fail(self, error=None):
        self.attempts[-1]["d"].errback(error or ConnectionRefusedError())

    def connect_unchecked(self, host, port, factory):
        d = self.connect(host, port, factory)
        self.attempts[-1]["unchecked"] = True
        return d


def outcome_events(events):
    """The outcome events of this module's protocols (they run on a fake
    clock): a real tunnel an earlier loopback test aborted at teardown may
    report its own outcome while these run."""
    return [e for e in events if e.get("tunnel_event") and isinstance(getattr(e.get("log_source"), "clock", None), Clock)]


def make(result=True, limits=None, throttle=None, **settings):
    clock, dialer, auth = Clock(), FakeDialer(), FakeAuth(result)
    factory = TunnelFactory(
        auth,
        dialer,
        clock,
        TunnelSettings(**settings),
        limits=ConnectionLimits(limits) if limits else None,
        throttle=AuthThrottle(clock, throttle) if throttle else None,
    )
    protocol, transport = connect(factory)
    return protocol, transport, clock, dialer, auth, factory


def connect(factory, host="192.0.2.1"):
    """A new connection from ``host``: (protocol, transport), or
    (None, None) when the factory refuses it."""
    protocol = factory.buildProtocol(IPv4Address("TCP", host, 40000))
    if protocol is None:
        return None, None
    transport = Transport()
    protocol.makeConnection(transport)
    return protocol, transport


def assert_refused(client, clock, replied):
    """Without a reply the connection is closed at once; after a reply our
    side is shut and the connection is aborted if the client lingers."""
    if not replied:
        assert client.disconnecting
        return
    assert client.write_closed and not client.disconnecting
    clock.advance(2.1)
    assert client.aborted


AUTH = wire.encode_auth(wire.AuthRequest("alice", "pw", "example.com", 443))


def test_success_replies_0100_and_delivers_early_data(events):
    protocol, client, clock, dialer, auth, factory = make()
    protocol.dataReceived(AUTH[:5])
    assert auth.calls == []
    protocol.dataReceived(AUTH[5:] + b"early")
    assert client.producerState == "paused"
    protocol.dataReceived(b" more")  # one more read may already be on its way
    assert dialer.attempts[0]["host"] == "example.com" and dialer.attempts[0]["port"] == 443
    target_protocol, target = dialer.succeed()
    assert client.value() == b"\x01\x00"
    assert target.value() == b"early more"
    assert client.producerState == "producing"
    protocol.dataReceived(b"later")
    assert target.value() == b"early morelater"
    target_protocol.dataReceived(b"answer")
    assert client.value() == b"\x01\x00answer"
    assert client.producer.transport is target and target.producer.transport is client


def test_a_client_that_waits_for_its_answer_is_never_paused(events):
    """Pausing is lazy: a client sending nothing after its auth message
    (every client that waits for ``01 00``) costs no stop and restart of
    reading; one that sends more is paused at its first early bytes."""
    protocol, client, clock, dialer, auth, factory = make()
    states = []
    pause, resume = client.pauseProducing, client.resumeProducing
    client.pauseProducing = lambda: (states.append("pause"), pause())
    client.resumeProducing = lambda: (states.append("resume"), resume())
    protocol.dataReceived(AUTH)
    assert client.producerState == "producing"
    target_protocol, target = dialer.succeed()
    assert client.value() == b"\x01\x00"
    assert states == []
    protocol.dataReceived(b"now")
    assert target.value() == b"now"


def test_half_close_both_ways_then_one_outcome_event(events):
    protocol, client, clock, dialer, auth, factory = make()
    protocol.dataReceived(AUTH)
    target_protocol, target = dialer.succeed()
    protocol.readConnectionLost()
    assert target.write_closed and not target.disconnecting
    target_protocol.dataReceived(b"still flowing")
    assert client.value().endswith(b"still flowing")
    target_protocol.readConnectionLost()
    assert client.disconnecting and target.disconnecting
    target_protocol.connectionLost(None)
    protocol.connectionLost(None)
    (event,) = outcome_events(events)
    assert event["outcome"] == "done"
    assert event["user"] == "alice" and event["target"] == "example.com:443"
    assert event["bytes_down"] == len(b"still flowing")
    assert factory.tunnels == set()


def test_target_reset_while_the_client_sends_is_a_lingering_close(events):
    """The target answers and resets while the client is still uploading:
    the answer, then our end of output; what the client still sends is
    dropped, and its end of input closes it.  (Closing at once, with its
    upload unread, would send a reset that can destroy the answer.)"""
    from mtop.relay import LINGER_SECONDS

    protocol, client, clock, dialer, auth, factory = make()
    protocol.dataReceived(AUTH)
    target_protocol, target = dialer.succeed()
    protocol.dataReceived(b"upload part 1")
    client.producer.pauseProducing()  # the target's buffer is full
    target_protocol.dataReceived(b"413 too large")
    target_protocol.connectionLost(None)  # a reset: no end of input first
    assert client.value().endswith(b"413 too large")
    assert client.write_closed and not client.disconnecting and not client.aborted
    assert client.producerState == "producing"  # read, to be dropped
    protocol.dataReceived(b"upload part 2")
    assert target.value() == b"upload part 1"
    clock.advance(LINGER_SECONDS / 2)
    protocol.readConnectionLost()
    assert client.disconnecting and not client.aborted
    protocol.connectionLost(None)
    (event,) = outcome_events(events)
    assert event["outcome"] == "target-closed" and event["bytes_up"] == len(b"upload part 1")
    assert not clock.getDelayedCalls()


def test_a_client_that_keeps_sending_after_the_target_left_is_cut(events):
    from mtop.relay import LINGER_SECONDS

    protocol, client, clock, dialer, auth, factory = make()
    protocol.dataReceived(AUTH)
    target_protocol, target = dialer.succeed()
    target_protocol.connectionLost(None)
    for _ in range(3):
        clock.advance(LINGER_SECONDS / 4)
        protocol.dataReceived(b"more")
    assert not client.aborted
    clock.advance(LINGER_SECONDS / 4)
    assert client.aborted
    protocol.connectionLost(None)
    assert outcome_events(events)[0]["outcome"] == "target-closed"


def test_client_eof_during_connect_is_carried_to_target():
    protocol, client, clock, dialer, auth, factory = make()
    protocol.dataReceived(AUTH + b"req")
    protocol.readConnectionLost()
    target_protocol, target = dialer.succeed()
    assert target.value() == b"req" and target.write_closed


@pytest.mark.parametrize("reply_errors,expected", [(False, b""), (True, b"\x01\x02")])
def test_auth_failure(events, reply_errors, expected):
    protocol, client, clock, dialer, auth, factory = make(result=False, reply_errors=reply_errors)
    protocol.dataReceived(AUTH)
    assert client.value() == expected
    assert_refused(client, clock, replied=reply_errors)
    assert dialer.attempts == []
    protocol.connectionLost(None)
    (event,) = outcome_events(events)
    assert event["outcome"] == "auth-failed"
    assert "pw" not in repr(event)


@pytest.mark.parametrize("reply_errors,expected", [(False, b""), (True, b"\x01\x03")])
def test_connect_failure(reply_errors, expected):
    protocol, client, clock, dialer, auth, factory = make(reply_errors=reply_errors)
    protocol.dataReceived(AUTH)
    dialer.fail()
    assert client.value() == expected
    assert_refused(client, clock, replied=reply_errors)


@pytest.mark.parametrize("reply_errors,expected", [(False, b""), (True, b"\x01\x01")])
def test_bad_version(reply_errors, expected):
    protocol, client, clock, dialer, auth, factory = make(reply_errors=reply_errors)
    protocol.dataReceived(b"\x05\x01")
    assert client.value() == expected
    assert_refused(client, clock, replied=reply_errors)
    assert auth.calls == []


def test_handshake_deadline_aborts_silent_and_trickling_clients(events):
    protocol, client, clock, dialer, auth, factory = make(handshake_timeout=10)
    for byte in AUTH[:8]:
        clock.advance(1)
        protocol.dataReceived(bytes([byte]))
    assert not client.aborted
    clock.advance(2)
    assert client.aborted
    protocol.connectionLost(None)
    assert outcome_events(events)[0]["outcome"] == "handshake-timeout"


def test_deadline_stops_once_the_message_is_in():
    protocol, client, clock, dialer, auth, factory = make(handshake_timeout=10)
    protocol.dataReceived(AUTH)
    dialer.succeed()
    clock.advance(60)
    assert not client.aborted


def test_client_leaving_cancels_the_connect():
    protocol, client, clock, dialer, auth, factory = make()
    protocol.dataReceived(AUTH)
    protocol.connectionLost(None)
    assert dialer.attempts[0]["cancelled"]


def test_idle_timeout_closes_a_quiet_tunnel(events):
    protocol, client, clock, dialer, auth, factory = make(idle_timeout=60)
    protocol.dataReceived(AUTH)
    target_protocol, target = dialer.succeed()
    for _ in range(10):
        clock.advance(30)
        protocol.dataReceived(b"x")  # activity keeps it open
    assert not client.aborted
    clock.pump([5] * 11)
    assert not client.aborted  # 55 s quiet
    clock.pump([5] * 5)
    assert client.aborted and target.aborted  # closed between 60 and 75 s
    target_protocol.connectionLost(None)
    protocol.connectionLost(None)
    assert outcome_events(events)[0]["outcome"] == "idle-timeout"


# Abuse resistance: destination ACL, throttling, limits, fallback.


@pytest.mark.parametrize("reply_errors,expected", [(False, b""), (True, b"\x01\x03")])
def test_acl_refusal_is_logged_with_user_and_target_and_counted(events, reply_errors, expected):
    protocol, client, clock, dialer, auth, factory = make(reply_errors=reply_errors)
    protocol.dataReceived(AUTH)
    dialer.fail(DestinationRefused("127.0.0.1 is loopback (127.0.0.0/8)"))
    assert client.value() == expected
    assert_refused(client, clock, replied=reply_errors)
    protocol.connectionLost(None)
    (event,) = outcome_events(events)
    assert event["outcome"] == "acl-denied"
    assert event["user"] == "alice" and event["target"] == "example.com:443"
    assert "loopback" in event["detail"]
    assert factory.counters["refused.acl"] == 1


def test_failed_logins_ban_the_address_without_asking_the_store_again():
    protocol, client, clock, dialer, auth, factory = make(result=False, throttle=ThrottleSettings(max_failures=3, window=60, ban=300))
    waiting, waiting_transport = connect(factory)  # opened before the ban
    protocol.dataReceived(AUTH)
    for _ in range(2):
        p, t = connect(factory)
        p.dataReceived(AUTH)
        assert t.disconnecting
    assert len(auth.calls) == 3
    # Banned: new connections are refused before any TLS work...
    assert connect(factory) == (None, None)
    # ...and one already in its handshake is closed without a lookup.
    waiting.dataReceived(AUTH)
    assert waiting_transport.disconnecting and len(auth.calls) == 3
    assert factory.counters["refused.banned"] == 2
    # Other addresses are unaffected.
    other, other_transport = connect(factory, "192.0.2.99")
    assert other is not None
    # The ban ends.
    clock.advance(301)
    assert connect(factory)[0] is not None


def test_limits_refuse_before_the_handshake_and_are_released():
    protocol, client, clock, dialer, auth, factory = make(limits=LimitSettings(max_tunnels=3, max_per_client=2))
    second, _ = connect(factory)
    assert connect(factory) == (None, None)  # two from 192.0.2.1 already
    assert factory.counters["refused.max-per-client"] == 1
    third, _ = connect(factory, "192.0.2.50")
    assert connect(factory, "192.0.2.51") == (None, None)
    assert factory.counters["refused.max-tunnels"] == 1
    second.connectionLost(None)
    third.connectionLost(None)
    assert factory.limits.open == 1 and factory.limits.handshaking == 1
    protocol.dataReceived(AUTH)
    dialer.succeed()  # relaying: no longer before its login
    assert factory.limits.open == 1 and factory.limits.handshaking == 0
    assert connect(factory)[0] is not None


def test_full_handshake_pool_evicts_the_busiest_address_for_a_newcomer(events):
    protocol, client, clock, dialer, auth, factory = make(limits=LimitSettings(max_handshakes=2))
    second, second_transport = connect(factory)
    # 192.0.2.1 holds the whole pool: a newcomer takes its oldest slot.
    newcomer, _ = connect(factory, "192.0.2.50")
    assert newcomer is not None and client.aborted and not second_transport.aborted
    protocol.connectionLost(None)
    (event,) = outcome_events(events)
    assert event["outcome"] == "evicted" and event["user"] is None
    assert factory.limits.counters["evicted"] == 1
    # Now each address holds one: nobody is evicted for a third address.
    assert connect(factory, "192.0.2.51") == (None, None)
    assert factory.counters["refused.max-handshakes"] == 1
    assert factory.limits.open == 2 and factory.limits.handshaking == 2


def test_logins_in_flight_per_address_are_capped_and_stop_at_the_ban():
    lookups = []
    protocol, client, clock, dialer, auth, factory = make(
        result=False, throttle=ThrottleSettings(max_failures=3, window=60, ban=300, max_in_flight=2)
    )
    pending = [Deferred() for _ in range(10)]
    auth.login = lambda user, password, client="": lookups.append(user) or pending[len(lookups) - 1]
    tunnels = [protocol] + [connect(factory)[0] for _ in range(9)]
    for tunnel in tunnels:
        tunnel.dataReceived(AUTH)
    assert len(lookups) == 2  # the others wait their turn
    for i in range(3):
        pending[i].callback(None)  # wrong password
    # The third failure banned the address: the seven still waiting are
    # refused without a lookup.
    assert len(lookups) == 4
    pending[3].callback(None)
    assert len(lookups) == 4
    assert all(t.state in ("failing", "closed", "auth") for t in tunnels)
    assert factory.counters["refused.banned"] == 6
    assert factory.login_gate.in_flight("192.0.2.1") == 0


@pytest.mark.parametrize("lookup_time", [0.0, 0.05, 0.2])
def test_failures_are_answered_after_the_same_delay_whatever_the_lookup_took(lookup_time):
    result = Deferred()
    protocol, client, clock, dialer, auth, factory = make(result=result, auth_failure_delay=0.5)
    protocol.dataReceived(AUTH)
    clock.advance(lookup_time)
    result.callback(None)
    clock.advance(0.499 - lookup_time)
    assert not client.disconnecting
    clock.advance(0.002)
    assert client.disconnecting


def test_client_leaving_during_the_failure_delay(events):
    protocol, client, clock, dialer, auth, factory = make(result=False, auth_failure_delay=0.5)
    protocol.dataReceived(AUTH)
    protocol.connectionLost(None)
    clock.advance(1)
    (event,) = outcome_events(events)
    assert event["outcome"] == "client-closed"
    assert factory.limits.open == 0


FALLBACK = ("127.0.0.1", 8080)


def test_fallback_gets_a_non_mtop_request_with_the_bytes_read(events):
    protocol, client, clock, dialer, auth, factory = make(fallback=FALLBACK)
    protocol.dataReceived(b"GET / HTTP/1.1\r\n")
    protocol.dataReceived(b"Host: x\r\n\r\n")
    (attempt,) = dialer.attempts
    assert (attempt["host"], attempt["port"], attempt["unchecked"]) == (*FALLBACK, True)
    web, web_transport = dialer.succeed()
    assert web_transport.value() == b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    web.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
    assert client.value() == b"HTTP/1.1 200 OK\r\n\r\n"  # no 01 00
    assert auth.calls == []
    web.readConnectionLost()
    protocol.readConnectionLost()
    web.connectionLost(None)
    protocol.connectionLost(None)
    (event,) = outcome_events(events)
    assert event["outcome"] == "fallback" and "bad request" in event["detail"]
    assert event["user"] is None


def test_fallback_gets_a_failed_login_with_its_auth_message():
    protocol, client, clock, dialer, auth, factory = make(result=False, fallback=FALLBACK, auth_failure_delay=0.5)
    protocol.dataReceived(AUTH + b"more")
    assert dialer.attempts == []
    clock.advance(0.5)
    web, web_transport = dialer.succeed()
    assert web_transport.value() == wire.without_password(AUTH) + b"more"
    assert b"pw" not in web_transport.value()
    assert client.value() == b""


def test_fallback_after_the_tls_handshake_chose_another_alpn():
    protocol, client, clock, dialer, auth, factory = make(fallback=FALLBACK)
    client.tls_app_data = FALLBACK_ALPN
    client.alpn = b"http/1.1"
    protocol.handshakeCompleted()
    assert dialer.attempts[0]["host"] == "127.0.0.1"
    protocol.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
    web, web_transport = dialer.succeed()
    assert web_transport.value() == b"GET / HTTP/1.1\r\n\r\n"


def test_mtop_alpn_is_not_sent_to_the_fallback():
    protocol, client, clock, dialer, auth, factory = make(fallback=FALLBACK)
    protocol.handshakeCompleted()
    protocol.dataReceived(AUTH)
    assert dialer.attempts[0]["host"] == "example.com"


def test_unreachable_fallback_closes(events):
    protocol, client, clock, dialer, auth, factory = make(fallback=FALLBACK)
    protocol.dataReceived(b"\x16\x03")
    dialer.fail()
    assert client.disconnecting
    protocol.connectionLost(None)
    assert outcome_events(events)[0]["outcome"] == "fallback-failed"


def test_refusals_are_logged_once_a_minute_with_counts(events):
    protocol, client, clock, dialer, auth, factory = make(limits=LimitSettings(max_per_client=1))
    for _ in range(5):
        assert connect(factory) == (None, None)
    clock.advance(61)
    assert connect(factory) == (None, None)
    warnings = [e for e in events if "refused before their handshake" in e.get("log_format", "")]
    assert [w["counts"] for w in warnings] == ["1 max-per-client", "5 max-per-client"]


def test_quic_streams_are_never_sent_to_the_fallback(events):
    clock, dialer, auth = Clock(), FakeDialer(), FakeAuth(False)
    factory = TunnelFactory(auth, dialer, clock, TunnelSettings(fallback=FALLBACK))
    protocol = factory.buildProtocol(IPv4Address("UDP", "192.0.2.1", 40000))
    stream = StreamTransport()
    protocol.makeConnection(stream)
    protocol.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
    assert stream.disconnecting and dialer.attempts == []
    protocol.connectionLost(None)
    assert outcome_events(events)[0]["outcome"] == "bad-request"


def test_an_auth_message_after_the_deadline_is_not_looked_at(events):
    """A busy reactor may deliver data before it runs an expired timer:
    the deadline still holds."""
    protocol, client, clock, dialer, auth, factory = make(handshake_timeout=3)
    clock.rightNow += 3.5  # time passed, the timer has not run yet
    protocol.dataReceived(AUTH)
    assert auth.calls == [] and client.aborted
    protocol.connectionLost(None)
    (event,) = outcome_events(events)
    assert event["outcome"] == "handshake-timeout"


def test_the_fake_transports_are_stream_transports():
    """The fakes here stand for `IStreamTransport`s, so they must be ones."""
    assert verifyObject(IStreamTransport, Transport())
    assert verifyObject(IStreamTransport, StreamTransport())
