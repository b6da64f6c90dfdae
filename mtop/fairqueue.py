"""Password checks in worker threads, shared fairly between client addresses.

A scrypt check costs tens of milliseconds of CPU, so the threads that run
them are a resource an attacker can try to fill: hundreds of wrong
passwords sent at once from one address would queue ahead of everyone
else's logins.  `FairWorkers` keeps one queue per key (the client address)
and takes jobs from the keys in turn, so an address with a thousand jobs
waiting holds at most one worker more than an address with one, and a
newcomer's job starts as soon as any worker is free.

The threads are a pool of their own (not the reactor's, which also
resolves names for the dialer), sized to the CPUs: more threads than cores
would only make every check slower.
"""

from __future__ import annotations

import os
from collections import OrderedDict, deque
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool


def default_workers() -> int:
    """One worker per CPU, at least two."""
    return max(2, os.cpu_count() or 1)


class FairWorkers:
    """Runs ``f(*args)`` in ``workers`` threads, round robin by key.

    ``run(key, f, *args)`` returns a Deferred with the result; cancelling it
    before its job started drops the job.  ``start``/``stop`` own the
    thread pool (a reactor shutdown trigger calls ``stop``)."""

    def __init__(self, reactor: Any, workers: int | None = None, name: str = "mtop-auth"):
        self.reactor = reactor
        self.workers = workers or default_workers()
        self.name = name
        self.busy = 0
        #: Waiting jobs per key; the key served next is first.
        self._queues: OrderedDict[Any, deque] = OrderedDict()
        self._pool: ThreadPool | None = None

    def _ensure_pool(self) -> ThreadPool:
        if self._pool is None:
            self._pool = ThreadPool(minthreads=0, maxthreads=self.workers, name=self.name)
            self._pool.start()
            self.reactor.addSystemEventTrigger("during", "shutdown", self.stop)
        return self._pool

    def stop(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.stop()

    @property
    def waiting(self) -> int:
        return sum(len(queue) for queue in self._queues.values())

    def run(self, key: Any, f: Callable[..., Any], *args: Any) -> Deferred:
        job: list[Any] = [f, args, None]
        result: Deferred = Deferred(lambda d: self._cancel(key, job))
        job[2] = result
        self._queues.setdefault(key, deque()).append(job)
        self._next()
        return result

    def _cancel(self, key: Any, job: list) -> None:
        queue = self._queues.get(key)
        if queue is not None and job in queue:
            queue.remove(job)
            if not queue:
                del self._queues[key]

    def _next(self) -> None:
        while self.busy < self.workers and self._queues:
            key, queue = next(iter(self._queues.items()))
            f, args, result = queue.popleft()
            del self._queues[key]
            if queue:
                self._queues[key] = queue  # to the back of the line
            self.busy += 1

            def in_thread(ok: bool, value: Any, result: Deferred = result) -> None:
                self.reactor.callFromThread(self._finished, result, ok, value)

            self._ensure_pool().callInThreadWithCallback(in_thread, f, *args)

    def _finished(self, result: Deferred, ok: bool, value: Any) -> None:
        self.busy -= 1
        self._next()
        if ok:
            result.callback(value)
        else:
            result.errback(value if isinstance(value, Failure) else Failure(value))
