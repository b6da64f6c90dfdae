"""Giving freed memory back to the system (`mtop.memory`)."""

from twisted.internet.task import Clock

from mtop.memory import TRIM_INTERVAL, MemoryTrimmer, malloc_trim


def test_malloc_trim_is_found_on_glibc():
    trim = malloc_trim()
    assert trim is not None  # Debian's glibc has it
    assert trim() in (0, 1)


def test_trimmer_trims_every_interval_while_running():
    clock = Clock()
    calls = []
    service = MemoryTrimmer(clock, trim=lambda: calls.append(clock.seconds()))
    service.startService()
    clock.advance(TRIM_INTERVAL)
    clock.advance(TRIM_INTERVAL)
    assert calls == [0, TRIM_INTERVAL, 2 * TRIM_INTERVAL]
    service.stopService()
    clock.advance(TRIM_INTERVAL)
    assert len(calls) == 3 and not clock.getDelayedCalls()
