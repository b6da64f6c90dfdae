"""FairWorkers: password checks shared fairly between client addresses."""

import threading

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, DeferredList

from mtop.fairqueue import FairWorkers


@pytest.fixture
def workers():
    w = FairWorkers(reactor, workers=2, name="test-fair")
    yield w
    w.stop()


@pytest_twisted.ensureDeferred
async def test_keys_are_served_in_turn_whatever_one_queued(workers):
    gate = threading.Event()
    order = []

    def job(name):
        gate.wait(5)
        order.append(name)
        return name

    # The attacker queues 50 jobs before anyone else arrives.
    attack = [workers.run("attacker", job, f"a{i}") for i in range(50)]
    others = [workers.run(f"user{i}", job, f"u{i}") for i in range(3)]
    assert workers.busy == 2 and workers.waiting == 51
    gate.set()
    results = await DeferredList(others + attack, consumeErrors=True)
    assert all(ok for ok, _ in results)
    # Two attacker jobs were already running; then the keys alternate, so
    # every other user's job ran within the next few, not after 48 more.
    assert {order.index(f"u{i}") for i in range(3)} <= set(range(8)), order
    assert workers.busy == 0 and workers.waiting == 0


@pytest_twisted.ensureDeferred
async def test_errors_reach_the_caller_and_a_queued_job_can_be_cancelled(workers):
    gate = threading.Event()

    def blocked():
        gate.wait(5)
        return 1

    def broken():
        raise ValueError("no")

    running = [workers.run("a", blocked), workers.run("b", blocked)]
    queued = workers.run("c", blocked)
    failing = workers.run("d", broken)
    queued.cancel()
    with pytest.raises(CancelledError):
        await queued
    assert workers.waiting == 1
    gate.set()
    assert [await d for d in running] == [1, 1]
    with pytest.raises(ValueError):
        await failing
