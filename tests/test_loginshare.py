"""The workers' shared verified logins (mtop.loginshare) and how the
authenticator uses them."""

from __future__ import annotations

import os

import pytest
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock

from mtop import passwords
from mtop.auth import Authenticator
from mtop.loginshare import HEADER_SIZE, SLOT_SIZE, SLOTS, LoginShare
from mtop.userstore import UserRecord
from test_auth import DictStore, results


def test_a_verification_is_seen_through_another_mapping_of_the_same_memory():
    share = LoginShare.create()
    other = LoginShare(os.dup(share.fd))  # what a worker maps
    assert other.key == share.key
    share.put("ann", b"t" * 32, b"s" * 32)
    assert other.confirms("ann", b"t" * 32, b"s" * 32, 60)
    assert not other.confirms("ann", b"x" * 32, b"s" * 32, 60)  # another password
    assert not other.confirms("ann", b"t" * 32, b"x" * 32, 60)  # another hash
    assert not other.confirms("bob", b"t" * 32, b"s" * 32, 60)
    share.put("carl", b"t" * 32, b"s" * 32, verified=1000.0)
    assert not other.confirms("carl", b"t" * 32, b"s" * 32, 60)  # too old


def test_a_torn_or_foreign_record_reads_as_absent():
    share = LoginShare.create()
    share.put("ann", b"t" * 32, b"s" * 32)
    name = share._name("ann")
    offset = share._offset(name)
    share._map[offset + 20] ^= 0xFF  # half of another worker's write
    assert not share.confirms("ann", b"t" * 32, b"s" * 32, 60)
    with pytest.raises(ValueError):
        fd = os.memfd_create("not-a-share")
        os.ftruncate(fd, HEADER_SIZE + SLOTS * SLOT_SIZE)
        LoginShare(fd)


def _worker(store, share):
    checks = []

    def counting(f, *args):
        checks.append(f)
        return maybeDeferred(f, *args)

    return Authenticator(store, Clock(), counting, cache_ttl=5, outage_grace=600, share=share), checks


def test_one_scrypt_per_machine_not_per_worker():
    store = DictStore()
    store.rows["bob"] = UserRecord("bob", "s", passwords.scrypt_hash("bobpw", log2_n=4))
    share = LoginShare.create()
    first, first_checks = _worker(store, share)
    second, second_checks = _worker(store, LoginShare(os.dup(share.fd)))
    assert results(first.authenticate("bob", "bobpw")) == [True]
    assert results(second.authenticate("bob", "bobpw")) == [True]
    assert (len(first_checks), len(second_checks)) == (1, 0)
    assert first.checks["hashed"] == 1 and second.checks["shared"] == 1
    # A wrong password is checked (and refused) wherever it lands.
    assert results(second.authenticate("bob", "nope")) == [False]
    assert len(second_checks) == 1
    # A changed password (a new hash) is verified again.
    store.rows["bob"] = UserRecord("bob", "s2", passwords.scrypt_hash("bobpw2", log2_n=4))
    second.clock.advance(5.1)  # past the login cache
    assert results(second.authenticate("bob", "bobpw")) == [False]
    assert len(second_checks) == 2
    # A user the row refuses is refused, shared verification or not.
    import dataclasses

    store.rows["bob"] = UserRecord("bob", "s", passwords.scrypt_hash("bobpw", log2_n=4))
    assert results(first.authenticate("bob", "bobpw")) == [True]
    store.rows["bob"] = dataclasses.replace(store.rows["bob"], enabled=False)
    third, third_checks = _worker(store, LoginShare(os.dup(share.fd)))
    assert results(third.authenticate("bob", "bobpw")) == [False]
