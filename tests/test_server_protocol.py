"""The handshake state machine in memory: StringTransport, Clock, fakes."""

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher

from mtop import wire
from mtop.userstore import UserRecord
from mtop.server import ServerSettings, TunnelFactory


class Transport(StringTransport):
    """StringTransport with half-close, abort and producer bookkeeping."""

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


class FakeAuth:
    """Logs everyone in (``result`` True) or no one (False); a Deferred
    ``result`` is returned as it is."""

    def __init__(self, result=True):
        self.result = result
        self.calls = []

    def login(self, username, password):
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

    def fail(self):
        self.attempts[-1]["d"].errback(ConnectionRefusedError())


@pytest.fixture
def events():
    captured = []
    globalLogPublisher.addObserver(captured.append)
    yield captured
    globalLogPublisher.removeObserver(captured.append)


def outcome_events(events):
    return [e for e in events if e.get("tunnel_event")]


def make(result=True, **settings):
    clock, dialer, auth = Clock(), FakeDialer(), FakeAuth(result)
    factory = TunnelFactory(auth, dialer, clock, ServerSettings(**settings))
    protocol = factory.buildProtocol(None)
    transport = Transport()
    protocol.makeConnection(transport)
    return protocol, transport, clock, dialer, auth, factory


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
