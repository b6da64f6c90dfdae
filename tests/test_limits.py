"""Connection limits and the failed-login throttle (pure, with a Clock)."""

import pytest
from twisted.internet.task import Clock

from mtop.limits import MAX_TRACKED, AuthThrottle, ConnectionLimits, LimitSettings, LoginGate, ThrottleSettings, client_key


@pytest.mark.parametrize(
    "host,key",
    [
        ("192.0.2.1", "192.0.2.1"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::9", "2001:db8:1:2::/64"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("fe80::1%eth0", "fe80::/64"),
        ("/run/mtop.sock", "/run/mtop.sock"),
    ],
)
def test_client_key(host, key):
    assert client_key(host) == key


class Conn:
    """A connection as the limits see it."""

    def __init__(self, key):
        self.client_key = key
        self.evicted = False

    def evict(self):
        self.evicted = True


def test_limits_count_and_release():
    limits = ConnectionLimits(LimitSettings(max_tunnels=3, max_handshakes=2, max_per_client=2))
    assert limits.refusal("a") is None
    a1, a2, b1 = Conn("a"), Conn("a"), Conn("b")
    limits.opened(a1)
    limits.opened(a2)
    # The pool is full, but "a" holds it all: another "a" is refused, while
    # "b" would take a slot from "a" (see the eviction test).
    assert limits.refusal("a") == "max-per-client"
    limits.logged_in(a1)
    assert limits.refusal("a") == "max-per-client"
    assert limits.refusal("b") is None
    limits.opened(b1)
    assert limits.refusal("c") == "max-tunnels"
    limits.closed(a1)
    limits.closed(a2)
    limits.closed(b1)
    assert (limits.open, limits.handshaking, limits.per_client) == (0, 0, {})
    assert not any(c.evicted for c in (a1, a2, b1))


def test_zero_means_no_limit():
    limits = ConnectionLimits(LimitSettings())
    for _ in range(10000):
        limits.opened(Conn("a"))
    assert limits.refusal("a") is None


def test_pre_login_budget_per_address():
    limits = ConnectionLimits(LimitSettings(max_handshakes=100, max_handshakes_per_client=3))
    held = [Conn("a") for _ in range(3)]
    for conn in held:
        limits.opened(conn)
    assert limits.refusal("a") == "max-handshakes-per-client"
    assert limits.refusal("b") is None
    # Logged-in connections no longer count against the budget.
    limits.logged_in(held[0])
    assert limits.refusal("a") is None
    assert limits.pre_login("a") == 2 and limits.open == 3


def test_quic_streams_take_no_pre_login_slot_but_count_as_tunnels():
    """A QUIC connection holds one pre-login slot; its streams are held to
    the tunnel limits only, so 300 logins at once on one connection fit."""
    limits = ConnectionLimits(LimitSettings(max_handshakes=100, max_handshakes_per_client=3, max_per_client=301))
    connection = Conn("a")
    limits.opened(connection)
    streams = [Conn("a") for _ in range(300)]
    for stream in streams:
        assert limits.refusal("a", pre_login=False) is None
        limits.opened(stream, pre_login=False)
    assert limits.pre_login("a") == 1 and limits.handshaking == 1 and limits.open == 301
    assert limits.refusal("a", pre_login=False) == "max-per-client"
    for stream in streams:
        limits.logged_in(stream)
        limits.closed(stream)
    limits.closed(connection)
    assert (limits.open, limits.handshaking, limits.per_client) == (0, 0, {})


def test_full_pool_evicts_the_oldest_of_the_busiest_address():
    limits = ConnectionLimits(LimitSettings(max_handshakes=6))
    a = [Conn("a") for _ in range(4)]
    b = [Conn("b") for _ in range(2)]
    for conn in a + b:
        limits.opened(conn)
    assert limits.handshaking == 6
    # "c" holds nothing: it gets a slot, taken from "a"'s oldest.
    assert limits.refusal("c") is None
    c1 = Conn("c")
    limits.opened(c1)
    assert a[0].evicted and not any(conn.evicted for conn in a[1:] + b)
    assert limits.handshaking == 6 and limits.pre_login("a") == 3
    assert limits.counters["evicted"] == 1
    # The evicted connection goes later; its close frees only its open slot.
    limits.closed(a[0])
    assert limits.handshaking == 6 and limits.open == 6
    # Shares even out: "c" takes from "a" again (3 > 1 + 1), then "b" and
    # "a" hold 2 each and "c" 2: nobody holds more than a newcomer from
    # "c" plus one, so "c" is refused.
    limits.opened(Conn("c"))
    assert a[1].evicted
    assert limits.refusal("c") == "max-handshakes"
    # A new address still gets in.
    assert limits.refusal("d") is None


def test_forty_addresses_of_fifty_leave_room_for_a_newcomer():
    limits = ConnectionLimits(LimitSettings(max_handshakes=1024, max_handshakes_per_client=64))
    live = []
    for i in range(40):
        for _ in range(50):
            key = f"10.0.0.{i}"
            if limits.refusal(key) is None:
                conn = Conn(key)
                limits.opened(conn)
                live.append(conn)
        live = [c for c in live if not c.evicted or limits.closed(c)]
    assert limits.handshaking == 1024
    assert limits.refusal("192.0.2.1") is None
    shares = [limits.pre_login(f"10.0.0.{i}") for i in range(40)]
    assert max(shares) - min(shares) <= 2, shares


def test_login_gate_lets_a_few_in_per_address_then_queues():
    gate = LoginGate(2)
    started = []
    for i in range(5):
        gate.turn("a").addCallback(lambda _, i=i: started.append(i))
    gate.turn("b").addCallback(lambda _: started.append("b"))
    assert started == [0, 1, "b"]
    assert gate.in_flight("a") == 2 and gate.waiting("a") == 3
    gate.done("a")
    assert started == [0, 1, "b", 2]
    # A waiter that gives up leaves the queue.
    waiting = gate.turn("a")
    waiting.addErrback(lambda f: started.append("gave up"))
    waiting.cancel()
    assert gate.waiting("a") == 2
    for _ in range(5):
        gate.done("a")
    assert started == [0, 1, "b", 2, "gave up", 3, 4]
    assert gate.in_flight("a") == 0 and gate.waiting("a") == 0


def test_throttle_bans_after_failures_in_window_then_forgives():
    clock = Clock()
    throttle = AuthThrottle(clock, ThrottleSettings(max_failures=3, window=10, ban=60))
    assert not throttle.failed("a")
    clock.advance(11)  # out of the window: forgotten
    assert not throttle.failed("a")
    assert not throttle.failed("a")
    assert not throttle.banned("a")
    assert throttle.failed("a")
    assert throttle.banned("a") and not throttle.banned("b")
    assert throttle.counters["throttle.banned"] == 1 and throttle.banned_count == 1
    clock.advance(59)
    assert throttle.banned("a")
    clock.advance(1.5)
    assert not throttle.banned("a")
    assert not throttle.failed("a")  # a fresh start after the ban


def test_throttle_off():
    throttle = AuthThrottle(Clock(), ThrottleSettings(max_failures=0))
    assert not any(throttle.failed("a") for _ in range(100))


def test_throttle_memory_is_bounded():
    throttle = AuthThrottle(Clock(), ThrottleSettings(max_failures=2))
    for i in range(MAX_TRACKED + 50):
        throttle.failed(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}")
    assert len(throttle._failures) == MAX_TRACKED
