"""Logging for MTop's own events: `twisted.logger` with a level filter.

Our loggers publish through `observer`, which drops events below the level
set from ``log.level`` and passes the rest to the global publisher (where
twistd's own log file observer is).  Twisted's own events are not filtered.
"""

from __future__ import annotations

from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogPublisher,
)

LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}

_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
observer = FilteringLogObserver(lambda event: globalLogPublisher(event), [_predicate])


def logger(namespace: str | None = None) -> Logger:
    """A `Logger` publishing through the level filter."""
    return Logger(namespace=namespace, observer=observer)


def set_level(name: str) -> None:
    """Set the lowest level that reaches the log (``debug``, ``info``, ...)."""
    _predicate.setLogLevelForNamespace(None, LEVELS[name])
