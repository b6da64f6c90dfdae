"""Authentication: one interface over pluggable user stores.

`Authenticator.authenticate(username, password)` fires ``True`` or
``False``.  It

* caches successful verifications for ``cache_ttl`` seconds, keyed by an HMAC
  of the password under a per-process key (the password itself is never
  kept), so a busy server neither queries the database nor runs scrypt per
  tunnel, and row changes still take effect within that bound;
* coalesces concurrent identical attempts into one lookup and one check;
* runs expensive (scrypt) checks in the reactor's thread pool;
* checks unknown users against a dummy scrypt hash, so they cost what a
  wrong password costs;
* refuses users the row's policy refuses (``enabled`` false, past
  ``expires_at``, traffic over ``quota_bytes``).

Store failures (database down, timeout) fail the Deferred with
`StoreUnavailable`, so callers can tell them apart from a wrong password.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from datetime import datetime, timezone
from typing import Callable

from twisted.internet.defer import Deferred, TimeoutError, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from mtop import passwords
from mtop.logs import logger
from mtop.userstore import StoreUnavailable, UserRecord, UserStore

MAX_CACHE_ENTRIES = 100_000


def _check(record: UserRecord | None, password: str, now: datetime) -> bool:
    if record is None:
        passwords.verify(passwords.dummy_hash(), "", password)
        return False
    # The password is checked even for a refused user: the answer takes the
    # same time whatever the reason.
    return passwords.verify(record.password, record.salt, password) and record.refusal(now) is None


class Authenticator:
    _log = logger()

    def __init__(
        self,
        store: UserStore,
        clock: IReactorTime,
        run_in_thread: Callable[..., Deferred],
        cache_ttl: float = 5.0,
        query_timeout: float = 5.0,
    ):
        self.store = store
        self.clock = clock
        self.run_in_thread = run_in_thread
        self.cache_ttl = cache_ttl
        self.query_timeout = query_timeout
        self._key = os.urandom(32)
        self._cache: dict[str, tuple[bytes, float]] = {}
        self._inflight: dict[tuple[str, bytes], list[Deferred]] = {}

    def _token(self, username: str, password: str) -> bytes:
        message = username.encode("utf-8") + b"\0" + password.encode("utf-8")
        return hmac.new(self._key, message, hashlib.sha256).digest()

    def forget(self, username: str | None = None) -> None:
        """Drop cached verifications (of one user, or all)."""
        if username is None:
            self._cache.clear()
        else:
            self._cache.pop(username, None)

    def authenticate(self, username: str, password: str) -> Deferred[bool]:
        token = self._token(username, password)
        now = self.clock.seconds()
        cached = self._cache.get(username)
        if cached is not None:
            if cached[1] > now and hmac.compare_digest(cached[0], token):
                return succeed(True)
            if cached[1] <= now:
                del self._cache[username]
        key = (username, token)
        waiters = self._inflight.get(key)
        result: Deferred[bool] = Deferred()
        if waiters is not None:
            waiters.append(result)
            return result
        self._inflight[key] = [result]
        lookup = self.store.lookup(username)
        lookup.addTimeout(self.query_timeout, self.clock)
        lookup.addErrback(self._store_failed, username)
        lookup.addCallback(self._verify, password)
        lookup.addBoth(self._done, key, username, token)
        return result

    def _store_failed(self, failure: Failure, username: str) -> Failure:
        if failure.check(TimeoutError):
            return Failure(StoreUnavailable(f"user lookup took longer than {self.query_timeout:g}s"))
        if not failure.check(StoreUnavailable):
            return Failure(StoreUnavailable(failure.getErrorMessage()))
        return failure

    def _verify(self, record: UserRecord | None, password: str) -> Deferred[bool] | bool:
        now = datetime.fromtimestamp(self.clock.seconds(), timezone.utc).replace(tzinfo=None)
        if record is not None and record.refusal(now) is not None:
            self._log.info("user {user} refused: {why}", user=record.username, why=record.refusal(now))
        if record is None or passwords.is_expensive(record.password):
            return self.run_in_thread(_check, record, password, now)
        return _check(record, password, now)

    def _done(self, outcome: bool | Failure, key: tuple[str, bytes], username: str, token: bytes) -> None:
        waiters = self._inflight.pop(key, [])
        if outcome is True and self.cache_ttl > 0:
            if len(self._cache) >= MAX_CACHE_ENTRIES:
                self._expire()
            self._cache[username] = (token, self.clock.seconds() + self.cache_ttl)
        for waiter in waiters:
            if isinstance(outcome, Failure):
                waiter.errback(outcome)
            else:
                waiter.callback(bool(outcome))

    def _expire(self) -> None:
        now = self.clock.seconds()
        for name in [name for name, (_, until) in self._cache.items() if until <= now]:
            del self._cache[name]
        if len(self._cache) >= MAX_CACHE_ENTRIES:
            self._cache.clear()
