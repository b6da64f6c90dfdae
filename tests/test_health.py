"""Readiness (`mtop.health`) and the graceful stop (`mtop.drain`), on a fake
clock; served over HTTP by a real twisted.web site on 127.0.0.1."""

from __future__ import annotations

import signal
import urllib.error
import urllib.request

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread

from mtop.drain import POLL, Drain
from mtop.health import PROBE_INTERVAL, Health, health_site


class Listener:
    def __init__(self, label="MTop TLS", listening=True):
        self.label = label
        self.port = object() if listening else None
        self.stopped = 0

    def stop_accepting(self):
        self.stopped += 1
        self.port = None


class Store:
    """A store whose ``ping`` answers as ``answers`` says."""

    def __init__(self):
        self.answers = True
        self.pings = 0

    def ping(self):
        self.pings += 1
        if self.answers is None:
            return Deferred()  # never answers
        return succeed(None) if self.answers else fail(ConnectionRefusedError("connection refused"))


def started(health):
    health.startService()
    return health


def test_ready_when_listening_and_the_database_answers():
    clock, store = Clock(), Store()
    health = started(Health(clock, [Listener(), Listener("MTop QUIC")], store, outage_grace=60, tunnels={1, 2}))
    ready, reasons, notes = health.status()
    assert ready and reasons == []
    assert "listeners: 2 of 2 listening" in notes and "tunnels: 2 open" in notes
    assert store.pings == 1
    clock.advance(PROBE_INTERVAL)
    assert store.pings == 2


def test_not_ready_while_draining_or_a_listener_is_down():
    health = started(Health(Clock(), [Listener(), Listener("MTop QUIC", listening=False)], Store()))
    ready, reasons, _ = health.status()
    assert not ready and reasons == ["not listening: MTop QUIC"]
    health.draining = True
    assert health.status()[1] == ["draining", "not listening: MTop QUIC"]


def test_a_database_outage_is_covered_by_the_outage_grace_then_not():
    clock, store = Clock(), Store()
    grace = [30.0]
    health = started(Health(clock, [Listener()], store, outage_grace=lambda: grace[0]))
    store.answers = False
    clock.advance(PROBE_INTERVAL)
    ready, reasons, notes = health.status()
    assert ready, reasons
    assert any("not answering for 0s (connection refused)" in note and "still accepted" in note for note in notes)
    clock.advance(30)
    ready, reasons, _ = health.status()
    assert not ready and reasons == ["database not answering"]
    grace[0] = 0  # a reload without a grace
    store.answers = True
    clock.advance(PROBE_INTERVAL)
    assert health.status()[0]


def test_a_probe_that_hangs_times_out_and_is_not_stacked():
    clock, store = Clock(), Store()
    health = started(Health(clock, [Listener()], store, outage_grace=0, query_timeout=5))
    store.answers = None
    clock.advance(PROBE_INTERVAL)  # this probe hangs
    clock.advance(PROBE_INTERVAL)  # still out: not asked again
    assert store.pings == 2
    clock.advance(5)
    ready, reasons, notes = health.status()
    assert not ready and reasons == ["database not answering"], notes
    health.stopService()


def test_not_ready_before_the_database_was_asked():
    health = Health(Clock(), [Listener()], Store())
    assert health.status()[1] == ["database not asked yet"]


@pytest_twisted.ensureDeferred
async def test_served_over_http_with_the_status_and_reasons():
    health = started(Health(Clock(), [Listener()], Store(), tunnels=set()))
    port = reactor.listenTCP(0, health_site(health), interface="127.0.0.1")
    base = f"http://127.0.0.1:{port.getHost().port}"

    def get(path, method="GET"):
        request = urllib.request.Request(base + path, method=method)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    try:
        for path in ("/health", "/healthz", "/readyz"):
            status, body = await deferToThread(get, path)
            assert status == 200 and body.splitlines()[0] == "ready", body
        assert (await deferToThread(get, "/health", "HEAD"))[0] == 200
        health.draining = True
        status, body = await deferToThread(get, "/health")
        assert status == 503 and body.startswith("not ready: draining\n") and "tunnels: 0 open" in body
        assert await deferToThread(get, "/livez") == (200, "live\n")
        assert (await deferToThread(get, "/metrics"))[0] == 404
    finally:
        await port.stopListening()


# The drain


class Factory:
    def __init__(self, tunnels=()):
        self.tunnels = set(tunnels)
        self.idle_closed = 0

    def close_idle(self):
        self.idle_closed += 1
        return 0


def test_a_drain_stops_accepting_and_waits_for_the_tunnels():
    clock = Clock()
    factory, listeners = Factory({"a", "b"}), [Listener(), Listener()]
    health = Health(clock, listeners)
    drain = Drain(clock, factory, listeners, lambda: 30.0, health, install_signals=False)
    done = drain()
    assert health.draining and factory.idle_closed == 1
    assert [listener.stopped for listener in listeners] == [1, 1]
    assert not health.status()[0]
    clock.advance(10)
    factory.tunnels.discard("a")
    clock.advance(10)
    assert not done.called
    factory.tunnels.clear()
    clock.advance(POLL)
    assert done.called


def test_a_drain_ends_at_its_timeout_or_at_a_second_signal():
    clock = Clock()
    factory = Factory({"a"})
    drain = Drain(clock, factory, [], lambda: 5.0, install_signals=False)
    done = drain()
    clock.advance(4.9)
    assert not done.called
    clock.advance(0.2)
    assert done.called and factory.tunnels == {"a"}  # what is left is closed by the stop that follows

    drain = Drain(clock, factory, [], lambda: 5.0, install_signals=False)
    done = drain()
    drain.cut()
    assert done.called


def test_no_drain_with_a_zero_timeout():
    clock, listener = Clock(), Listener()
    done = Drain(clock, Factory({"a"}), [listener], lambda: 0.0, install_signals=False)()
    assert done.called and listener.stopped == 0


def test_sigterm_ends_the_drain_and_after_it_is_ignored_without_a_traceback():
    clock = Clock()
    before = signal.getsignal(signal.SIGTERM)
    drain = Drain(clock, Factory({"a"}), [], lambda: 30.0)
    done = drain()
    try:
        assert signal.getsignal(signal.SIGTERM) is not before
        cuts = []
        drain.cut = lambda: cuts.append(1)  # what the handler schedules
        from twisted.internet import reactor as installed

        calls = []
        original = installed.callFromThread
        installed.callFromThread = lambda f, *a: calls.append(f)
        try:
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        finally:
            installed.callFromThread = original
        assert len(calls) == 1
        calls[0]()
        assert cuts == [1]
        Drain.cut(drain)
        assert done.called
        # Stopping goes on (the last flush): a further SIGTERM (ss-server
        # sends its plugin two) is noted, not passed to twistd's handler,
        # which would try to stop the stopping reactor.
        handler = signal.getsignal(signal.SIGTERM)
        assert handler is not before
        installed.callFromThread = lambda f, *a: calls.append(f)
        try:
            handler(signal.SIGTERM, None)
        finally:
            installed.callFromThread = original
        calls[1]()
        assert cuts == [1]
    finally:
        drain.restore_signals()
    assert signal.getsignal(signal.SIGTERM) is before


@pytest_twisted.ensureDeferred
async def test_the_health_listener_takes_a_proxy_header_or_none():
    """HAProxy's ``check-send-proxy`` starts the check with a PROXY header
    (v2 LOCAL, or v1): answered as a plain request is."""
    import socket

    from mtop.config import ListenAddress
    from mtop.health import health_service
    from test_proxyproto import v2

    health = started(Health(Clock(), [Listener()], Store()))
    service = health_service(reactor, ListenAddress("127.0.0.1", 0), health)
    service.startService()
    port = service.port.getHost().port

    def ask(prefix: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(prefix + b"GET /health HTTP/1.0\r\nHost: x\r\n\r\n")
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
            return answer

    try:
        for prefix in (b"", v2(command=0, family=0, body=b""), v2(), b"PROXY TCP4 10.0.0.1 10.0.0.2 1234 9101\r\n"):
            answer = await deferToThread(ask, prefix)
            assert answer.startswith(b"HTTP/1.0 200 ") and answer.endswith(b"\r\n\r\nready\nlisteners: 1 of 1 listening\n" + b"database: answered 0.0s ago\n"), answer
        health.draining = True
        assert (await deferToThread(ask, v2()))[:13] == b"HTTP/1.0 503 "
    finally:
        await service.stopService()
