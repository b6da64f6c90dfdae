"""Per-user policy while tunnels run, in memory with a fake clock: rate
limits (token buckets pausing valves), admission, revocation when rows
change, and the bookkeeping of traffic flushes (exactly once, kept through
failures).  The SQL of those flushes is tested against the real databases
in test_userstores.py and end to end in e2e/test_users_e2e.py."""

from datetime import datetime

import pytest
from twisted.application.service import Service
from twisted.python.failure import Failure
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mtop.ratelimit import MIN_BURST, TokenBucket
from mtop.relay import Valve
from mtop.sessions import UserSessions
from mtop.userstore import (
    IUsageSink,
    IUserChangeFeed,
    IUserStore,
    StoreUnavailable,
    UsageCounting,
    UserRecord,
)


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


@implementer(IUserStore, IUsageSink)
class Store:
    """Rows and flushes in memory; ``broken`` makes every call fail."""

    usage_counting = UsageCounting.COUNTED

    def __init__(self):
        self.rows = {}
        self.flushes = []
        self.applied = set()
        self.broken = False
        self.pending_flush = None

    def lookup(self, username):
        return self.lookup_many([username]).addCallback(lambda rows: rows.get(username))

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


def test_a_last_flush_that_fails_once_is_tried_again(sessions):
    """A deadlock victim's flush at stop is not the end of its traffic."""
    s, store, clock = sessions
    t1, _ = open_tunnel(s)
    t1.relay.bytes_down = 42
    failures = []
    add_usage = store.add_usage

    def once_broken(server_id, seq, usage):
        if not failures:
            failures.append(seq)
            return fail(StoreUnavailable("Deadlock found when trying to get lock (1213)"))
        return add_usage(server_id, seq, usage)

    store.add_usage = once_broken
    done = []
    s.stopService().addBoth(done.append)
    assert not done and store.rows["ann"].bytes_down == 0
    clock.advance(0.5)
    assert len(done) == 1 and not isinstance(done[0], Failure) and store.rows["ann"].bytes_down == 42
    assert [seq for seq, _ in store.flushes] == failures  # the same batch, once


def test_the_fake_store_provides_what_it_declares():
    store = Store()
    verifyObject(IUserStore, store)
    verifyObject(IUsageSink, store)


def test_traffic_is_kept_while_the_store_cannot_say_whether_it_counts(sessions):
    s, store, clock = sessions
    store.usage_counting = UsageCounting.UNKNOWN
    t1, _ = open_tunnel(s)
    t1.relay.bytes_up = 30
    s.release(t1, "ann")
    clock.advance(5)
    clock.advance(5)
    assert store.flushes == [] and s.pending["ann"].up == 30
    store.usage_counting = UsageCounting.COUNTED
    clock.advance(5)
    assert store.rows["ann"].bytes_up == 30
    assert [seq for seq, _ in store.flushes] == [1]


def test_traffic_is_dropped_when_the_table_has_no_counters(sessions):
    s, store, clock = sessions
    store.usage_counting = UsageCounting.NOT_COUNTED
    t1, _ = open_tunnel(s)
    t1.relay.bytes_up = 30
    s.release(t1, "ann")
    clock.advance(5)
    assert store.flushes == [] and s.pending == {}


@implementer(IUserStore)
class LookupOnlyStore:
    """A store that only reads rows: no usage sink, no change feed, no
    service.  Its undeclared ``watch`` and ``add_usage`` are never used."""

    def __init__(self):
        self.rows = {"ann": UserRecord("ann", "", "")}
        self.used = []

    def lookup(self, username):
        return succeed(self.rows.get(username))

    def lookup_many(self, names):
        return succeed({n: self.rows[n] for n in names if n in self.rows})

    def watch(self, on_change):
        self.used.append("watch")

    def add_usage(self, server_id, seq, usage):
        self.used.append("add_usage")
        return succeed(True)


def test_a_store_that_only_reads_rows_is_enough():
    clock, store = Clock(), LookupOnlyStore()
    verifyObject(IUserStore, store)
    s = UserSessions(store, FakeAuthenticator(), clock, recheck_interval=5, flush_interval=5)
    s.startService()
    assert list(s) == []  # not a service: not a child
    tunnel = FakeTunnel()
    assert s.admit(tunnel, "ann", store.rows["ann"]) is None
    s.relay_started(tunnel, "ann")
    tunnel.relay.bytes_down = 99
    store.rows["ann"] = UserRecord("ann", "", "", enabled=False)
    clock.advance(5)
    assert tunnel.revoked[0] == "user-disabled"
    s.release(tunnel, "ann")
    d = s.stopService()
    assert d.called and store.used == [] and s.pending == {}


@implementer(IUserStore, IUserChangeFeed)
class WatchedStore(Service, LookupOnlyStore):
    """A store that is a service and tells of changes."""

    def __init__(self):
        LookupOnlyStore.__init__(self)
        self.watchers = []

    def watch(self, on_change):
        self.watchers.append(on_change)


def test_a_change_feed_and_a_service_are_used_when_declared():
    clock, store = Clock(), WatchedStore()
    verifyObject(IUserStore, store)
    verifyObject(IUserChangeFeed, store)
    s = UserSessions(store, FakeAuthenticator(), clock, recheck_interval=60, flush_interval=60)
    assert store.parent is s
    s.startService()
    assert store.running
    tunnel = FakeTunnel()
    s.admit(tunnel, "ann", store.rows["ann"])
    del store.rows["ann"]
    [changed] = store.watchers
    changed("ann")
    clock.advance(0)
    assert tunnel.revoked[0] == "user-deleted"
    s.stopService()
    assert not store.running


# Quota leases (the SQL of grants: test_userstores.py)


from mtop.sessions import LEASE_SLICE_MIN  # noqa: E402
from mtop.userstore import IQuotaLeases  # noqa: E402


@implementer(IUserStore, IUsageSink, IQuotaLeases)
class LeasingStore(Store):
    """Grants are answered when the test says (``answer``)."""

    leases_available = True

    def __init__(self):
        super().__init__()
        self.asked = []
        self.renewed = 0

    def lease_quota(self, server_id, username, want, ttl):
        d = Deferred()
        self.asked.append((username, want, d))
        return d

    def renew_leases(self, server_id, ttl):
        self.renewed += 1
        return succeed(None)

    def answer(self, granted):
        _, want, d = self.asked[-1]
        d.callback(granted if granted != "want" else want)


@pytest.fixture
def leasing():
    clock, store = Clock(), LeasingStore()
    clock.advance(1_800_000_000)
    store.rows["ann"] = UserRecord("ann", "", "", quota_bytes=64 * LEASE_SLICE_MIN)
    s = UserSessions(store, FakeAuthenticator(), clock, recheck_interval=5, flush_interval=5)
    s.startService()
    yield s, store, clock
    [loop.stop() for loop in s._loops if loop.running]


def spend(tunnel, size):
    tunnel.relay.bytes_up += size
    tunnel.relay.meter.spent_up(tunnel.relay, size)


def test_a_leased_quota_is_spent_slice_by_slice(leasing):
    s, store, clock = leasing
    tunnel, refusal = open_tunnel(s)
    assert refusal is None and len(store.asked) == 1  # asked at admission
    assert store.asked[0][1] == LEASE_SLICE_MIN  # a 64th of the quota
    store.answer("want")
    spend(tunnel, LEASE_SLICE_MIN // 4)
    assert len(store.asked) == 1  # more than half a slice left
    spend(tunnel, LEASE_SLICE_MIN // 2)
    assert len(store.asked) == 2  # below half: the next slice is asked for
    spend(tunnel, LEASE_SLICE_MIN // 4)  # none left, the grant not back yet
    valve = tunnel.relay.client_valve
    assert valve.transport.paused
    store.answer("want")
    assert not valve.transport.paused  # resumed by the grant
    # The quota is used up on all servers together: the tunnels close.
    spend(tunnel, LEASE_SLICE_MIN)
    store.answer(0)
    clock.advance(0)
    assert tunnel.revoked[0] == "over-quota"


def test_the_unused_part_of_a_lease_goes_back_with_the_next_flush(leasing):
    s, store, clock = leasing
    tunnel, _ = open_tunnel(s)
    store.answer(1000)
    spend(tunnel, 300)
    s.release(tunnel, "ann")
    clock.advance(5)
    (seq, usage), = store.flushes
    assert usage["ann"].up == 300 and usage["ann"].release == 700


def test_leases_are_renewed_at_each_recheck_while_held(leasing):
    s, store, clock = leasing
    tunnel, _ = open_tunnel(s)
    store.answer(1000)
    clock.advance(5)
    assert store.renewed == 1
    s.release(tunnel, "ann")
    clock.advance(5)
    assert store.renewed == 1  # none held: no renewal


def test_when_the_store_cannot_lease_the_server_counts_on_its_own(leasing):
    s, store, clock = leasing
    store.rows["ann"] = UserRecord("ann", "", "", quota_bytes=1000, bytes_up=400)
    tunnel, _ = open_tunnel(s)
    _, _, d = store.asked[-1]
    d.errback(StoreUnavailable("down"))
    # This server's own count: 600 left, granted on credit.
    spend(tunnel, 599)
    assert not tunnel.relay.client_valve.transport.paused and tunnel.revoked is None
    spend(tunnel, 2)
    store.asked[-1][2].errback(StoreUnavailable("down"))
    clock.advance(0)
    assert tunnel.revoked[0] == "over-quota"


def test_without_the_lease_table_the_quota_is_counted_here(leasing):
    s, store, clock = leasing
    store.leases_available = False
    store.rows["ann"] = UserRecord("ann", "", "", quota_bytes=1000)
    tunnel, _ = open_tunnel(s)
    assert store.asked == []
    spend(tunnel, 1000)
    clock.advance(0)
    assert tunnel.revoked[0] == "over-quota"


def test_a_new_tunnel_moves_nothing_before_a_grant(leasing):
    """A user cut at the quota who logs in again must not move a read's
    worth each time: a tunnel with nothing leased waits for a grant."""
    s, store, clock = leasing
    tunnel, _ = open_tunnel(s)
    valves = tunnel.relay.client_valve, tunnel.relay.target_valve
    assert all(v.transport.paused for v in valves)
    store.answer(0)
    clock.advance(0)
    assert tunnel.revoked[0] == "over-quota"
    tunnel2, _ = open_tunnel(s)
    assert tunnel2.relay.client_valve.transport.paused
    store.answer("want")
    assert not tunnel2.relay.client_valve.transport.paused and not tunnel2.relay.target_valve.transport.paused


# Presence: max_connections and rate_limit across servers (the SQL:
# test_userstores.py)


from mtop.userstore import IPresence  # noqa: E402


@implementer(IUserStore, IUsageSink, IPresence)
class PresenceStore(Store):
    """Servers sharing one in-memory presence table (``table``: server_id
    -> {username: (tunnels, active)})."""

    presence_available = True

    def __init__(self, table, rows):
        super().__init__()
        self.table = table
        self.rows = rows
        self.published = 0
        self.reads = 0

    def publish_presence(self, server_id, carried, ttl):
        if self.broken:
            return fail(StoreUnavailable("down"))
        self.published += 1
        if carried is None:
            self.reads += 1
        else:
            self.table[server_id] = dict(carried)
        others = {}
        for sid, users in self.table.items():
            if sid != server_id:
                for name, (tunnels, active) in users.items():
                    if tunnels:
                        others.setdefault(name, []).append((sid, tunnels, active))
        return succeed(others)


@pytest.fixture
def cluster():
    """Three servers (ids a, b, c) on one clock and one presence table."""
    clock, table, rows = Clock(), {}, {}
    clock.advance(1_800_000_000)
    servers = []
    for sid in "abc":
        s = UserSessions(PresenceStore(table, rows), FakeAuthenticator(), clock, recheck_interval=5, flush_interval=5,
                         server_id=sid, presence_interval=1)
        s.startService()
        servers.append(s)
    yield servers, rows, clock, table
    for s in servers:
        [loop.stop() for loop in s._loops if loop.running]


def test_max_connections_counts_the_tunnels_on_other_servers(cluster):
    (a, b, c), rows, clock, table = cluster
    rows["ann"] = UserRecord("ann", "", "", max_connections=2)
    assert open_tunnel(a)[1] is None
    clock.advance(1)
    assert open_tunnel(b)[1] is None
    clock.advance(1)
    refusal = open_tunnel(c)[1]
    assert refusal is not None and "max_connections 2" in refusal
    assert table["a"] == {"ann": (1, False)} and table["b"] == {"ann": (1, False)}


def test_tunnels_opened_at_once_on_several_servers_are_cut_back_to_the_limit(cluster):
    (a, b, c), rows, clock, table = cluster
    rows["ann"] = UserRecord("ann", "", "", max_connections=2)
    tunnels = [open_tunnel(s)[0] for s in (a, b, c, c)]  # all before any publication
    assert all(t.revoked is None for t in tunnels)
    clock.advance(1)
    clock.advance(1)  # every server has seen every other's rows
    alive = [t for t in tunnels if t.revoked is None]
    assert len(alive) == 2
    # The excess fell on the highest id, newest first: c's two tunnels.
    assert [t.revoked[0] for t in tunnels[2:]] == ["user-limit", "user-limit"]
    assert "across servers" in tunnels[3].revoked[1]


def test_the_rate_limit_is_shared_among_servers_moving_data(cluster):
    (a, b, c), rows, clock, table = cluster
    rows["ann"] = UserRecord("ann", "", "", rate_limit=90_000)
    ta, tb, tc = (open_tunnel(s)[0] for s in (a, b, c))
    assert a.users["ann"].rate.rate == 90_000  # nobody else moving yet
    for _ in range(3):
        for t in (ta, tb, tc):
            spend(t, 1000)
        clock.advance(1)
    assert [s.users["ann"].rate.rate for s in (a, b, c)] == [30_000] * 3
    # b and c go quiet: a has the whole rate again.
    for _ in range(3):
        spend(ta, 1000)
        clock.advance(1)
    assert a.users["ann"].rate.rate == 90_000


def test_users_without_limits_are_not_published(cluster):
    (a, b, c), rows, clock, table = cluster
    rows["bob"] = UserRecord("bob", "", "")
    tunnel = open_tunnel(a, "bob")[0]
    clock.advance(1)
    assert "a" not in table and a.store.reads == 1  # nothing written, the others read
    rows["bob"] = UserRecord("bob", "", "", max_connections=3)
    clock.advance(5)  # the recheck brings the limit
    clock.advance(1)
    assert table["a"] == {"bob": (1, False)}
    a.release(tunnel, "bob")
    clock.advance(1)
    assert table["a"] == {}  # the rows go once
    reads = a.store.reads
    clock.advance(1)
    assert a.store.reads == reads + 1  # then it only reads again


def test_without_presence_each_server_enforces_alone(cluster):
    (a, b, c), rows, clock, table = cluster
    rows["ann"] = UserRecord("ann", "", "", max_connections=1, rate_limit=90_000)
    for s in (a, b):
        s.store.broken = True
    ta, tb = open_tunnel(a)[0], open_tunnel(b)[0]
    spend(ta, 1000)
    spend(tb, 1000)
    clock.advance(1)
    clock.advance(1)
    assert ta.revoked is None and tb.revoked is None
    assert a.users["ann"].rate.rate == 90_000
    assert a.counters["db.errors"] >= 2


def test_a_stopping_server_clears_its_rows(cluster):
    (a, b, c), rows, clock, table = cluster
    rows["ann"] = UserRecord("ann", "", "", max_connections=1)
    open_tunnel(a)
    clock.advance(1)
    assert table["a"] == {"ann": (1, False)}
    a.stopService()
    assert table["a"] == {}


def test_unflushed_traffic_is_what_a_crash_would_lose(sessions):
    s, store, clock = sessions
    t1, _ = open_tunnel(s)
    t1.relay.bytes_up, t1.relay.bytes_down = 100, 20
    assert s.unflushed_total() == 120
    clock.advance(5)  # flushed
    assert s.unflushed_total() == 0 and store.rows["ann"].bytes_up == 100
    t1.relay.bytes_down += 7
    s.release(t1, "ann")  # counted, not yet written
    assert s.unflushed_total() == 7
