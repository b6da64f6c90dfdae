"""`mtop.timers.cancel`: cancel a pending timer, leave the rest alone."""

from twisted.internet.task import Clock

from mtop.timers import cancel


def test_a_pending_call_is_cancelled():
    clock = Clock()
    fired = []
    call = clock.callLater(1, fired.append, True)
    cancel(call)
    assert not call.active()
    clock.advance(2)
    assert fired == []


def test_none_a_call_that_ran_and_a_cancelled_call_are_left_alone():
    clock = Clock()
    ran = clock.callLater(1, lambda: None)
    clock.advance(1)
    cancelled = clock.callLater(1, lambda: None)
    cancelled.cancel()
    for call in (None, ran, cancelled):
        cancel(call)  # IDelayedCall.cancel would raise on the last two
    assert clock.getDelayedCalls() == []
