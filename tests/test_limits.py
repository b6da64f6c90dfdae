"""Connection limits and the failed-login throttle (pure, with a Clock)."""

import pytest
from twisted.internet.task import Clock

from mtop.limits import MAX_TRACKED, AuthThrottle, ConnectionLimits, LimitSettings, ThrottleSettings, client_key


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


def test_limits_count_and_release():
    limits = ConnectionLimits(LimitSettings(max_tunnels=3, max_handshakes=2, max_per_client=2))
    assert limits.refusal("a") is None
    limits.opened("a")
    limits.opened("a")
    assert limits.refusal("a") == "max-handshakes"
    limits.handshake_done()
    assert limits.refusal("a") == "max-per-client"
    assert limits.refusal("b") is None
    limits.opened("b")
    assert limits.refusal("c") == "max-tunnels"
    limits.closed("a", handshaking=False)
    limits.closed("a", handshaking=True)
    limits.closed("b", handshaking=True)
    assert (limits.open, limits.handshaking, limits.per_client) == (0, 0, {})


def test_zero_means_no_limit():
    limits = ConnectionLimits(LimitSettings())
    for _ in range(10000):
        limits.opened("a")
    assert limits.refusal("a") is None


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
