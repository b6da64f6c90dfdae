"""Logging for MTop and climber: `twisted.logger` with a level filter, as
text (twistd's own format) or as JSON lines.

Our loggers publish through `observer`, which drops events below the level
set from ``log.level`` and passes the rest to the global publisher (where
twistd's log observer is).  Twisted's own events are not filtered.

``log.format: json`` replaces twistd's log observer (see
`use_log_format`) by `json_lines_observer`: one JSON object per line, with
``time``, ``level``, ``namespace``, ``message`` (the text the text format
shows), ``traceback`` for failures, and the event's own fields (a tunnel's
``outcome``, ``client``, ``user``, ``target``, ``bytes_up``,
``bytes_down``, ``duration``, ...).
"""

from __future__ import annotations

import datetime
import json
import sys
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
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


# JSON lines

#: Keys of the JSON object that are not event fields.
_RESERVED = ("time", "level", "namespace", "system", "message", "traceback")
#: Event keys that are not fields: the legacy `twisted.python.log` ones, and
#: ``detail_text``, the tunnel events' text-only rendering of ``detail``.
_NOT_FIELDS = frozenset(
    {"format", "message", "isError", "why", "failure", "time", "system", "printed", "detail_text"}
)


def _json_value(value: Any) -> Any:
    """Event values JSON has no type for (addresses, objects) as text."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def event_as_json(event: dict) -> str:
    """One log event as a JSON object on one line (no newline)."""
    record: dict[str, Any] = {}
    log_time = event.get("log_time")
    if log_time is not None:
        record["time"] = datetime.datetime.fromtimestamp(log_time, datetime.timezone.utc).isoformat(
            timespec="microseconds"
        )
    level = event.get("log_level")
    # LogLevel's constants are NamedConstants (not LogLevel instances).
    record["level"] = getattr(level, "name", "info")
    record["namespace"] = event.get("log_namespace")
    system = event.get("log_system")
    if system not in (None, "-"):
        record["system"] = system
    record["message"] = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        try:
            record["traceback"] = failure.getTraceback()
        except Exception:
            record["traceback"] = repr(failure)
    for key, value in event.items():
        if key.startswith("log_") or key in _NOT_FIELDS:
            continue
        record[f"field_{key}" if key in _RESERVED else key] = value
    return json.dumps(record, default=_json_value, ensure_ascii=False, separators=(",", ":"))


def json_lines_observer(out: IO[str]) -> FileLogObserver:
    """An observer writing each event to ``out`` as a JSON line."""
    return FileLogObserver(out, lambda event: event_as_json(event) + "\n")


# twistd

#: Where twistd was told to log (``--logfile``, ``--nodaemon``), for
#: `twistd_json_observer`.
_twistd_destination: tuple[str | None, bool] = (None, True)


def use_log_format(log_format: str, twistd_options: Any) -> None:
    """Make twistd log in ``log.format``; called from the plugins' options.

    ``text`` is twistd's own format.  For ``json`` this sets twistd's
    ``--logger`` option (``twistd_options``: the plugin options' parent) to
    `twistd_json_observer`, which writes where ``--logfile`` says (``-`` or,
    with ``--nodaemon``, nothing: stdout).  An explicit ``--logger`` or
    ``--syslog`` is left as it is, as is a daemon told to log to stdout
    (twistd refuses that itself)."""
    global _twistd_destination
    if log_format != "json" or twistd_options is None:
        return
    try:
        explicit = twistd_options["logger"] or twistd_options.get("syslog")
        logfile, nodaemon = twistd_options["logfile"], bool(twistd_options.get("nodaemon"))
    except KeyError:  # not twistd's ServerOptions
        return
    if explicit or (logfile == "-" and not nodaemon):
        return
    _twistd_destination = (logfile, nodaemon)
    twistd_options["logger"] = f"{__name__}.twistd_json_observer"


def twistd_json_observer() -> FileLogObserver:
    """twistd ``--logger`` factory: JSON lines where ``--logfile`` says."""
    logfile, nodaemon = _twistd_destination
    if logfile == "-" or (nodaemon and not logfile):
        return json_lines_observer(sys.stdout)
    from twisted.python.logfile import LogFile

    return json_lines_observer(LogFile.fromFullPath(logfile or "twistd.log"))
