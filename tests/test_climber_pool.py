"""Server choice and health: strategies, backoff, recovery."""

import random

from twisted.internet.task import Clock

from climber.config import ServerEntry
from climber.pool import BACKOFF_MAX, ServerPool


def pool(strategy, n=3, seed=1):
    entries = tuple(ServerEntry(f"s{i}.example", 443, "u", "p") for i in range(n))
    clock = Clock()
    return ServerPool(entries, strategy, clock, random.Random(seed)), clock


def names(servers):
    return [s.entry.host for s in servers]


def test_failover_keeps_the_configured_order():
    p, _ = pool("failover")
    assert names(p.candidates()) == ["s0.example", "s1.example", "s2.example"]
    assert names(p.candidates()) == ["s0.example", "s1.example", "s2.example"]


def test_round_robin_rotates():
    p, _ = pool("round_robin")
    firsts = [p.candidates()[0].entry.host for _ in range(6)]
    assert firsts == ["s0.example", "s1.example", "s2.example"] * 2


def test_random_uses_every_server_and_lists_each_once():
    p, _ = pool("random")
    seen = set()
    for _ in range(60):
        order = names(p.candidates())
        assert sorted(order) == ["s0.example", "s1.example", "s2.example"]
        seen.add(order[0])
    assert len(seen) == 3


def test_fastest_measures_unmeasured_first_then_prefers_the_fastest():
    p, _ = pool("fastest")
    s0, s1, s2 = p.servers
    p.report_success(s0, 0.050)
    assert p.candidates()[0] in (s1, s2)
    p.report_success(s1, 0.010)
    p.report_success(s2, 0.030)
    assert p.candidates() == [s1, s2, s0]
    # A moving average: one slow handshake does not flip the order at once.
    p.report_success(s1, 0.040)
    assert p.candidates()[0] is s1


def test_a_failed_server_goes_last_and_comes_back_after_backoff():
    p, clock = pool("failover")
    s0, s1, s2 = p.servers
    p.report_failure(s0, "connection refused")
    assert p.candidates() == [s1, s2, s0]
    clock.advance(1.0)
    assert p.candidates() == [s0, s1, s2]
    p.report_failure(s0, "connection refused")  # backoff doubles
    clock.advance(1.5)
    assert p.candidates()[0] is s1
    clock.advance(0.5)
    assert p.candidates()[0] is s0
    p.report_success(s0, 0.01)
    assert not s0.down and s0.failures == 0


def test_backoff_is_capped():
    p, clock = pool("failover")
    s0 = p.servers[0]
    for _ in range(20):
        p.report_failure(s0, "timeout")
    assert s0.down_until - clock.seconds() == BACKOFF_MAX


def test_when_all_are_down_the_soonest_retry_comes_first():
    p, clock = pool("failover")
    s0, s1, s2 = p.servers
    p.report_failure(s0, "x")
    p.report_failure(s0, "x")
    p.report_failure(s1, "x")
    p.report_failure(s2, "x")
    p.report_failure(s2, "x")
    p.report_failure(s2, "x")
    assert p.candidates() == [s1, s0, s2]
