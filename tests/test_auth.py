import sqlite3

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.task import Clock
from zope.interface import implementer
from zope.interface.verify import verifyObject

from mtop import passwords
from mtop.auth import Authenticator
from mtop.database import BASE_TABLE as SQLITE_SCHEMA
from mtop.userstore import IUserStore, StoreUnavailable, UserRecord
from mtop.userstore.sqlite import SQLiteUserStore


@implementer(IUserStore)
class DictStore:
    """Rows in memory, counting lookups; ``pending`` (a Deferred, or
    ``"hang"``) stands in for a slow or silent database."""

    def __init__(self):
        self.rows = {}
        self.lookups = 0
        self.pending = None

    def lookup(self, username):
        self.lookups += 1
        if self.pending == "hang":
            return Deferred()
        if self.pending is not None:
            return self.pending
        return succeed(self.rows.get(username))

    def lookup_many(self, usernames):
        return succeed({name: self.rows[name] for name in usernames if name in self.rows})


def test_the_fake_store_provides_what_it_declares():
    verifyObject(IUserStore, DictStore())


def run_now(f, *args):
    return maybeDeferred(f, *args)


def results(d):
    out = []
    d.addBoth(out.append)
    return out


@pytest.fixture
def setup():
    store, clock = DictStore(), Clock()
    store.rows["alice"] = UserRecord("alice", "salt", passwords.legacy_hash("salt", "pw"))
    store.rows["bob"] = UserRecord("bob", "s", passwords.scrypt_hash("bobpw", log2_n=4))
    return store, clock, Authenticator(store, clock, run_now, cache_ttl=5, query_timeout=2)


def test_right_and_wrong_passwords(setup):
    store, clock, auth = setup
    assert results(auth.authenticate("alice", "pw")) == [True]
    assert results(auth.authenticate("alice", "nope")) == [False]
    assert results(auth.authenticate("bob", "bobpw")) == [True]
    assert results(auth.authenticate("nobody", "pw")) == [False]


def test_success_is_cached_until_ttl(setup):
    store, clock, auth = setup
    auth.authenticate("alice", "pw")
    assert store.lookups == 1
    auth.authenticate("alice", "pw")
    assert store.lookups == 1
    # a different password is not served from the cache
    assert results(auth.authenticate("alice", "other")) == [False]
    assert store.lookups == 2
    clock.advance(5.1)
    del store.rows["alice"]
    assert results(auth.authenticate("alice", "pw")) == [False]
    assert store.lookups == 3


def test_password_change_takes_effect_after_ttl(setup):
    store, clock, auth = setup
    auth.authenticate("alice", "pw")
    store.rows["alice"] = UserRecord("alice", "salt", passwords.legacy_hash("salt", "new"))
    clock.advance(5.1)
    assert results(auth.authenticate("alice", "pw")) == [False]
    assert results(auth.authenticate("alice", "new")) == [True]


def test_concurrent_attempts_share_one_lookup(setup):
    store, clock, auth = setup
    store.pending = Deferred()
    a, b = results(auth.authenticate("alice", "pw")), results(auth.authenticate("alice", "pw"))
    assert store.lookups == 1 and a == [] and b == []
    store.pending.callback(store.rows["alice"])
    assert a == [True] and b == [True]


def test_slow_store_times_out_as_unavailable(setup):
    store, clock, auth = setup
    store.pending = Deferred()
    out = results(auth.authenticate("alice", "pw"))
    clock.advance(2.1)
    assert len(out) == 1 and out[0].check(StoreUnavailable)


@pytest.fixture
def sqlite_path(tmp_path):
    path = tmp_path / "users.db"
    db = sqlite3.connect(path)
    db.execute(SQLITE_SCHEMA)
    db.execute(
        "INSERT INTO mtop_user (username, salt, password) VALUES (?, ?, ?)",
        ("test111", "abcdefghijkl", "6baff1c350ee6a3bd3209c64779510f8d8b55a8c7ac55fcd4d0247ebb2e7d2bc"),
    )
    db.commit()
    db.close()
    return str(path)


@pytest_twisted.ensureDeferred
async def test_sqlite_store_reads_original_rows_and_sees_changes(sqlite_path):
    store = SQLiteUserStore(sqlite_path)
    store.startService()
    try:
        record = await store.lookup("test111")
        assert record == UserRecord("test111", "abcdefghijkl", passwords.legacy_hash("abcdefghijkl", "123456"))
        assert await store.lookup("nobody") is None
        db = sqlite3.connect(sqlite_path)
        db.execute("INSERT INTO mtop_user (username, salt, password) VALUES ('new', 's', 'x')")
        db.commit()
        db.close()
        assert (await store.lookup("new")).password == "x"
    finally:
        store.stopService()


@pytest_twisted.ensureDeferred
async def test_sqlite_store_never_creates_a_missing_database(tmp_path):
    path = tmp_path / "missing.db"
    store = SQLiteUserStore(str(path))
    store.startService()
    try:
        with pytest.raises(StoreUnavailable):
            await store.lookup("x")
        assert not path.exists()
    finally:
        store.stopService()


def test_outage_grace_serves_recent_logins_only():
    store, clock = DictStore(), Clock()
    store.rows["alice"] = UserRecord("alice", "salt", passwords.legacy_hash("salt", "pw"))
    store.rows["carl"] = UserRecord("carl", "salt", passwords.legacy_hash("salt", "pw3"))
    auth = Authenticator(store, clock, run_now, cache_ttl=5, query_timeout=2, outage_grace=60)
    assert results(auth.authenticate("alice", "pw")) == [True]
    store.pending = "hang"  # the database stops answering
    clock.advance(30)
    out = results(auth.login("alice", "pw"))
    clock.advance(2.1)
    assert len(out) == 1 and out[0].username == "alice" and out[0].password == ""
    # Not the wrong password, not a user never verified.
    out = results(auth.authenticate("alice", "nope"))
    clock.advance(2.1)
    assert out[0].check(StoreUnavailable)
    out = results(auth.authenticate("carl", "pw3"))
    clock.advance(2.1)
    assert out[0].check(StoreUnavailable)
    # The grace counts from the last real verification, not from its uses.
    clock.advance(30)
    out = results(auth.authenticate("alice", "pw"))
    clock.advance(2.1)
    assert out[0].check(StoreUnavailable)


def test_cached_login_still_honours_expiry():
    from datetime import datetime

    store, clock = DictStore(), Clock()
    clock.advance(1_800_000_000)
    store.rows["alice"] = UserRecord(
        "alice", "salt", passwords.legacy_hash("salt", "pw"), expires_at=datetime.utcfromtimestamp(1_800_000_003)
    )
    auth = Authenticator(store, clock, run_now, cache_ttl=5)
    assert results(auth.authenticate("alice", "pw")) == [True]
    clock.advance(4)
    assert store.lookups == 1
    assert results(auth.authenticate("alice", "pw")) == [False]
    assert store.lookups == 1  # refused from the cache, at once


def test_refresh_of_unchanged_row_skips_the_expensive_check():
    store, clock = DictStore(), Clock()
    store.rows["bob"] = UserRecord("bob", "s", passwords.scrypt_hash("bobpw", log2_n=4))
    checks = []

    def counting(f, *args):
        checks.append(f)
        return maybeDeferred(f, *args)

    auth = Authenticator(store, clock, counting, cache_ttl=5, query_timeout=2, outage_grace=600)
    assert results(auth.authenticate("bob", "bobpw")) == [True]
    assert len(checks) == 1
    clock.advance(5.1)
    # The row is read again (changes must show within the TTL), but the
    # password was verified against this very hash: no second scrypt.
    assert results(auth.authenticate("bob", "bobpw")) == [True]
    assert store.lookups == 2 and len(checks) == 1
    # A wrong password is still checked, and refused.
    clock.advance(5.1)
    assert results(auth.authenticate("bob", "nope")) == [False]
    assert len(checks) == 2
    # A new hash (password changed) is verified again.
    store.rows["bob"] = UserRecord("bob", "s2", passwords.scrypt_hash("bobpw", log2_n=4))
    clock.advance(5.1)
    assert results(auth.authenticate("bob", "bobpw")) == [True]
    assert len(checks) == 3
    # Disabled in the row: refused at once, without a check.
    import dataclasses

    store.rows["bob"] = dataclasses.replace(store.rows["bob"], enabled=False)
    clock.advance(5.1)
    assert results(auth.authenticate("bob", "bobpw")) == [False]


def test_a_reload_keeps_verified_logins_but_reads_their_rows_again():
    """Settings applied again (a reload): no password is checked again
    whose row still holds the hash it was verified against, and every
    user's row is read again first."""
    from types import SimpleNamespace

    store, clock = DictStore(), Clock()
    store.rows["bob"] = UserRecord("bob", "s", passwords.scrypt_hash("bobpw", log2_n=4))
    checks = []

    def counting(f, *args):
        checks.append(f)
        return maybeDeferred(f, *args)

    auth = Authenticator(store, clock, counting, cache_ttl=5, query_timeout=2, outage_grace=600)
    assert results(auth.authenticate("bob", "bobpw")) == [True]
    assert (store.lookups, len(checks)) == (1, 1)
    auth.apply_settings(SimpleNamespace(auth=SimpleNamespace(cache_ttl=5, query_timeout=2, outage_grace=600)))
    assert results(auth.authenticate("bob", "bobpw")) == [True]
    assert (store.lookups, len(checks)) == (2, 1)
    # A grace shortened below the entry's age drops it.
    clock.advance(60)
    auth.apply_settings(SimpleNamespace(auth=SimpleNamespace(cache_ttl=5, query_timeout=2, outage_grace=30)))
    assert auth._cache == {}
