"""Logs that cannot be forged: text a peer chose (a username, a target, an
HTTP host, an error that quotes them) is escaped in the text log, so one
event is one line without control characters, and a value cannot pose as
another field; the JSON log keeps the raw values.

The pure escape (`mtop.logs.escape_text`, `quote_text`) has property tests;
then events go through `mtop.logs.logger()` and Twisted's own formatting
(``formatEvent``, the ``textFileLogObserver`` twistd writes with); then real
auth messages reach the real server (real TLS, real SQLite), and requests
reach climber's SOCKS5 and HTTP proxies."""

from __future__ import annotations

import io
import json
import re
import socket
import ssl
import unicodedata

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher, textFileLogObserver
from twisted.python.failure import Failure

from climber import socks5_codec as socks
from climber.config import ServerEntry
from climber.frontend import Climber, LocalFactory
from climber.httpproxy import HTTPProxyConnection
from climber.pool import ServerPool
from climber.socks5 import Socks5Connection
from climber.tunnel import TunnelOpener
from mtop import logs
from mtop.limits import AuthThrottle, ThrottleSettings
from mtop.logs import PeerText, escape_text, quote_text

#: The bidi controls (Unicode's Bidi_Control property).
BIDI = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
#: Categories no text log line may hold: controls, line and paragraph
#: separators, surrogates.
FORBIDDEN_CATEGORIES = frozenset({"Cc", "Zl", "Zp", "Cs"})
FORGED = "FORGED-LINE-1"


def forbidden(text: str) -> list[str]:
    return [c for c in text if unicodedata.category(c) in FORBIDDEN_CATEGORIES or c in BIDI]


def unescape(escaped: str) -> str:
    """The inverse of `escape_text` (``\\"`` too, for quoted values): its
    existence is what makes the escape injective."""
    out, i = [], 0
    while i < len(escaped):
        char = escaped[i]
        if char != "\\":
            out.append(char)
            i += 1
            continue
        kind = escaped[i + 1]
        if kind in '\\"':
            out.append(kind)
            i += 2
        elif kind == "x":
            code = int(escaped[i + 2 : i + 4], 16)
            assert re.fullmatch("[0-9a-f]{2}", escaped[i + 2 : i + 4])
            out.append(chr(code if code < 0x80 else 0xDC00 + code))
            i += 4
        elif kind == "u":
            assert re.fullmatch("[0-9a-f]{4}", escaped[i + 2 : i + 6])
            out.append(chr(int(escaped[i + 2 : i + 6], 16)))
            i += 6
        else:
            raise AssertionError(f"unknown escape in {escaped!r}")
    return "".join(out)


#: A logfmt value as `quote_text` writes it: plain, or quoted.
_VALUE = r'"(?:[^"\\]|\\.)*"|[^\s"=\\]+'
_PAIR = re.compile(rf"(\w+)=({_VALUE})(?: |$)")


def logfmt(text: str) -> dict[str, str]:
    """``key=value`` pairs of ``text`` (all of it: anything else fails),
    quoted values decoded."""
    fields, pos = {}, 0
    while pos < len(text):
        match = _PAIR.match(text, pos)
        assert match, f"not logfmt at {pos}: {text!r}"
        key, value = match.groups()
        assert key not in fields, f"{key} twice in {text!r}"
        fields[key] = unescape(value[1:-1]) if value.startswith('"') else unescape(value)
        pos = match.end()
    return fields


# The escape, pure


@pytest.mark.parametrize(
    "raw, escaped",
    [
        ("alice", "alice"),
        ("example.com:443", "example.com:443"),
        ("用户", "用户"),
        ("Ünïcødé émoji 🦀", "Ünïcødé émoji 🦀"),
        ("x\nFORGED", "x\\x0aFORGED"),
        ("a\r\nb", "a\\x0d\\x0ab"),
        ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
        ("nul\x00", "nul\\x00"),
        ("del\x7f", "del\\x7f"),
        ("nel\x85 csi\x9b", "nel\\u0085 csi\\u009b"),
        ("ls\u2028ps\u2029", "ls\\u2028ps\\u2029"),
        ("\u202egnp.exe\u2066\u2069\u200f", "\\u202egnp.exe\\u2066\\u2069\\u200f"),
        ("back\\slash", "back\\\\slash"),
        ("\\x0a", "\\\\x0a"),
        # surrogateescape's stand-ins for bytes that were not UTF-8, and a
        # lone surrogate of another kind.
        (b"bad\xff\xfe".decode("utf-8", "surrogateescape"), "bad\\xff\\xfe"),
        ("\ud800", "\\ud800"),
    ],
)
def test_escape_text(raw, escaped):
    assert escape_text(raw) == escaped
    assert unescape(escaped) == raw


@pytest.mark.parametrize(
    "raw, shown",
    [
        ("alice", "alice"),
        ("example.com:443", "example.com:443"),
        ("[2001:db8::1]:443", "[2001:db8::1]:443"),
        ("用户", "用户"),
        ("", '""'),
        ("x target=1.2.3.4:80", '"x target=1.2.3.4:80"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("a=b", '"a=b"'),
        ("tab\there", '"tab\\x09here"'),
        ("nbsp\u00a0here", '"nbsp\u00a0here"'),
        ("x\nFORGED", '"x\\x0aFORGED"'),
        ("back\\slash", '"back\\\\slash"'),
    ],
)
def test_quote_text(raw, shown):
    assert quote_text(raw) == shown


#: Any code point, surrogates included, with the interesting ones often.
_chars = st.one_of(
    st.characters(exclude_categories=()),
    st.sampled_from(sorted(BIDI) + list('\\"= \t\n\r\x00\x1b\x7f\x85\x9b\u2028\u2029\udc80\udcff\ud800')),
)
_texts = st.text(_chars, max_size=40)


@given(_texts)
def test_escaped_text_has_no_control_separator_bidi_or_surrogate_and_decodes_back(text):
    escaped = escape_text(text)
    assert not forbidden(escaped)
    assert unescape(escaped) == text
    escaped.encode("utf-8")  # writable: no lone surrogates
    if not re.search(r"[\\\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]", text) and not BIDI & set(text):
        assert escaped == text


@given(_texts, _texts)
def test_distinct_texts_escape_distinctly(a, b):
    if a != b:
        assert escape_text(a) != escape_text(b)
        assert quote_text(a) != quote_text(b)


@given(_texts, _texts)
def test_a_peer_field_cannot_pose_as_another(user, target):
    """Whatever the username and target, the line parses back as exactly
    its own fields, with the raw values."""
    line = "client=127.0.0.1:5 user={user} target={target} up=1".format(user=PeerText(user), target=PeerText(target))
    assert not forbidden(line)
    assert logfmt(line) == {"client": "127.0.0.1:5", "user": user, "target": target, "up": "1"}


def test_log_text_is_the_raw_value_but_formats_escaped():
    raw = "x\nFORGED"
    text = PeerText(raw)
    assert text == raw and hash(text) == hash(raw) and isinstance(text, str)
    assert json.dumps({"user": text}) == json.dumps({"user": raw})
    assert f"{text}" == str(text) == "%s" % text == '"x\\x0aFORGED"'
    assert f"{text!r}" == repr(raw)  # repr escapes by itself
    assert f"{logs.LogText(raw):>13}" == "  x\\x0aFORGED"
    assert str(logs.LogBytes(b"ok\xff\n")) == "ok\\xff\\x0a"
    assert str(logs.PeerBytes(b"a b")) == '"a b"'
    assert logs.LogBytes(b"ok") == b"ok"


def test_escaped_event_wraps_text_fields_only():
    event = {
        "log_format": "{user}", "log_namespace": "n", "user": "u\n", "detail": "d\x1b", "data": b"b", "n": 3, "none": None,
        "target": 'a"b', "peer": "", "host": "example.com:443", "reason": "plain words",
    }
    escaped = logs.escaped_event(event)
    assert type(escaped["user"]) is logs.PeerText and type(escaped["detail"]) is logs.LogText
    # Quoted (a peer's empty or quote-holding text), or left as it is.
    assert type(escaped["target"]) is logs.PeerText and type(escaped["peer"]) is logs.PeerText
    assert type(escaped["host"]) is str and type(escaped["reason"]) is str
    assert "{target} {peer} {host} {reason}".format_map(escaped) == '"a\\"b" "" example.com:443 plain words'
    assert type(escaped["data"]) is logs.LogBytes
    assert type(escaped["log_format"]) is str and type(escaped["log_namespace"]) is str
    assert escaped["n"] == 3 and escaped["none"] is None
    assert type(event["user"]) is str  # the event itself is not changed


# Through our logger and Twisted's formatting


@pytest.fixture
def published():
    """Events our loggers publish, as the global publisher's observers
    (twistd's) get them."""
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def text_lines(events) -> str:
    """``events`` as twistd's text log writes them."""
    out = io.StringIO()
    observer = textFileLogObserver(out)
    for event in events:
        observer(event)
    return out.getvalue()


def assert_one_clean_line(event: dict) -> str:
    text = text_lines([event])
    assert text.endswith("\n") and len(text.splitlines()) == 1, text
    assert not forbidden(text[:-1]), text
    assert not forbidden(formatEvent(event))
    return text


def assert_not_forged(text: str) -> None:
    # str.splitlines splits at every line break Unicode knows (LF, CR, VT,
    # FF, FS, GS, RS, NEL, LS, PS).
    for line in text.splitlines():
        assert not line.lstrip().startswith(FORGED), text


NASTY_USERS = [
    f"x\n{FORGED} tunnel done: user=admin",
    f"x\r{FORGED}",
    f"x\r\n{FORGED}",
    "\x1b[31mred\x1b[0m\x1b]0;title\x07",
    "nul\x00user",
    'say "hi" target=1.2.3.4:80',
    f"ls\u2028{FORGED}",
    f"nel\x85{FORGED}",
    f"vt\x0b{FORGED}",
    "\u202egnp.exe",
    "back\\slash\\x0a",
    b"bad\xff\nutf8".decode("utf-8", "surrogateescape"),
]


def tunnel_event(log, user: str, target: str, detail: str | None) -> None:
    # The server's outcome event (mtop.server.TunnelProtocol._finish).
    log.info(
        "tunnel {outcome}: client={client} user={user} target={target} "
        "up={bytes_up} down={bytes_down} duration={duration:.3f}s{detail_text}",
        outcome="auth-failed",
        client="127.0.0.1:5",
        user=user,
        target=target,
        bytes_up=0,
        bytes_down=0,
        duration=0.5,
        detail=detail,
        detail_text=f" ({detail})" if detail else "",
        tunnel_event=True,
    )


def test_our_events_format_as_one_clean_line(published):
    log = logs.logger("mtop.test.escaping")
    for user in NASTY_USERS:
        tunnel_event(log, user, f"{user}:443", f"DNS lookup failed: {user}")
    ours = [e for e in published if e.get("log_namespace") == "mtop.test.escaping"]
    assert len(ours) == len(NASTY_USERS)
    for event, user in zip(ours, NASTY_USERS):
        text = assert_one_clean_line(event)
        fields = logfmt(re.sub(r"^.*?tunnel auth-failed: (.*) \(DNS lookup failed: .*\)\n$", r"\1", text))
        assert fields["user"] == user and fields["target"] == f"{user}:443"
        # JSON: one line, parses, raw values; its message is the text's.
        line = logs.event_as_json(event)
        assert len(line.splitlines()) == 1 and not forbidden(line)
        record = json.loads(line)
        assert record["user"] == user and record["detail"] == f"DNS lookup failed: {user}"
        assert record["message"] == formatEvent(event)
    assert_not_forged(text_lines(ours))


def test_plain_values_are_shown_as_before(published):
    log = logs.logger("mtop.test.escaping")
    tunnel_event(log, "用户", "example.com:443", None)
    (event,) = [e for e in published if e.get("log_namespace") == "mtop.test.escaping"]
    assert formatEvent(event) == (
        "tunnel auth-failed: client=127.0.0.1:5 user=用户 target=example.com:443 up=0 down=0 duration=0.500s"
    )


def test_failure_tracebacks_are_left_to_twisted(published):
    """``log.failure``: our line is escaped; the traceback that follows is
    Twisted's, each of its lines indented by a tab (so even an exception
    message with a line break cannot start a line of its own)."""
    log = logs.logger("mtop.test.escaping")
    try:
        raise ValueError(f"unexpected user x\n{FORGED}")
    except ValueError:
        log.failure("lookup of {user} failed", Failure(), user=f"x\n{FORGED}")
    (event,) = [e for e in published if e.get("log_namespace") == "mtop.test.escaping"]
    text = text_lines([event])
    first, *rest = text.splitlines()
    assert first.endswith('lookup of "x\\x0aFORGED-LINE-1" failed')
    assert rest and all(line.startswith("\t") for line in rest), text
    assert f"\t{FORGED}" in rest
    assert "ValueError" in json.loads(logs.event_as_json(event))["traceback"]


# The real server: auth messages with nasty usernames and targets


def auth_message(user: bytes, host: bytes, password: bytes = b"pw", port: int = 80) -> bytes:
    """An MTop v1 auth message built by hand (`mtop.wire.encode_auth`
    would refuse bytes that are not UTF-8)."""
    return (
        b"\x01\x01"
        + bytes([len(user)]) + user
        + bytes([len(password)]) + password
        + b"\x03" + bytes([len(host)]) + host
        + port.to_bytes(2, "big")
    )


def send_auth(port: int, ca: str, message: bytes) -> bytes:
    context = ssl.create_default_context(cafile=ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols(["mtop"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(message)
            answer = b""
            try:
                while chunk := tls.recv(65536):
                    answer += chunk
            except (ConnectionResetError, ssl.SSLError):
                pass
            return answer


async def outcomes(events, factory, count: int) -> list[dict]:
    """Wait (up to 10 s) for ``count`` tunnel outcome events of ``factory``."""
    for _ in range(200):
        found = [
            e for e in events
            if e.get("tunnel_event") and getattr(e.get("log_source"), "factory", None) is factory
        ]
        if len(found) >= count and not factory.tunnels:
            return found
        await deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"{len(found)} of {count} outcome events: {[formatEvent(e) for e in found]}")


def assert_all_clean(events) -> str:
    for event in events:
        assert_one_clean_line(event)
        line = logs.event_as_json(event)
        assert len(line.splitlines()) == 1 and not forbidden(line), line
        json.loads(line)
    text = text_lines(events)
    assert_not_forged(text)
    return text


@pytest_twisted.ensureDeferred
async def test_nasty_usernames_and_targets_reach_the_log_as_one_clean_line(server, events):
    factory, port, paths = server
    # Many failed logins from 127.0.0.1 on purpose: no ban.
    factory.throttle = AuthThrottle(reactor, ThrottleSettings(max_failures=0), counters=factory.counters)
    utf8_users = [u for u in NASTY_USERS if not re.search("[\udc80-\udcff]", u)]
    messages = [auth_message(u.encode(), b"example.com") for u in utf8_users]
    targets = [f"x\n{FORGED}.invalid", f"\x1b[2J{FORGED}.invalid", f"t\r{FORGED} user=admin"]
    # An unknown user with a nasty target: refused, target logged.
    messages += [auth_message(b"nobody", t.encode()) for t in targets]
    # alice with a nasty target: logged in, then the target's name does not
    # resolve, and the error detail may quote it.
    messages += [auth_message(b"alice", t.encode()) for t in targets]
    # Not UTF-8: the wire decoder refuses the message (bad-request).
    invalid = [auth_message(b"bad\xff\xfe\n" + FORGED.encode(), b"example.com"),
               auth_message(b"nobody", b"h\xff\n" + FORGED.encode())]
    for message in messages + invalid:
        assert await deferToThread(send_auth, port, paths.ca_crt, message) == b""
    found = await outcomes(events, factory, len(messages) + len(invalid))

    by_user = {}
    for event in found:
        by_user.setdefault(event["user"], []).append(event)
    for user in utf8_users:
        (event,) = by_user[user]
        assert event["outcome"] == "auth-failed" and event["user"] == user  # raw in the event
        assert json.loads(logs.event_as_json(event))["user"] == user  # and in the JSON
    nobody = sorted(e["target"] for e in by_user["nobody"] if e["outcome"] == "auth-failed")
    assert nobody == sorted(f"{t}:80" for t in targets)
    alice = by_user["alice"]
    assert sorted(e["target"] for e in alice) == sorted(f"{t}:80" for t in targets)
    assert {e["outcome"] for e in alice} == {"connect-failed"}
    # What the refusal of bytes that are not UTF-8 logs quotes none of them.
    bad = by_user[None]
    assert {e["outcome"] for e in bad} == {"bad-request"}
    assert sorted(e["detail"] for e in bad) == ["domain name is not valid UTF-8", "username is not valid UTF-8"]
    for event in bad:
        assert formatEvent(event).endswith(f"user=None target=None up=0 down=0 duration={event['duration']:.3f}s ({event['detail']})")

    text = assert_all_clean(events)  # every event of the test, not only the outcomes
    for user in utf8_users:
        assert f"user={quote_text(user)} target=example.com:80 " in text
    assert f'user=alice target="x\\x0a{FORGED}.invalid:80" ' in text


# climber: SOCKS5 domain names and HTTP request lines


@pytest.fixture
def proxies(server):
    """climber's SOCKS5 and HTTP proxies through the in-process server:
    (socks5 port, http port)."""
    factory, port, paths = server
    entry = ServerEntry(host="127.0.0.1", port=port, username="alice", password="pw", ca=paths.ca_crt)
    opener = TunnelOpener(reactor, ServerPool((entry,), "failover", reactor))
    climber = Climber(opener, reactor, idle_timeout=30, handshake_timeout=5)
    socks5 = reactor.listenTCP(0, LocalFactory(Socks5Connection, climber, timeout=5), interface="127.0.0.1")
    http = reactor.listenTCP(0, LocalFactory(HTTPProxyConnection, climber, timeout=5), interface="127.0.0.1")
    yield socks5.getHost().port, http.getHost().port
    socks5.stopListening()
    http.stopListening()
    climber.close_all()


def socks_request(port: int, host: str, target_port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(socks.encode_greeting([socks.METHOD_NO_AUTH]))
        assert s.recv(2) == b"\x05\x00"
        s.sendall(socks.encode_request(socks.CMD_CONNECT, host, target_port))
        answer = b""
        while chunk := s.recv(512):
            answer += chunk
        return answer


def http_exchange(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        answer = b""
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
        return answer


async def climber_outcomes(events, count: int) -> list[dict]:
    for _ in range(200):
        found = [e for e in events if e.get("tunnel_event") and e.get("log_namespace", "").startswith("climber.")]
        if len(found) >= count:
            return found
        await deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"{len(found)} of {count} climber outcome events")


@pytest_twisted.ensureDeferred
async def test_climber_socks5_domain_names_are_escaped(proxies, events):
    socks5_port, _ = proxies
    hosts = [f"x\n{FORGED}.invalid", f"e\x1b[31m{FORGED}.invalid", f"q\"{FORGED}\" via=elsewhere"]
    for host in hosts:
        answer = await deferToThread(socks_request, socks5_port, host, 80)
        assert answer[:2] == b"\x05\x05"  # the server closed: refused
    found = await climber_outcomes(events, len(hosts))
    assert sorted(e["target"] for e in found) == sorted(f"{h}:80" for h in hosts)
    for event in found:
        assert json.loads(logs.event_as_json(event))["target"] == event["target"]
    text = assert_all_clean(events)
    # Both ends log the target, quoted and escaped.
    assert f'user=alice target="x\\x0a{FORGED}.invalid:80" up=0 ' in text
    assert f'target="x\\x0a{FORGED}.invalid:80" via=None up=0 ' in text
    assert 'target="q\\"FORGED-LINE-1\\" via=elsewhere:80" via=None ' in text


@pytest_twisted.ensureDeferred
async def test_climber_http_request_lines(proxies, events):
    """A request head climber refuses (control characters in its request
    line or host) is answered 400 and logs nothing: only requests that
    open a tunnel have an outcome event, and their hosts passed the URI
    syntax check.  A host that syntax allows but that holds ``=`` or
    quotes is logged quoted."""
    _, http_port = proxies
    refused = [
        "GET http://ex\x1bample.com/ HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
        f"CONNECT x\n{FORGED}:443 HTTP/1.1\r\n\r\n".encode(),
        f"CONNECT x\r{FORGED}:443 HTTP/1.1\r\n\r\n".encode(),
        b"GET http://bad\xff\xfe.example/ HTTP/1.1\r\n\r\n",
        "GET\x1b[31m http://example.com/ HTTP/1.1\r\n\r\n".encode(),
    ]
    for request in refused:
        answer = await deferToThread(http_exchange, http_port, request)
        assert answer.startswith(b"HTTP/1.1 400 "), answer
    await deferLater(reactor, 0.2, lambda: None)
    assert not [e for e in events if e.get("tunnel_event")]
    # Allowed by RFC 3986 reg-name, and not a name that resolves.
    answer = await deferToThread(http_exchange, http_port, b"CONNECT a=b;user='admin':443 HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 502 "), answer
    (event,) = await climber_outcomes(events, 1)
    assert event["target"] == "a=b;user='admin':443"
    text = assert_all_clean(events)
    assert "target=\"a=b;user='admin':443\" via=" in text
