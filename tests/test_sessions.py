"""Per-user policy while tunnels run, in memory with a fake clock: rate
limits (token buckets pausing valves), admission, revocation when rows
change, and the bookkeeping of traffic flushes (exactly once, kept through
failures).  The SQL of those flushes is tested against the real databases
in test_userstores.py and end to end in e2e/test_users_e2e.py."""

from datetime import datetime

import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from mtop.ratelimit import MIN_BURST, TokenBucket
from mtop.relay import Valve
from mtop.sessions import UserSessions
from mtop.userstore import StoreUnavailable, UserRecord


class Pausable:
    def __init__(self):
        self.paused = False
        self.pauses = 0

    def pauseProducing(self):
        assert not self.paused
        self.paused = True
        self.pauses += 1

    def resumeProducing(self):
        assert self.paused
        self.paused = False


def test_valve_holds_while_any_reason_does():
    transport = Pausable()
    valve = Valve(transport)
    valve.pauseProducing()
    valve.pause("rate")
    valve.resumeProducing()
    assert transport.paused
    valve.resume("rate")
    assert not transport.paused
    valve.resume("rate")  # not paused for that reason: nothing happens
    assert not transport.paused


def test_token_bucket_keeps_the_average_rate():
    clock = Clock()
    transport = Pausable()
    valve = Valve(transport)
    bucket = TokenBucket(clock, 100_000)
    sent = 0
    # A sender that writes 32 KiB whenever it is not paused, for 10 s.
    while clock.seconds() < 10:
        if not transport.paused:
            bucket.spend(valve, 32768)
            sent += 32768
        else:
            clock.advance(0.001)
    # 10 s at 100 kB/s, plus the first burst and one chunk at most.
    assert 1_000_000 <= sent <= 1_000_000 + MIN_BURST + 2 * 32768
    assert transport.pauses > 10


def test_bucket_shared_by_two_valves_pauses_both_and_resumes_both():
    clock = Clock()
    a, b = Pausable(), Pausable()
    va, vb = Valve(a), Valve(b)
    bucket = TokenBucket(clock, 10_000)
    bucket.spend(va, MIN_BURST + 20_000)  # 2 s of debt
    bucket.spend(vb, 1)
    assert a.paused and b.paused
    clock.advance(1.9)
    assert a.paused and b.paused
    clock.advance(0.2)
    assert not a.paused and not b.paused


def test_rate_change_applies_to_paused_tunnels():
    clock = Clock()
    a = Pausable()
    va = Valve(a)
    bucket = TokenBucket(clock, 1_000)
    bucket.spend(va, 100_000)  # 100 s of debt at 1 kB/s
    bucket.set_rate(10_000_000)
    clock.advance(0.1)
    assert not a.paused


class FakeRelay:
    def __init__(self):
        self.bytes_up = 0
        self.bytes_down = 0
        self.meter = None
        self.client_valve = Valve(Pausable())
        self.target_valve = Valve(Pausable())


class FakeTunnel:
    def __init__(self):
        self.relay = FakeRelay()
        self.revoked = None

    def revoke(self, outcome, detail):
        self.revoked = (outcome, detail)


class FakeAuthenticator:
    query_timeout = 5.0

    def __init__(self):
        self.forgotten = []

    def forget(self, username=None):
        self.forgotten.append(username)


class Store:
    """Rows and flushes in memory; ``broken`` makes every call fail."""

    counts_usage = True

    def __init__(self):
        self.rows = {}
        self.flushes = []
        self.applied = set()
        self.broken = False
        self.pending_flush = None

    def lookup_many(self, names):
        if self.broken:
            return fail(StoreUnavailable("down"))
        return succeed({n: self.rows[n] for n in names if n in self.rows})

    def add_usage(self, server_id, seq, usage):
        if self.broken:
            return fail(StoreUnavailable("down"))
        if self.pending_flush is not None:
            return self.pending_flush
        self.flushes.append((seq, dict(usage)))
        if (server_id, seq) in self.applied:
            return succeed(False)
        self.applied.add((server_id, seq))
        for name, u in usage.items():
            row = self.rows[name]
            self.rows[name] = UserRecord(
                name, "", "", quota_bytes=row.quota_bytes, bytes_up=row.bytes_up + u.up, bytes_down=row.bytes_down + u.down
            )
        return succeed(True)


@pytest.fixture
def sessions():
    clock, store = Clock(), Store()
    clock.advance(1_800_000_000)  # 2027: expiry dates compare with this
    store.rows["ann"] = UserRecord("ann", "", "")
    s = UserSessions(store, FakeAuthenticator(), clock, recheck_interval=5, flush_interval=5)
    s.startService()
    yield s, store, clock
    s._loops and [loop.stop() for loop in s._loops if loop.running]


def open_tunnel(s, name="ann", record=None):
    tunnel = FakeTunnel()
    refusal = s.admit(tunnel, name, record or s.store.rows[name])
    if refusal is None:
        s.relay_started(tunnel, name)
    return tunnel, refusal


def test_max_connections_per_user(sessions):
    s, store, clock = sessions
    store.rows["ann"] = UserRecord("ann", "", "", max_connections=2)
    t1, r1 = open_tunnel(s)
    t2, r2 = open_tunnel(s)
    t3, r3 = open_tunnel(s)
    assert r1 is None and r2 is None and "max_connections 2" in r3
    s.release(t1, "ann")
    assert open_tunnel(s)[1] is None


def test_rate_limit_is_shared_and_follows_the_row(sessions):
    s, store, clock = sessions
    store.rows["ann"] = UserRecord("ann", "", "", rate_limit=50_000)
    t1, _ = open_tunnel(s)
    t2, _ = open_tunnel(s)
    assert t1.relay.meter is t2.relay.meter is not None
    store.rows["ann"] = UserRecord("ann", "", "")
    clock.advance(5)
    assert t1.relay.meter is None and t2.relay.meter is None


@pytest.mark.parametrize(
    "change, outcome",
    [
        (None, "user-deleted"),
        (UserRecord("ann", "", "", enabled=False), "user-disabled"),
        (UserRecord("ann", "", "", expires_at=datetime(1999, 1, 1)), "user-expired"),
        (UserRecord("ann", "", "", quota_bytes=1000, bytes_up=999, bytes_down=1), "over-quota"),
    ],
)
def test_open_tunnels_close_when_the_row_says_so(sessions, change, outcome):
    s, store, clock = sessions
    t1, _ = open_tunnel(s)
    t2, _ = open_tunnel(s)
    if change is None:
        del store.rows["ann"]
    else:
        store.rows["ann"] = change
    clock.advance(4.9)
    assert t1.revoked is None
    clock.advance(0.2)
    assert t1.revoked[0] == t2.revoked[0] == outcome
    assert "ann" in s.authenticator.forgotten


def test_quota_counts_traffic_not_yet_written(sessions):
    s, store, clock = sessions
    store.rows["ann"] = UserRecord("ann", "", "", quota_bytes=10_000, bytes_up=4_000)
    t1, _ = open_tunnel(s)
    t1.relay.bytes_down = 6_000
    assert "quota" in open_tunnel(s)[1]
    s.recheck()
    assert t1.revoked[0] == "over-quota"


def test_notification_rechecks_at_once(sessions):
    s, store, clock = sessions
    t1, _ = open_tunnel(s)
    store.rows["ann"] = UserRecord("ann", "", "", enabled=False)
    s.user_changed("ann")
    s.user_changed("bob")  # no tunnels: only the cache is dropped
    clock.advance(0)
    assert t1.revoked[0] == "user-disabled"
    assert s.authenticator.forgotten[:2] == ["ann", "bob"]


def test_store_outage_leaves_open_tunnels_alone(sessions):
    s, store, clock = sessions
    t1, _ = open_tunnel(s)
    store.broken = True
    clock.advance(30)
    assert t1.revoked is None


def test_traffic_is_flushed_once_and_survives_failures(sessions):
    s, store, clock = sessions
    store.rows["bob"] = UserRecord("bob", "", "")
    t1, _ = open_tunnel(s)
    t2, _ = open_tunnel(s, "bob")
    t1.relay.bytes_up, t1.relay.bytes_down = 100, 1000
    clock.advance(5)
    assert store.rows["ann"].bytes_up == 100 and store.rows["ann"].bytes_down == 1000
    # The database goes away: traffic gathers in memory.
    store.broken = True
    t1.relay.bytes_up = 150
    clock.advance(5)
    t2.relay.bytes_down = 70
    s.release(t2, "bob")  # a tunnel that ends during the outage
    t1.relay.bytes_down = 1500
    clock.advance(5)
    assert store.rows["ann"].bytes_up == 100
    store.broken = False
    clock.advance(5)  # the kept batch, retried as it was
    clock.advance(5)  # and what came after it
    assert (store.rows["ann"].bytes_up, store.rows["ann"].bytes_down) == (150, 1500)
    assert store.rows["bob"].bytes_down == 70
    seqs = [seq for seq, _ in store.flushes]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def test_a_flush_whose_answer_is_lost_is_retried_with_the_same_number(sessions):
    s, store, clock = sessions
    t1, _ = open_tunnel(s)
    t1.relay.bytes_up = 10
    store.pending_flush = Deferred()
    clock.advance(5)
    # The database applied it but the answer never came: the flush times out.
    store.applied.add((s.server_id, 1))
    store.rows["ann"] = UserRecord("ann", "", "", bytes_up=10)
    clock.advance(s.flush_timeout)
    store.pending_flush = None
    t1.relay.bytes_up = 15
    clock.advance(5)  # seq 1 again: already applied, not counted twice
    clock.advance(5)  # seq 2: the 5 new bytes
    assert store.rows["ann"].bytes_up == 15
    assert [seq for seq, _ in store.flushes] == [1, 2]


def test_stopping_flushes_what_is_left(sessions):
    s, store, clock = sessions
    t1, _ = open_tunnel(s)
    t1.relay.bytes_down = 42
    d = s.stopService()
    assert store.rows["ann"].bytes_down == 42
    assert d.called
