"""Authentication: one interface over pluggable user stores.

`Authenticator.login(username, password)` reads the user's row through the
store's `mtop.userstore.IUserStore` (``lookup``) and fires with the user's
`UserRecord` (its policy: limits, quota, counters; the password hash
blanked) or ``None``; `Authenticator.authenticate` fires ``True`` or
``False``.  It

* caches successful verifications for ``cache_ttl`` seconds, keyed by an HMAC
  of the password under a per-process key (the password itself is never
  kept), so a busy server neither queries the database nor runs scrypt per
  tunnel, and row changes still take effect within that bound;
* coalesces concurrent identical attempts into one lookup and one check;
* runs expensive (scrypt) checks in the reactor's thread pool, and not
  again when the cache is refreshed: a cached login whose row still holds
  the very hash the same password was verified against is confirmed by the
  lookup alone (so a busy user costs one query per ``cache_ttl``, not one
  scrypt, and its tunnels do not all wait for one);
* with workers, takes another worker's verification of the same password
  against the same hash (`mtop.loginshare.LoginShare`), so each user costs
  one scrypt per machine, not one per worker, and a restarted worker is
  not cold;
* checks unknown users against a dummy scrypt hash, so they cost what a
  wrong password costs;
* refuses users the row's policy refuses (``enabled`` false, past
  ``expires_at``, traffic over ``quota_bytes``), also on a cache hit;
* while the store is unavailable, keeps accepting a user whose same
  password it verified within ``outage_grace`` seconds (others are
  refused).

Store failures (database down, timeout) outside that grace fail the
Deferred with `StoreUnavailable`, so callers can tell them apart from a
wrong password.
"""

from __future__ import annotations

import dataclasses
import hmac
import os
from datetime import datetime, timezone
from typing import Any, Callable

from twisted.internet.defer import Deferred, TimeoutError, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from mtop import passwords
from mtop.interfaces import ISettingsConsumer
from mtop.logs import logger
from mtop.userstore import IUserStore, StoreUnavailable, UserRecord

MAX_CACHE_ENTRIES = 100_000


def _check(record: UserRecord | None, password: str, now: datetime) -> bool:
    if record is None:
        passwords.verify(passwords.dummy_hash(), "", password)
        return False
    # The password is checked even for a refused user: the answer takes the
    # same time whatever the reason.
    return passwords.verify(record.password, record.salt, password) and record.refusal(now) is None


def utc_now(clock: IReactorTime) -> datetime:
    """``clock``'s time as a naive UTC datetime (how the tables keep time)."""
    return datetime.fromtimestamp(clock.seconds(), timezone.utc).replace(tzinfo=None)


@dataclasses.dataclass
class _Verified:
    """A cached verification: which password (HMAC), when, until when it
    is used without asking the store, until when it stands in for an
    unavailable store, and the row's policy."""

    token: bytes
    verified: float
    fresh_until: float
    stale_until: float
    record: UserRecord
    #: HMAC of the row's salt and hash the password was verified against.
    stored: bytes = b""


@implementer(ISettingsConsumer)
class Authenticator:
    _log = logger()

    def __init__(
        self,
        store: IUserStore,
        clock: IReactorTime,
        run_in_thread: Callable[..., Deferred],
        cache_ttl: float = 5.0,
        query_timeout: float = 5.0,
        outage_grace: float = 0.0,
        workers: Any = None,
        share: Any = None,
    ):
        """``run_in_thread(f, *args)`` runs an expensive check off the
        reactor thread; ``workers`` (a `mtop.fairqueue.FairWorkers`), when
        given, runs them instead, shared fairly between client addresses;
        ``share`` (a `mtop.loginshare.LoginShare`) is where the workers of
        one server share their verifications."""
        self.store = store
        self.clock = clock
        self.run_in_thread = run_in_thread
        self.workers = workers
        self.cache_ttl = cache_ttl
        self.query_timeout = query_timeout
        self.outage_grace = outage_grace
        self.share = share
        # With a share, the tokens are the ones the other workers compute.
        self._key = share.key if share is not None else os.urandom(32)
        #: Password checks by kind: ``hashed`` (scrypt ran), ``reused`` (this
        #: password was verified against this hash here before), ``shared``
        #: (by another worker), ``fast`` (a legacy hash).
        self.checks = dict.fromkeys(("hashed", "reused", "shared", "fast"), 0)
        self._cache: dict[str, _Verified] = {}
        self._inflight: dict[tuple[str, bytes], list[Deferred]] = {}
        self._stored: dict[tuple[str, bytes], bytes] = {}

    def _token(self, username: str, password: str) -> bytes:
        message = username.encode("utf-8") + b"\0" + password.encode("utf-8")
        return hmac.digest(self._key, message, "sha256")

    def _stored_token(self, record: UserRecord) -> bytes:
        message = record.salt.encode("utf-8") + b"\0" + record.password.encode("utf-8")
        return hmac.digest(self._key, message, "sha256")

    def apply_settings(self, settings: Any) -> None:
        """`ISettingsConsumer`: the cache, timeout and outage grace of
        ``settings.auth`` from now on.  What was verified before is kept
        within the new bounds, so a reload costs no password checks: the
        next login of each user reads its row again (nothing is taken on
        trust from before the reload), and skips scrypt if the row holds
        the very hash its password was verified against."""
        self.cache_ttl = settings.auth.cache_ttl
        self.query_timeout = settings.auth.query_timeout
        self.outage_grace = settings.auth.outage_grace
        now = self.clock.seconds()
        keep = max(self.cache_ttl, self.outage_grace)
        for name, entry in list(self._cache.items()):
            entry.fresh_until = min(entry.fresh_until, now)
            entry.stale_until = min(entry.stale_until, entry.verified + keep)
            if entry.stale_until <= now:
                del self._cache[name]

    def forget(self, username: str | None = None) -> None:
        """Drop cached verifications (of one user, or all)."""
        if username is None:
            self._cache.clear()
        else:
            self._cache.pop(username, None)

    def authenticate(self, username: str, password: str) -> Deferred[bool]:
        return self.login(username, password).addCallback(lambda record: record is not None)

    def login(self, username: str, password: str, client: str = "") -> Deferred[UserRecord | None]:
        """The user's policy if ``password`` is right and the row admits
        them, else ``None``; ``client`` (the address key) is whose share of
        the password-checking workers an expensive check uses."""
        token = self._token(username, password)
        now = self.clock.seconds()
        cached = self._cache.get(username)
        if cached is not None:
            if cached.fresh_until > now and hmac.compare_digest(cached.token, token):
                return succeed(self._admissible(cached.record))
            if cached.stale_until <= now:
                del self._cache[username]
        key = (username, token)
        waiters = self._inflight.get(key)
        result: Deferred[UserRecord | None] = Deferred()
        if waiters is not None:
            waiters.append(result)
            return result
        self._inflight[key] = [result]
        lookup = maybeDeferred(self.store.lookup, username)
        lookup.addTimeout(self.query_timeout, self.clock)
        lookup.addErrback(self._store_failed, username)
        lookup.addCallback(self._verify, password, key, client)
        lookup.addErrback(self._from_cache, username, token)
        lookup.addBoth(self._done, key, username, token)
        return result

    def _admissible(self, record: UserRecord) -> UserRecord | None:
        refusal = record.refusal(utc_now(self.clock))
        if refusal is not None:
            self._log.info("user {user} refused: {why}", user=record.username, why=refusal)
            return None
        return record

    def _store_failed(self, failure: Failure, username: str) -> Failure:
        if failure.check(TimeoutError):
            return Failure(StoreUnavailable(f"user lookup took longer than {self.query_timeout:g}s"))
        if not failure.check(StoreUnavailable):
            return Failure(StoreUnavailable(failure.getErrorMessage()))
        return failure

    def _verify(
        self, record: UserRecord | None, password: str, key: tuple[str, bytes] | None = None, client: str = ""
    ) -> Deferred[UserRecord | None] | UserRecord | None:
        now = utc_now(self.clock)
        if record is not None and record.refusal(now) is not None:
            self._log.info("user {user} refused: {why}", user=record.username, why=record.refusal(now))
        policy = None if record is None else dataclasses.replace(record, salt="", password="")
        stored = b"" if record is None else self._stored_token(record)

        def checked(ok: bool, hashed: bool = False) -> UserRecord | None:
            if ok and key is not None:
                self._stored[key] = stored
                if hashed and self.share is not None:
                    self.share.put(key[0], key[1], stored)
            return policy if ok else None

        if record is not None and key is not None:
            cached = self._cache.get(key[0])
            if (
                cached is not None
                and cached.stored
                and hmac.compare_digest(cached.token, key[1])
                and hmac.compare_digest(cached.stored, stored)
            ):
                # This password was verified against this very hash: the
                # answer would be the same.
                self.checks["reused"] += 1
                return checked(record.password != "" and record.refusal(now) is None)
            if (
                self.share is not None
                and record.password
                and self.share.confirms(key[0], key[1], stored, max(self.cache_ttl, self.outage_grace))
            ):
                self.checks["shared"] += 1  # another worker verified it
                return checked(record.refusal(now) is None)
        if record is None or passwords.is_expensive(record.password):
            self.checks["hashed"] += 1
            if self.workers is not None:
                d = self.workers.run(client, _check, record, password, now)
            else:
                d = self.run_in_thread(_check, record, password, now)
            return d.addCallback(checked, True)
        self.checks["fast"] += 1
        return checked(_check(record, password, now))

    def _from_cache(self, failure: Failure, username: str, token: bytes) -> UserRecord | None | Failure:
        """The store is unavailable: a recent verification of the same
        password stands in for it during the grace period."""
        cached = self._cache.get(username)
        if (
            not failure.check(StoreUnavailable)
            or cached is None
            or cached.stale_until <= self.clock.seconds()
            or not hmac.compare_digest(cached.token, token)
        ):
            return failure
        self._log.warn(
            "user store unavailable ({error}); {user} accepted from a login verified {age:.0f}s ago",
            error=failure.getErrorMessage(),
            user=username,
            age=self.clock.seconds() - cached.verified,
        )
        return self._admissible(cached.record)

    def _done(
        self, outcome: UserRecord | None | Failure, key: tuple[str, bytes], username: str, token: bytes
    ) -> None:
        waiters = self._inflight.pop(key, [])
        stored = self._stored.pop(key, b"")
        cached = self._cache.get(username)
        from_store = not (cached is not None and outcome is cached.record)
        if isinstance(outcome, UserRecord) and from_store and (self.cache_ttl > 0 or self.outage_grace > 0):
            if len(self._cache) >= MAX_CACHE_ENTRIES:
                self._expire()
            now = self.clock.seconds()
            self._cache[username] = _Verified(
                token, now, now + self.cache_ttl, now + max(self.cache_ttl, self.outage_grace), outcome, stored
            )
        for waiter in waiters:
            if isinstance(outcome, Failure):
                waiter.errback(outcome)
            else:
                waiter.callback(outcome)

    def _expire(self) -> None:
        now = self.clock.seconds()
        for name in [name for name, entry in self._cache.items() if entry.stale_until <= now]:
            del self._cache[name]
        if len(self._cache) >= MAX_CACHE_ENTRIES:
            self._cache.clear()
