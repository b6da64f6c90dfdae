"""Logging for MTop and climber: `twisted.logger` with a level filter, as
text (twistd's own format) or as JSON lines.

Our loggers publish through `observer`, which drops events below the level
set from ``log.level`` and passes the rest to the global publisher (where
twistd's log observer is).  Twisted's own events are not filtered.

Under twistd both formats replace twistd's log observer (see
`use_log_format`): ``log.format: text`` by the same text lines, rendered
faster (`classic_text`); ``json`` by `json_lines_observer`: one JSON
object per line, with
``time``, ``level``, ``namespace``, ``message`` (the text the text format
shows), ``traceback`` for failures, and the event's own fields (a tunnel's
``outcome``, ``client``, ``user``, ``target``, ``bytes_up``,
``bytes_down``, ``duration``, ...).

Logs cannot be forged: on its way to the global publisher every text
(``str`` or ``bytes``) field of our events is wrapped in `LogText` /
`LogBytes`, which equal the raw value (so the JSON fields keep it) but
format escaped (`escape_text`): one event is one line, with no control,
line-separator or bidi characters.  Fields that carry what a peer chose
(`PEER_FIELDS`: ``user``, ``target``, ...) are also quoted logfmt-style
when they hold spaces, quotes, ``=`` or escapes (`quote_text`), so a
username cannot pose as another field.
"""

from __future__ import annotations

import datetime
import json
import re
import sys
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    globalLogPublisher,
    timeFormatRFC3339,
)

LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}

# Text that cannot forge a log line

#: What `escape_text` escapes: the backslash (the escape character itself),
#: C0 controls and DEL (LF, CR, ESC of ANSI sequences, NUL), C1 controls
#: (NEL, the one-byte CSI), the line and paragraph separators, the bidi
#: controls (marks, embeddings, overrides, isolates: they reorder what a
#: terminal or an editor shows) and surrogates (lone ones, from text decoded
#: with ``surrogateescape``, are not even writable as UTF-8).
_ESCAPED = re.compile(r"[\\\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")
#: An escaped value holding one of these is quoted by `quote_text`.
_NEEDS_QUOTES = re.compile(r'[\s"=\\]')


def _escape_char(match: re.Match) -> str:
    code = ord(match.group())
    if code == 0x5C:
        return "\\\\"
    if code < 0x80:
        return f"\\x{code:02x}"
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape's stand-in for byte 0x80-0xff
        return f"\\x{code - 0xDC00:02x}"
    return f"\\u{code:04x}"


def escape_text(text: str) -> str:
    """``text`` safe for one line of a text log.

    The backslash becomes ``\\\\``; a code point below 0x80 (C0 controls,
    DEL) ``\\xNN``; a byte that was not UTF-8 (a surrogate U+DC80-U+DCFF
    from ``surrogateescape``) ``\\xNN`` of that byte; C1 controls, the line
    and paragraph separators, the bidi controls and other surrogates
    ``\\uNNNN``.  Everything else, non-ASCII letters included, is kept.
    Distinct texts give distinct results (the escapes decode back)."""
    text = str.__str__(text)  # a plain str, whatever subclass came in
    if _ESCAPED.search(text) is None:
        return text
    return _ESCAPED.sub(_escape_char, text)


def quote_text(text: str) -> str:
    """`escape_text`, then quoted logfmt-style (``"..."``, with ``\\"``)
    when the result is empty or holds whitespace, ``"``, ``=`` or an escape,
    so that it reads as one field value: ``user="x target=1.2.3.4:80"``.
    Plain values (``alice``, ``example.com:443``, ``用户``) stay as they are."""
    escaped = escape_text(text)
    if escaped and _NEEDS_QUOTES.search(escaped) is None:
        return escaped
    return '"' + escaped.replace('"', '\\"') + '"'


def bytes_text(data: bytes) -> str:
    """``data`` as text for a log: UTF-8, each byte that is not shown by
    `escape_text` as ``\\xNN``."""
    return bytes(data).decode("utf-8", "surrogateescape")


class LogText(str):
    """A text field of a log event: equal to the raw value (comparisons,
    ``json.dumps``), formatted (``{field}``, ``{field!s}``) escaped by
    `escape_text`."""

    __slots__ = ()

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    def __str__(self) -> str:
        return escape_text(self)


class PeerText(LogText):
    """A `LogText` of a `PEER_FIELDS` field: also quoted by `quote_text`."""

    __slots__ = ()

    def __str__(self) -> str:
        return quote_text(self)


class LogBytes(bytes):
    """A bytes field of a log event: equal to the raw value, formatted as
    `bytes_text` escaped (rather than Python's ``b'...'``)."""

    __slots__ = ()

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    def __str__(self) -> str:
        return escape_text(bytes_text(self))


class PeerBytes(LogBytes):
    """A `LogBytes` of a `PEER_FIELDS` field: also quoted by `quote_text`."""

    __slots__ = ()

    def __str__(self) -> str:
        return quote_text(bytes_text(self))


#: Event fields whose value a peer chose (names, addresses, protocol
#: tokens, request lines): quoted when needed (`quote_text`).
PEER_FIELDS = frozenset({"user", "username", "target", "host", "sni", "alpn", "request", "client", "peer"})


def escaped_event(event: dict) -> dict:
    """A copy of ``event`` whose ``str`` and ``bytes`` field values (keys
    not starting with ``log_``) format escaped: `LogText`, `PeerText`,
    `LogBytes`, `PeerBytes`; a plain ``str`` that formats as itself
    (nothing to escape, and for a `PEER_FIELDS` field nothing to quote) is
    kept as it is, which is most of them and saves each its wrapper and its
    ``__format__`` call.  Other values (numbers, addresses, exceptions) are
    kept; a failure's traceback is formatted by Twisted as it is."""
    escaped = {}
    for key, value in event.items():
        if not key.startswith("log_"):
            peer = key in PEER_FIELDS
            if isinstance(value, str):
                # A str subclass is wrapped whatever it holds: its own
                # str() is not to be trusted.
                if type(value) is not str or _ESCAPED.search(value) is not None or (
                    peer and (not value or _NEEDS_QUOTES.search(value) is not None)
                ):
                    value = (PeerText if peer else LogText)(value)
            elif isinstance(value, bytes):
                value = (PeerBytes if peer else LogBytes)(value)
        escaped[key] = value
    return escaped


_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
#: Where our loggers publish: the level filter, then the global publisher
#: (twistd's text or JSON observer) with the event's text escaped.
observer = FilteringLogObserver(lambda event: globalLogPublisher(escaped_event(event)), [_predicate])


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


#: What ``json.dumps(..., ensure_ascii=False)`` writes as it is but a
#: terminal or a line splitter must not see: DEL, C1 controls, the line and
#: paragraph separators, bidi controls, surrogates.  In JSON they can only
#: be inside strings, where a ``\\uNNNN`` escape is the same value.
_JSON_ESCAPED = re.compile(r"[\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")


def _json_escape(match: re.Match) -> str:
    return f"\\u{ord(match.group()):04x}"


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
    line = json.dumps(record, default=_json_value, ensure_ascii=False, separators=(",", ":"))
    return _JSON_ESCAPED.sub(_json_escape, line)


def json_lines_observer(out: IO[str]) -> FileLogObserver:
    """An observer writing each event to ``out`` as a JSON line."""
    return FileLogObserver(out, lambda event: event_as_json(event) + "\n")


# Text lines

#: The last second `_stamp` formatted, and its text.
_last_stamp: list = [None, ""]


def _stamp(when: float | None) -> str:
    """twistd's timestamp (`twisted.logger.timeFormatRFC3339`, whole
    seconds), formatted once per second."""
    if when is None:
        return formatTime(None, timeFormatRFC3339)
    second = int(when)
    if _last_stamp[0] != second:
        _last_stamp[0], _last_stamp[1] = second, formatTime(second, timeFormatRFC3339)
    return _last_stamp[1]


def classic_text(event: dict) -> str | None:
    """One event as twistd's text observer writes it (``<time> [<system>]
    <message>``), the same text, made faster: Twisted renders the message
    with a Python-level ``string.Formatter`` (its ``{name()}`` call syntax),
    about 20 microseconds a line, 4 with ``str.format_map``.  So a format
    without a call is rendered by ``format_map`` and handed to Twisted
    already rendered; anything else (a call, a missing field, a flattened
    event) is left to Twisted, whose ways with bad events stand."""
    text_format = event.get("log_format")
    if type(text_format) is str and "()" not in text_format and "log_flattened" not in event:
        try:
            text = text_format.format_map(event)
        except Exception:
            pass
        else:
            if text and "log_failure" not in event:
                # Twisted's line, put together here: its formatter would
                # parse the rendered text again (half the cost of a line).
                system = event.get("log_system")
                if system is None:
                    level = event.get("log_level")
                    system = f"{event.get('log_namespace', '-')}#{'-' if level is None else level.name}"
                else:
                    try:
                        system = str(system)
                    except Exception:
                        system = "UNFORMATTABLE"
                return f"{_stamp(event.get('log_time'))} [{system}] {text}".replace("\n", "\n\t") + "\n"
            event = dict(event)
            event["log_format"] = text.replace("{", "{{").replace("}", "}}")
    return formatEventAsClassicLogText(event, formatTime=_stamp)


# twistd

#: Where twistd was told to log (``--logfile``, ``--nodaemon``), for
#: `twistd_text_observer` and `twistd_json_observer`.
_twistd_destination: tuple[str | None, bool] = (None, True)


def use_log_format(log_format: str, twistd_options: Any) -> None:
    """Make twistd log in ``log.format``; called from the plugins' options.

    This sets twistd's ``--logger`` option (``twistd_options``: the plugin
    options' parent) to `twistd_text_observer` (twistd's own text format,
    rendered faster: `classic_text`) or `twistd_json_observer`, which write
    where ``--logfile`` says (``-`` or, with ``--nodaemon``, nothing:
    stdout), and reopen a log file on ``SIGUSR1`` as twistd's own observer
    does.  An explicit ``--logger`` or ``--syslog`` is left as it is, as is
    a daemon told to log to stdout (twistd refuses that itself)."""
    global _twistd_destination
    if log_format not in ("text", "json") or twistd_options is None:
        return
    try:
        explicit = twistd_options["logger"] or twistd_options.get("syslog")
        logfile, nodaemon = twistd_options["logfile"], bool(twistd_options.get("nodaemon"))
    except KeyError:  # not twistd's ServerOptions
        return
    if explicit or (logfile == "-" and not nodaemon):
        return
    _twistd_destination = (logfile, nodaemon)
    twistd_options["logger"] = f"{__name__}.twistd_{log_format}_observer"


def _twistd_log_file() -> IO[str]:
    """Where twistd was told to log: stdout, or a `LogFile` rotated on
    ``SIGUSR1`` (as twistd's own observer does, unless the signal is
    taken)."""
    logfile, nodaemon = _twistd_destination
    if logfile == "-" or (nodaemon and not logfile):
        return sys.stdout
    import signal

    from twisted.python.logfile import LogFile

    out = LogFile.fromFullPath(logfile or "twistd.log")
    if not signal.getsignal(signal.SIGUSR1):

        def rotate(signum: int, frame: Any) -> None:
            from twisted.internet import reactor

            reactor.callFromThread(out.rotate)

        signal.signal(signal.SIGUSR1, rotate)
    return out


def twistd_text_observer() -> FileLogObserver:
    """twistd ``--logger`` factory: text lines where ``--logfile`` says."""
    return FileLogObserver(_twistd_log_file(), classic_text)


def twistd_json_observer() -> FileLogObserver:
    """twistd ``--logger`` factory: JSON lines where ``--logfile`` says."""
    return json_lines_observer(_twistd_log_file())
