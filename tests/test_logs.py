"""Logs: the level filter, JSON lines, and how twistd is told to write them."""

from __future__ import annotations

import io
import json

import pytest
from twisted.logger import Logger, LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from mtop import logs


def capture(emit) -> dict:
    events: list[dict] = []
    emit(Logger(namespace="mtop.test", observer=events.append))
    assert len(events) == 1
    return events[0]


def tunnel_event() -> dict:
    # As mtop.server logs one tunnel's end.
    return capture(
        lambda log: log.info(
            "tunnel {outcome}: client={client} user={user} target={target} "
            "up={bytes_up} down={bytes_down} duration={duration:.3f}s{detail_text}",
            outcome="done",
            client="127.0.0.1:53942",
            user="alice",
            target="example.com:443",
            bytes_up=812,
            bytes_down=48211,
            duration=1.2042,
            detail=None,
            detail_text="",
            tunnel_event=True,
        )
    )


def test_json_line_has_the_structured_fields_and_the_text():
    event = tunnel_event()
    line = logs.event_as_json(event)
    assert "\n" not in line
    record = json.loads(line)
    assert record["message"] == formatEvent(event)
    assert record["message"] == (
        "tunnel done: client=127.0.0.1:53942 user=alice target=example.com:443 up=812 down=48211 duration=1.204s"
    )
    assert record["level"] == "info"
    assert record["namespace"] == "mtop.test"
    assert record["time"].endswith("+00:00")
    assert {k: record[k] for k in ("outcome", "client", "user", "target", "bytes_up", "bytes_down")} == {
        "outcome": "done",
        "client": "127.0.0.1:53942",
        "user": "alice",
        "target": "example.com:443",
        "bytes_up": 812,
        "bytes_down": 48211,
    }
    assert record["duration"] == pytest.approx(1.2042)
    assert record["tunnel_event"] is True
    # Twisted's internals and text-only helpers stay out.
    assert not [k for k in record if k.startswith("log_")]
    assert "detail_text" not in record and "format" not in record


def test_json_line_levels_failures_objects_and_reserved_names():
    class Peer:
        def __str__(self) -> str:
            return "IPv4Address(TCP, '127.0.0.1', 5)"

    try:
        1 / 0
    except ZeroDivisionError:
        failure = Failure()
    event = capture(lambda log: log.failure("flush failed for {peer}", failure, level=LogLevel.error, peer=Peer(), namespace="x"))
    record = json.loads(logs.event_as_json(event))
    assert record["level"] == "error"
    assert record["message"] == "flush failed for IPv4Address(TCP, '127.0.0.1', 5)"
    assert "ZeroDivisionError" in record["traceback"]
    assert record["peer"] == "IPv4Address(TCP, '127.0.0.1', 5)"
    # An event field named like one of the line's own keys is renamed.
    assert record["field_namespace"] == "x" and record["namespace"] == "mtop.test"
    warn = json.loads(logs.event_as_json(capture(lambda log: log.warn("careful"))))
    assert warn["level"] == "warn" and warn["message"] == "careful"


def test_json_lines_observer_writes_one_object_per_line():
    out = io.StringIO()
    observer = logs.json_lines_observer(out)
    observer(tunnel_event())
    observer(capture(lambda log: log.info("second {n}", n=2)))
    lines = out.getvalue().splitlines()
    assert [json.loads(line)["message"] for line in lines] == [formatEvent(tunnel_event()), "second 2"]


def test_json_lines_keep_raw_text_without_raw_line_breaks_or_terminal_controls():
    """JSON escapes C0 controls itself; DEL, C1 controls, the line and
    paragraph separators, bidi controls and lone surrogates are written as
    ``\\uNNNN`` too, so a JSON line is one line for any line splitter and
    safe in a terminal, and still parses to the raw value."""
    raw = "a\nb\rc\x1b[31m\x7f\x85\x9b\u2028\u2029\u202e\u2066" + b"\xff".decode("utf-8", "surrogateescape")
    out = io.StringIO()
    observer = logs.json_lines_observer(out)
    observer(capture(lambda log: log.info("user {user}", user=raw, data=b"\xff")))
    line = out.getvalue()
    assert line.endswith("\n") and len(line.splitlines()) == 1
    assert all(c == "\ufffd" or c.isascii() and c.isprintable() for c in line[:-1])
    line.encode("utf-8")  # no lone surrogate left
    record = json.loads(line)
    assert record["user"] == raw
    assert record["data"] == "\ufffd"  # bytes: as before


@pytest.fixture
def published():
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)
    logs.set_level("info")


@pytest.mark.parametrize("level, expected", [("debug", ["d", "i", "w", "e"]), ("warn", ["w", "e"]), ("error", ["e"])])
def test_level_filters_our_events(published, level, expected):
    """log.level applies before any format: the JSON observer sees what the
    text one would."""
    logs.set_level(level)
    log = logs.logger("mtop.test.level")
    log.debug("d")
    log.info("i")
    log.warn("w")
    log.error("e")
    assert [formatEvent(e) for e in published if e.get("log_namespace") == "mtop.test.level"] == expected


def twistd_options(*argv: str):
    from twisted.scripts.twistd import ServerOptions

    options = ServerOptions()
    options.parseOptions(list(argv))
    return options


def write_config(tmp_path, log_format: str) -> str:
    from mtop.certs import init_certs

    init_certs(str(tmp_path), ["localhost"])
    path = tmp_path / "mtop.yaml"
    path.write_text(
        "server: {listen: '127.0.0.1:0', crt: server.crt, key: server.key}\n"
        f"log: {{level: info, format: {log_format}}}\n"
        "db: {driverName: sqlite, dsn: mtop.db}\n"
    )
    (tmp_path / "mtop.db").touch()  # the tap refuses a missing SQLite database
    return str(path)


def test_json_format_sets_twistds_logger(tmp_path, monkeypatch):
    monkeypatch.setattr(logs, "_twistd_destination", logs._twistd_destination)
    config = write_config(tmp_path, "json")
    options = twistd_options("--nodaemon", "--pidfile=", "--logfile=-", "mtop", "--config", config)
    assert options["logger"] is logs.twistd_json_observer
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    options["logger"]()(tunnel_event())
    assert json.loads(out.getvalue())["outcome"] == "done"


def test_json_format_to_a_log_file(tmp_path, monkeypatch):
    monkeypatch.setattr(logs, "_twistd_destination", logs._twistd_destination)
    config = write_config(tmp_path, "json")
    logfile = tmp_path / "mtop.log"
    options = twistd_options("--nodaemon", "--pidfile=", f"--logfile={logfile}", "mtop", "--config", config)
    observer = options["logger"]()
    observer(tunnel_event())
    observer._outFile.close()
    assert json.loads(logfile.read_text())["user"] == "alice"


def _failure():
    try:
        1 / 0
    except ZeroDivisionError:
        return Failure()


def test_text_format_writes_twistds_own_lines(tmp_path, monkeypatch):
    """``log.format: text`` writes what twistd's own observer would, line
    for line: rendered by ``str.format_map`` where it can be, by Twisted
    where it cannot (a call in the format, a missing field)."""
    from twisted.logger import formatEventAsClassicLogText, formatTime, timeFormatRFC3339

    monkeypatch.setattr(logs, "_twistd_destination", logs._twistd_destination)
    config = write_config(tmp_path, "text")
    logfile = tmp_path / "mtop.log"
    options = twistd_options("--nodaemon", "--pidfile=", f"--logfile={logfile}", "mtop", "--config", config)
    assert options["logger"] is logs.twistd_text_observer
    observer = options["logger"]()
    events = [
        logs.escaped_event(tunnel_event()),
        logs.escaped_event({**tunnel_event(), "user": "evil\nuser {x}", "log_system": "mtop.server#info"}),
        {"log_format": "{n:>5} {b!r} {{literal}}", "n": 42, "b": b"x", "log_time": 1.5e9, "log_system": "-"},
        {"log_format": "{thing.upper()} done", "thing": "call", "log_time": 1.5e9},
        {"log_format": "{missing} here", "log_time": 1.5e9},
        {"log_format": "no time"},
        {"log_format": "two\nlines {n}", "n": 1, "log_time": 1.5e9, "log_namespace": "mtop.x", "log_level": LogLevel.warn},
        {"log_format": "no level", "log_time": 1.5e9, "log_namespace": "mtop.x"},
        {"log_format": "nothing at all"},
        {"log_format": "", "log_time": 1.5e9},
        {"log_format": "system {n}", "n": 2, "log_time": 1.5e9, "log_system": 7},
        {"log_format": "failed", "log_time": 1.5e9, "log_failure": _failure()},
    ]
    for event in events:
        observer(event)
    observer._outFile.close()
    twisted = "".join(filter(None, (formatEventAsClassicLogText(e, formatTime=lambda t: formatTime(t, timeFormatRFC3339)) for e in events)))
    written = logfile.read_text()
    assert written == twisted
    assert "CALL done" in written and "Unable to format event" in written
    assert 'user="evil\\x0auser {x}"' in written and "ZeroDivisionError" in written


def test_explicit_logger_leaves_twistd_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(logs, "_twistd_destination", logs._twistd_destination)
    text = write_config(tmp_path, "text")
    options = twistd_options("--nodaemon", "--pidfile=", "--syslog", "mtop", "--config", text)
    assert options["logger"] is None
    (tmp_path / "j").mkdir()
    json_config = write_config(tmp_path / "j", "json")
    options = twistd_options(
        "--nodaemon", "--pidfile=", "--logger=twisted.logger.jsonFileLogObserver", "mtop", "--config", json_config
    )
    from twisted.logger import jsonFileLogObserver

    assert options["logger"] is jsonFileLogObserver


def test_a_log_file_is_reopened_on_sigusr1_as_twistd_does(tmp_path, monkeypatch):
    import signal

    monkeypatch.setattr(logs, "_twistd_destination", (str(tmp_path / "mtop.log"), True))
    previous = signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    try:
        observer = logs.twistd_text_observer()
        handler = signal.getsignal(signal.SIGUSR1)
        assert callable(handler)
        observer._outFile.close()
        # A handler already there (someone else's) is left alone.
        signal.signal(signal.SIGUSR1, previous if callable(previous) else (lambda *a: None))
        taken = signal.getsignal(signal.SIGUSR1)
        logs.twistd_json_observer()._outFile.close()
        assert signal.getsignal(signal.SIGUSR1) is taken
    finally:
        signal.signal(signal.SIGUSR1, previous)
