"""Counters of what the server refused and why (and other events worth
counting), kept in memory per process.

Names are dotted, e.g. ``refused.acl``, ``refused.max-per-client``,
``throttle.banned``; `Counters.snapshot` gives them all.  Counting is a
dictionary increment: cheap enough for every refused connection.
"""

from __future__ import annotations

from collections import Counter


class Counters:
    def __init__(self) -> None:
        self._values: Counter[str] = Counter()

    def inc(self, name: str, amount: int = 1) -> None:
        self._values[name] += amount

    def __getitem__(self, name: str) -> int:
        return self._values.get(name, 0)

    def snapshot(self) -> dict[str, int]:
        return dict(self._values)
