"""Properties of every parser: any input is incomplete, valid (and
re-encodes to the same bytes where an encoder exists) or exactly one typed
error, whatever it is and however it is split into pieces.

These run in ``make test`` with a moderate number of examples each
(`fuzz_strategies.EXAMPLES`); ``make fuzz`` (``tests/fuzz/run.py``) runs the
same properties with many more.  Anything but the typed error (an
IndexError, a UnicodeError, a RecursionError...) fails the property.

One test per parser entry point, not ``@pytest.mark.parametrize``:
pytest-twisted breaks on parametrized ``@given`` tests.
"""

from __future__ import annotations

import os
import re
import tempfile

from hypothesis import given
from hypothesis import strategies as st

from climber import http_codec as http
from climber import socks5_codec as socks
from climber.config import ClimberConfig, load_climber_config, load_climber_data
from fuzz_strategies import (
    FUZZ,
    ascii_text,
    cuts,
    field_text,
    hosts,
    ports,
    texts,
    tricky_text,
    wire_input,
)
from mtop import dsn as dsnmod
from mtop import wire
from mtop.config import Config, ConfigError, load_config, load_config_data, parse_listen
from mtop.redact import redact
from mtop.urls import ServerLink, URLError, make_url, parse_url

# ---------------------------------------------------------------------------
# The incremental contract, shared by every byte parser


def _verdict(parse, data: bytes, errors: type[Exception]):
    """("none",), ("ok", result) or ("error", class, status) -- any other
    exception propagates and fails the property."""
    try:
        result = parse(data)
    except errors as e:
        return ("error", type(e), getattr(e, "status", None), getattr(e, "reply", None))
    if result is None:
        return ("none",)
    return ("ok", result)


def _consumed(result) -> int | None:
    return result[-1] if isinstance(result, tuple) else None


def check_incremental(parse, data: bytes, errors: type[Exception], split_at: list[int], complete_at=None):
    """``parse`` over ``data`` and over its prefixes, as a caller feeding it
    piece by piece sees them.

    * a prefix is incomplete, or already has the whole input's verdict (the
      same message, or the same error class and status): more bytes never
      change a verdict;
    * a message's strict prefixes are all incomplete, and it never uses
      more bytes than it was given;
    * feeding the pieces cut at ``split_at`` gives the same first verdict as
      feeding ``data`` at once.
    Returns the whole input's verdict."""
    full = _verdict(parse, data, errors)
    n = len(data)
    positions = range(n + 1) if n <= 400 else sorted({0, n, *(c % (n + 1) for c in split_at), *range(0, n, 37)})
    for k in positions:
        verdict = _verdict(parse, data[:k], errors)
        if verdict[0] == "none":
            continue
        assert verdict == full, f"prefix of {k} bytes gave {verdict}, the whole {n} bytes {full}"
        break
    if full[0] == "ok":
        used = complete_at(full[1]) if complete_at else _consumed(full[1])
        if used is not None:
            assert 0 < used <= n
            assert _verdict(parse, data[:used], errors) == full
            assert _verdict(parse, data[: used - 1], errors) == ("none",)
    # A caller's loop: append each piece, parse the buffer, stop at a verdict.
    buffer = b""
    first = ("none",)
    bounds = sorted({min(c, n) for c in split_at} | {n})
    start = 0
    for end in bounds:
        buffer += data[start:end]
        start = end
        first = _verdict(parse, buffer, errors)
        if first[0] != "none":
            break
    assert first == full
    return full


# ---------------------------------------------------------------------------
# MTop v1 (mtop.wire)


@st.composite
def auth_messages(draw) -> bytes:
    host = draw(hosts)
    request = wire.AuthRequest(
        draw(field_text.filter(bool)), draw(field_text), host, draw(ports), wire.address_type_for(host)
    )
    return wire.encode_auth(request)


_auth_input = wire_input(auth_messages())


@FUZZ
@given(_auth_input, cuts)
def test_parse_auth_any_bytes(data, split_at):
    verdict = check_incremental(wire.parse_auth, data, wire.WireError, split_at)
    if verdict[0] == "ok":
        request, consumed = verdict[1]
        assert consumed <= wire.MAX_AUTH_LENGTH
        assert wire.encode_auth(request) == data[:consumed]
        assert "password=<hidden>" in repr(request)
        masked = wire.without_password(data[:consumed])
        again, used = wire.parse_auth(masked)
        assert used == consumed and again.password == "*" * len(request.password.encode())
        assert (again.username, again.host, again.port, again.address_type) == (
            request.username, request.host, request.port, request.address_type)
    elif verdict[0] == "error":
        assert issubclass(verdict[1], wire.WireError) and verdict[1] is not wire.WireError
    else:
        assert len(data) < wire.MAX_AUTH_LENGTH


@FUZZ
@given(wire_input(st.sampled_from([b"\x01\x00", b"\x01\x02", b"\x01\x03"]), 8), cuts)
def test_parse_reply_any_bytes(data, split_at):
    check_incremental(wire.parse_reply, data, wire.BadReply, split_at, complete_at=lambda status: wire.REPLY_LENGTH)


# ---------------------------------------------------------------------------
# SOCKS5 (climber.socks5_codec)

_greetings = st.lists(st.integers(0, 255), min_size=1, max_size=255).map(socks.encode_greeting)
_userpass = st.tuples(field_text.filter(bool), field_text).map(lambda t: socks.encode_userpass(*t))
_requests = st.tuples(st.sampled_from([1, 1, 1, 2, 3, 9]), hosts, ports).map(lambda t: socks.encode_request(*t))
_replies = st.tuples(st.integers(0, 255), hosts, ports).map(lambda t: socks.encode_reply(*t))


def _socks_roundtrip(data: bytes, verdict, encode) -> None:
    if verdict[0] == "ok":
        encoded = encode(verdict[1])
        if encoded is not None:
            assert encoded == data[: len(encoded)]
    elif verdict[0] == "error":
        assert verdict[1] is not socks.SocksError


@FUZZ
@given(wire_input(_greetings), cuts)
def test_socks5_parse_greeting_any_bytes(data, split_at):
    verdict = check_incremental(socks.parse_greeting, data, socks.SocksError, split_at)
    _socks_roundtrip(data, verdict, lambda r: socks.encode_greeting(r[0]))


@FUZZ
@given(wire_input(_userpass), cuts)
def test_socks5_parse_userpass_any_bytes(data, split_at):
    verdict = check_incremental(socks.parse_userpass, data, socks.SocksError, split_at)
    _socks_roundtrip(data, verdict, lambda r: socks.encode_userpass(r[0], r[1]))


def _address_re_encodes(atyp: int, host: str) -> bool:
    # An IP literal sent as a domain name re-encodes as an address.
    return not (atyp == socks.ATYP_DOMAIN and socks.address_type_for(host) != socks.ATYP_DOMAIN)


@FUZZ
@given(wire_input(_requests), cuts)
def test_socks5_parse_request_any_bytes(data, split_at):
    verdict = check_incremental(socks.parse_request, data, socks.SocksError, split_at)
    if verdict[0] == "ok":
        assert verdict[1][1] <= socks.MAX_REQUEST
    _socks_roundtrip(
        data,
        verdict,
        lambda r: socks.encode_request(r[0].command, r[0].host, r[0].port)
        if _address_re_encodes(r[0].address_type, r[0].host)
        else None,
    )


@FUZZ
@given(wire_input(st.integers(0, 255).map(socks.encode_method_choice), 8), cuts)
def test_socks5_parse_method_choice_any_bytes(data, split_at):
    verdict = check_incremental(socks.parse_method_choice, data, socks.SocksError, split_at, complete_at=lambda m: 2)
    _socks_roundtrip(data, verdict, socks.encode_method_choice)


@FUZZ
@given(wire_input(_replies), cuts)
def test_socks5_parse_reply_any_bytes(data, split_at):
    verdict = check_incremental(socks.parse_reply, data, socks.SocksError, split_at)
    _socks_roundtrip(
        data,
        verdict,
        lambda r: socks.encode_reply(r[0], r[1], r[2]) if _address_re_encodes(data[3], r[1]) else None,
    )


# ---------------------------------------------------------------------------
# HTTP (climber.http_codec)

_token = st.text(st.sampled_from("!#$%&'*+-.^_`|~0123456789abcdefXYZ"), min_size=1, max_size=12)
_value = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF).filter(lambda c: c != "\x7f"), max_size=30)
_fields = st.lists(
    st.tuples(
        st.one_of(_token, st.sampled_from(["Content-Length", "Transfer-Encoding", "Connection", "Host", "Proxy-Authorization"])),
        st.one_of(_value, st.sampled_from(["chunked", "gzip, chunked", "close", "keep-alive", "0", "12", "5, 5", "1, 2"])),
    ),
    max_size=8,
)
_targets = st.one_of(
    st.sampled_from(["http://example.com/", "example.com:443", "[::1]:8080", "http://h:80/p?q#f", "/", "*"]),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=30),
)
_methods = st.one_of(st.sampled_from(["GET", "CONNECT", "POST", "HEAD"]), _token)
_versions = st.sampled_from(["HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1 "])
_request_heads = st.builds(
    lambda m, t, v, f, nl: http.encode_head(f"{m} {t} {v}", f).replace(b"\r\n", nl),
    _methods, _targets, _versions, _fields, st.sampled_from([b"\r\n", b"\n"]),
)
_response_heads = st.builds(
    lambda v, code, reason, f, nl: http.encode_head(f"{v} {code} {reason}", f).replace(b"\r\n", nl),
    _versions, st.integers(99, 600), _value.filter(lambda r: "\r" not in r and "\n" not in r), _fields,
    st.sampled_from([b"\r\n", b"\n"]),
)
_leading = st.sampled_from([b"", b"\r\n", b"\n\r\n", b"\r"])
_http_requests = st.tuples(_leading, _request_heads).map(b"".join)
_http_responses = st.tuples(_leading, _response_heads).map(b"".join)


def _check_head(parse, data, split_at, statuses):
    verdict = check_incremental(parse, data, http.HTTPError, split_at)
    if verdict[0] == "error":
        assert verdict[2] in statuses
    elif verdict[0] == "ok":
        head, used = verdict[1]
        assert used <= len(data)
    return verdict


@FUZZ
@given(wire_input(_http_requests), cuts)
def test_http_parse_request_head_any_bytes(data, split_at):
    verdict = _check_head(http.parse_request_head, data, split_at, {400, 431, 505})
    if verdict[0] != "ok":
        return
    head, _ = verdict[1]
    # Re-encoded, the head parses back the same.
    again = http.parse_request_head(http.encode_head(f"{head.method} {head.target} {head.version}", head.headers))
    assert again is not None and again[0] == head
    # Everything the proxy then asks of the head answers or raises HTTPError.
    http.connection_tokens(head.headers)
    http.strip_hop_by_hop(head.headers)
    http.wants_keep_alive(head)
    try:
        framer = http.request_body(head)
    except http.HTTPError as e:
        assert e.status == 400
    else:
        assert isinstance(framer, (http.LengthBody, http.ChunkedBody))
    try:
        if head.method == "CONNECT":
            http.parse_authority(head.target, None)
        else:
            http.split_absolute_uri(head.target)
    except http.HTTPError as e:
        assert e.status in (400, 501)


@FUZZ
@given(wire_input(_http_responses), cuts, st.sampled_from(["GET", "HEAD", "CONNECT", "POST"]))
def test_http_parse_response_head_any_bytes(data, split_at, method):
    verdict = _check_head(http.parse_response_head, data, split_at, {502})
    if verdict[0] != "ok":
        return
    head, _ = verdict[1]
    again = http.parse_response_head(http.encode_head(f"{head.version} {head.status} {head.reason}", head.headers))
    assert again is not None and again[0] == head
    try:
        framer = http.response_body(head, method)
    except http.HTTPError as e:
        assert e.status == 502
    else:
        assert isinstance(framer, http.BodyFramer)


@st.composite
def chunked_bodies(draw) -> bytes:
    parts = []
    for chunk in draw(st.lists(st.binary(max_size=30), max_size=5)):
        if chunk:
            size = format(len(chunk), draw(st.sampled_from(["x", "X"])))
            ext = draw(st.sampled_from(["", ";a=b", "; x", ";q=\"v\""]))
            parts.append(f"{size}{ext}\r\n".encode() + chunk + b"\r\n")
    parts.append(b"0\r\n")
    for name, value in draw(st.lists(st.tuples(_token, _value), max_size=3)):
        parts.append(f"{name}: {value}\r\n".encode("latin-1"))
    parts.append(b"\r\n")
    return b"".join(parts).replace(b"\r\n", draw(st.sampled_from([b"\r\n", b"\n"])))


def _feed_all(framer: http.BodyFramer, pieces: list[bytes]):
    """Total bytes the framer took from ``pieces`` fed in order, whether it
    finished, or the HTTPError status it raised."""
    taken = 0
    try:
        for piece in pieces:
            used = framer.feed(piece)
            assert 0 <= used <= len(piece)
            taken += used
            if framer.done:
                assert framer.feed(b"more") == 0
                return ("done", taken)
            assert used == len(piece), "a framer that is not done takes everything"
    except http.HTTPError as e:
        assert e.status == framer.error_status if isinstance(framer, http.ChunkedBody) else False
        return ("error", e.status)
    return ("more", taken)


def _pieces(data: bytes, split_at: list[int]) -> list[bytes]:
    bounds = sorted({0, len(data), *(min(c, len(data)) for c in split_at)})
    return [data[a:b] for a, b in zip(bounds, bounds[1:])] or [b""]


@FUZZ
@given(wire_input(chunked_bodies(), 400), cuts, st.sampled_from([400, 502]))
def test_http_chunked_body_any_bytes_any_split(data, split_at, status):
    whole = _feed_all(http.ChunkedBody(status), [data])
    assert _feed_all(http.ChunkedBody(status), _pieces(data, split_at)) == whole
    if whole[0] == "done":
        # The body ends exactly where it ends: byte by byte agrees too.
        assert _feed_all(http.ChunkedBody(status), [bytes([b]) for b in data]) == whole


@FUZZ
@given(st.integers(0, 300), st.binary(max_size=400), cuts)
def test_http_length_body_any_split(length, data, split_at):
    whole = _feed_all(http.LengthBody(length), [data])
    assert _feed_all(http.LengthBody(length), _pieces(data, split_at)) == whole
    if length == 0:
        assert http.LengthBody(0).done


_authorities = st.one_of(
    texts,
    st.builds(lambda h, p: f"{h}:{p}", st.one_of(hosts.map(lambda h: f"[{h}]" if ":" in h else h), tricky_text), st.one_of(ports.map(str), tricky_text)),
)


@FUZZ
@given(_authorities, st.sampled_from([None, 80, 443]))
def test_http_parse_authority_any_text(text, default):
    try:
        host, port = http.parse_authority(text, default)
    except http.HTTPError as e:
        assert e.status == 400
        return
    assert 0 < port <= 65535 and host
    shown = f"[{host}]" if ":" in host else host
    assert http.parse_authority(f"{shown}:{port}", None) == (host, port)


@FUZZ
@given(st.one_of(texts, st.builds(lambda s, a, r: f"{s}://{a}{r}", st.sampled_from(["http", "HTTP", "https", "ftp", "x"]), _authorities, texts)))
def test_http_split_absolute_uri_any_text(target):
    try:
        scheme, host, port, path = http.split_absolute_uri(target)
    except http.HTTPError as e:
        assert e.status in (400, 501)
        return
    assert scheme == "http" and path.startswith("/") and "#" not in path
    shown = f"[{host}]" if ":" in host else host
    assert http.split_absolute_uri(f"http://{shown}:{port}{path}") == (scheme, host, port, path)


# ---------------------------------------------------------------------------
# mtop:// links (mtop.urls)

_links = st.builds(
    ServerLink,
    field_text.filter(bool),
    field_text,
    hosts.filter(bool),
    st.integers(1, 65535),
    st.sampled_from(["tls", "quic"]),
    st.one_of(st.just("mtop"), field_text.filter(bool)),
)
_link_texts = st.one_of(
    texts,
    _links.map(make_url),
    st.builds(lambda s, u, p, h, port, path: f"{s}://{u}:{p}@{h}:{port}{path}",
              st.sampled_from(["mtop", "MTOP", "http", ""]), tricky_text,
              st.one_of(tricky_text, st.builds(lambda a, s, b: a + s + b, tricky_text, st.just("Zq") | st.just("Zq9"), tricky_text).map(lambda t: t.replace("Zq9", "Zq0123456789a")).filter(lambda t: True)),
              st.one_of(hosts, tricky_text), st.one_of(ports.map(str), tricky_text),
              st.sampled_from(["", "/", "/tls", "/quic", "/udp", "/tls?proto=", "/tls?proto=x&proto=y", "?proto=a"])),
)


@FUZZ
@given(_link_texts)
def test_parse_url_any_text(text):
    try:
        link = parse_url(text)
    except URLError as e:
        # Errors never quote the link, which holds the password.
        secret = _password_of(text)
        assert secret is None or secret not in str(e)
        return
    assert 0 < len(link.username.encode()) <= 255 and len(link.password.encode()) <= 255
    assert 0 < link.port <= 65535 and link.type in ("tls", "quic") and link.proto
    assert "password=<hidden>" in repr(link)
    # A parsed link's share link parses back to it.
    assert parse_url(make_url(link)) == link


@FUZZ
@given(_links)
def test_make_url_round_trips(link):
    assert parse_url(make_url(link)) == link


# ---------------------------------------------------------------------------
# DSNs (mtop.dsn)

_SECRET = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"), min_size=10, max_size=16).map(
    lambda s: "Zq" + s
)
_mysql_dsns = st.builds(
    lambda u, p, net, addr, db, q: f"{u}:{p}@{net}({addr})/{db}{q}",
    st.one_of(st.just("root"), tricky_text), _SECRET, st.sampled_from(["tcp", "unix", "udp", "tcp6", ""]),
    st.one_of(st.just("127.0.0.1:3306"), st.just("[::1]:3306"), tricky_text), st.one_of(st.just("mtop"), tricky_text),
    st.one_of(st.just(""), st.just("?parseTime=true"), st.builds(lambda k, v: f"?{k}={v}", st.sampled_from(["timeout", "tls", "charset", "readTimeout", "x"]), tricky_text)),
)
_mysql_urls = st.builds(
    lambda s, u, p, h, db, q: f"{s}://{u}:{p}@{h}/{db}{q}",
    st.sampled_from(["mysql", "mariadb"]), st.one_of(st.just("root"), tricky_text), _SECRET,
    st.one_of(st.just("127.0.0.1:3306"), tricky_text), st.one_of(st.just("mtop"), tricky_text),
    st.one_of(st.just(""), st.builds(lambda k, v: f"?{k}={v}", st.sampled_from(["timeout", "ssl", "x"]), tricky_text)),
)
_pg_dsns = st.one_of(
    st.builds(lambda u, p, h, db, q: f"postgres://{u}:{p}@{h}/{db}{q}", st.one_of(st.just("postgres"), tricky_text), st.one_of(_SECRET, st.builds(lambda a, b: a + b, _SECRET, tricky_text)),
              st.one_of(st.just("127.0.0.1"), tricky_text), st.one_of(st.just("mtop"), tricky_text), st.one_of(st.just("?sslmode=disable"), tricky_text)),
    st.builds(lambda h, p, rest: f"host={h} password={p} {rest}", st.one_of(st.just("127.0.0.1"), tricky_text), st.one_of(_SECRET, st.builds(lambda a, b: a + b, _SECRET, tricky_text)), tricky_text),
)


def _password_of(dsn: str) -> str | None:
    match = re.search(r"Zq[A-Za-z0-9]+", dsn)
    return match.group(0) if match else None


@FUZZ
@given(st.one_of(texts, _mysql_dsns, _mysql_urls))
def test_parse_mysql_dsn_any_text(text):
    secret = _password_of(text)
    try:
        kwargs = dsnmod.parse_mysql_dsn(text)
    except dsnmod.DSNError as e:
        assert secret is None or secret not in str(e)
        return
    assert kwargs["database"]
    assert isinstance(kwargs.get("port", 3306), int) and 0 < kwargs.get("port", 3306) <= 65535
    # describe_dsn shows user, host and database: the password only if a
    # malformed DSN put it there (an unencoded '/' in the user, say).
    described = dsnmod.describe_dsn("mysql", text)
    shown_parts = f"{kwargs.get('user', '')} {kwargs.get('host', '')} {kwargs.get('unix_socket', '')} {kwargs['database']}"
    assert secret is None or secret not in described or secret in shown_parts


@FUZZ
@given(st.one_of(texts, _pg_dsns))
def test_check_postgres_dsn_any_text(text):
    secret = _password_of(text)
    try:
        assert dsnmod.check_postgres_dsn(text) == text
    except dsnmod.DSNError as e:
        assert secret is None or secret not in str(e), str(e)
    described = dsnmod.describe_dsn("postgres", text)
    try:
        from psycopg2.extensions import parse_dsn

        parts = parse_dsn(text)
    except Exception:
        return
    shown_parts = " ".join(str(parts.get(k, "")) for k in ("user", "host", "port", "dbname"))
    assert secret is None or secret not in described or secret in shown_parts


# ---------------------------------------------------------------------------
# Configs (mtop.config, climber.config)

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=10**300, max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    texts,
    st.sampled_from([":443", "127.0.0.1:0", "[::1]:8443", "host:99999", ":\u00b2", "10s", "500ms", "5m", "1h", "0", "1e999",
                     "tls", "quic", "mtop", "debug", "sqlite", "psql", "mysql", "mtop.db", "file:x.db?mode=ro",
                     "mtop://u:p@h:1/tls", "mtop://:p@h:1/tls", "root:pw@tcp(127.0.0.1:3306)/mtop",
                     "postgres://postgres@127.0.0.1/mtop?sslmode=disable", "1.2", "1.3", "round_robin",
                     "10.0.0.0/8", "::1/128", "192.0.2.1", "2001:db8::/33", "1.2.3.4/40", "80", "8000-8999", "9-1",
                     "\u0661\u0662", "127.0.0.1:8080"]),
    st.lists(st.sampled_from(["10.0.0.0/8", "fe80::/10", 443, "1-65535", "0", "x", None]), max_size=4),
    _SECRET,
    _SECRET.map(lambda s: f"mtop://u:{s}@h:1/tls"),
    _SECRET.map(lambda s: f"root:{s}@tcp(127.0.0.1:3306)/mtop"),
    _SECRET.map(lambda s: f"postgres://u:{s}@127.0.0.1/mtop"),
    _SECRET.map(lambda s: f"host=127.0.0.1 password={s} dbname=mtop"),
    st.builds(lambda s, t: s + t, _SECRET, tricky_text),
)
_junk = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4), max_leaves=12)


_valid_servers = st.one_of(
    st.fixed_dictionaries(
        {"host": st.sampled_from(["127.0.0.1:8443", "example.com", "[::1]:443"]), "username": st.just("alice"),
         "password": st.one_of(_SECRET, st.just(""))},
        optional={"type": st.sampled_from(["tls", "quic"]), "insecure": st.just(True), "proto": st.just("mtop"),
                  "sni": st.just("example.com"), "pipelining": st.booleans(), "enabled": st.booleans(),
                  "max_streams": st.integers(1, 10000), "quic_packet_size": st.integers(1200, 65527)},
    ),
    st.fixed_dictionaries({"url": st.one_of(_links.map(make_url), _SECRET.map(lambda s: f"mtop://u:{s}@h:1/tls"))},
                          optional={"insecure": st.just(True)}),
    st.fixed_dictionaries({"urls": st.lists(_SECRET.map(lambda s: f"mtop://u:{s}@h:1/quic"), min_size=1, max_size=2)}),
)
_valid_listener = st.fixed_dictionaries(
    {"listen": st.sampled_from(["127.0.0.1:0", ":0", "0.0.0.0:0", "[::1]:0"])},
    optional={"timeout": st.sampled_from([1, "5s", "500ms"]), "username": st.just("local"), "password": _SECRET},
)
_valid_climber = st.fixed_dictionaries(
    {"servers": st.lists(_valid_servers, min_size=1, max_size=3), "socks5": _valid_listener},
    optional={"http": _valid_listener, "log": st.just({"level": "debug"}),
              "strategy": st.sampled_from(["random", "round_robin", "failover", "fastest"]),
              "forward": st.lists(st.fixed_dictionaries({"listen": st.just("127.0.0.1:0"), "target": st.just("example.com:22")}), max_size=2),
              "idle_timeout": st.sampled_from([0, "5m"]), "handshake_timeout": st.just(30),
              "metrics": st.just({"listen": ":9101"})},
)
_valid_mtop = st.fixed_dictionaries(
    {"server": st.fixed_dictionaries({"listen": st.sampled_from([":443", "127.0.0.1:0", "[::1]:8443"])},
                                     optional={"type": st.sampled_from(["tls", "quic"]), "proto": st.just("mtop"),
                                               "handshake_timeout": st.just("10s"), "fallback": st.just("127.0.0.1:8080"),
                                               "proxy_protocol": st.booleans()})},
    optional={"db": st.one_of(st.just({"driverName": "sqlite", "dsn": "mtop.db"}),
                              _SECRET.map(lambda s: {"driverName": "psql", "dsn": f"postgres://u:{s}@127.0.0.1/mtop"}),
                              _SECRET.map(lambda s: {"driverName": "mysql", "dsn": f"root:{s}@tcp(127.0.0.1:3306)/mtop"})),
              "listeners": st.lists(st.fixed_dictionaries({"type": st.sampled_from(["tls", "quic"])}), min_size=1, max_size=2),
              "acl": st.just({"allow": ["10.0.0.0/8"], "deny_ports": [25, "6660-6669"]}),
              "limits": st.just({"max_tunnels": 100}), "log": st.just({"level": "warn"}),
              "metrics": st.just({"listen": "127.0.0.1:9100", "per_user": True})},
)


@st.composite
def edited(draw, valid):
    """A valid document with up to three values replaced, removed or added."""
    import copy

    document = copy.deepcopy(draw(valid))
    for _ in range(draw(st.integers(0, 3))):
        containers = []

        def walk(node):
            if isinstance(node, (dict, list)) and node:
                containers.append(node)
                for child in node.values() if isinstance(node, dict) else node:
                    walk(child)

        walk(document)
        if not containers:
            break
        node = draw(st.sampled_from(containers))
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        key = draw(st.sampled_from(keys))
        action = draw(st.sampled_from(["replace", "remove", "add"]))
        if action == "remove":
            del node[key]
        elif action == "replace" or isinstance(node, list):
            node[key] = draw(st.one_of(_scalars, _junk))
        else:
            node[draw(texts)] = draw(_scalars)
    return document


def _section(keys: list[str]) -> st.SearchStrategy:
    return st.one_of(
        st.dictionaries(st.one_of(st.sampled_from(keys), texts), st.one_of(_scalars, _junk), max_size=len(keys) + 1),
        _junk,
    )


_SERVER_KEYS = ["type", "listen", "crt", "key", "proto", "tls_min_version", "reply_errors", "handshake_timeout",
                "connect_timeout", "idle_timeout", "quic_packet_size", "auth_failure_delay", "fallback", "proxy_protocol"]
_DB_KEYS = ["driverName", "dsn", "cache_ttl", "query_timeout", "recheck_interval", "flush_interval", "outage_grace"]
_mtop_documents = st.one_of(
    _junk,
    edited(_valid_mtop),
    st.fixed_dictionaries(
        {},
        optional={
            "server": _section(_SERVER_KEYS),
            "listeners": st.one_of(st.lists(_section(["type", "listen", "crt", "key", "proto", "proxy_protocol"]), max_size=3), _junk),
            "acl": _section(["allow", "deny", "allow_ports", "deny_ports"]),
            "limits": _section(["max_tunnels", "max_handshakes", "max_per_client"]),
            "auth_throttle": _section(["max_failures", "window", "ban"]),
            "metrics": _section(["listen", "per_user"]),
            "log": _section(["level", "format"]),
            "db": _section(_DB_KEYS),
            "extra": _junk,
        },
    ),
)
_LISTENER_KEYS = ["listen", "timeout", "username", "password"]
_CLIMBER_SERVER_KEYS = ["host", "type", "username", "password", "ca", "proto", "enabled", "url", "urls", "sni",
                        "insecure", "pipelining", "max_streams", "quic_packet_size"]
_climber_documents = st.one_of(
    _junk,
    edited(_valid_climber),
    st.fixed_dictionaries(
        {},
        optional={
            "log": _section(["level", "format"]),
            "socks5": _section(_LISTENER_KEYS),
            "http": _section(_LISTENER_KEYS),
            "servers": st.one_of(st.lists(_section(_CLIMBER_SERVER_KEYS), max_size=3), _junk),
            "forward": st.one_of(st.lists(_section(["listen", "target", "timeout"]), max_size=2), _junk),
            "strategy": _scalars,
            "idle_timeout": _scalars,
            "handshake_timeout": _scalars,
            "metrics": _section(["listen", "per_user"]),
        },
    ),
)


def _secrets_in(document) -> set[str]:
    """The generated passwords (``Zq...``) found only under password, dsn,
    url and urls keys: no message or repr may show them."""
    secret: set[str] = set()
    elsewhere: list[str] = []  # text that may be shown: it must not hold them

    def walk(node, key=None):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(k, None)
                walk(v, k)
        elif isinstance(node, (list, tuple, set)):
            for v in node:
                walk(v, key)
        elif isinstance(node, str):
            if key in ("password", "dsn", "url", "urls"):
                secret.update(re.findall(r"Zq[A-Za-z0-9]{10,}", node))
            else:
                elsewhere.append(node)

    walk(document)
    return {s for s in secret if not any(s in text for text in elsewhere)}


@FUZZ
@given(_mtop_documents)
def test_load_config_data_any_document(document):
    try:
        config = load_config_data(document, None, check_files=False)
    except ConfigError as e:
        assert str(e)
        for secret in _secrets_in(document):
            assert secret not in str(e)
        return
    assert isinstance(config, Config)
    assert config.listeners
    for secret in _secrets_in(document):
        assert secret not in repr(config)


@FUZZ
@given(_climber_documents)
def test_load_climber_data_any_document(document):
    try:
        config = load_climber_data(document, None)
    except ConfigError as e:
        for secret in _secrets_in(document):
            assert secret not in str(e)
        return
    assert isinstance(config, ClimberConfig) and config.usable_servers
    for secret in _secrets_in(document):
        assert secret not in repr(config) and secret not in " ".join(config.warnings)


_YAML_PIECES = st.one_of(
    st.sampled_from(["\n", "  ", "- ", ": ", "? ", "{", "}", "[", "]", ",", "&a ", "*a", "*b", "!!int ", "!!float ", "!!bool ",
                     "!!timestamp ", "!!binary ", "!!set ", "!!omap ", "!!python/name:os.system", '"\\ud800"', '"\\x00"',
                     "2001-02-30", "2001-12-14 21:59:43.10 +25:00", "<<: ", "|\n", ">\n", "#", "'", '"', "\t", "%YAML 1.1\n",
                     "---\n", "...\n", "\ufeff", "server:\n  listen: ", "servers:\n  - url: ", "db:\n  dsn: ", "\x85", "\u2028"]),
    texts,
)
_yaml_texts = st.one_of(st.lists(_YAML_PIECES, max_size=30).map("".join), texts)
_TMP = tempfile.mkdtemp(prefix="mtop-fuzz-yaml-")


@FUZZ
@given(st.one_of(_yaml_texts.map(lambda t: t.encode("utf-8", "surrogatepass")), st.binary(max_size=200)))
def test_yaml_text_into_both_loaders(raw):
    path = os.path.join(_TMP, "fuzz.yaml")
    with open(path, "wb") as f:
        f.write(raw)
    for load in (lambda p: load_config(p, check_files=False), load_climber_config):
        try:
            load(path)
        except ConfigError:
            pass


@FUZZ
@given(st.one_of(texts, st.integers(), st.builds(lambda h, p: f"{h}:{p}", st.one_of(hosts, tricky_text, st.just("")), st.one_of(ports.map(str), tricky_text))))
def test_parse_listen_any_value(value):
    try:
        address = parse_listen(value)
    except ConfigError:
        return
    assert 0 <= address.port <= 65535
    assert parse_listen(str(address)) == address


# ---------------------------------------------------------------------------
# Redaction (mtop.redact) of links and DSNs in sentences


@FUZZ
@given(st.sampled_from(["mtop", "postgres", "mysql", "postgresql"]), st.one_of(st.just("alice"), ascii_text.filter(lambda t: not re.search(r"[\s:/?#@'\"]", t))),
       _SECRET, st.sampled_from(["example.com:443", "127.0.0.1", "[::1]:5432/db", "h/x?y=1"]), texts, texts)
def test_redact_masks_url_passwords_anywhere_in_a_sentence(scheme, user, secret, rest, before, after):
    text = f"{before} {scheme}://{user}:{secret}@{rest} {after}"
    assert secret not in redact(text) or secret in before + after


# ---------------------------------------------------------------------------
# Command lines: mtopctl's argument types, climber's options


_dates = st.one_of(
    texts,
    st.datetimes().map(lambda d: d.isoformat()),
    st.builds(lambda d, z: d.isoformat(timespec="minutes") + z, st.datetimes(), st.sampled_from(["Z", "+01:00", "-01:00", "+23:59", "-23:59"])),
)
_sizes = st.one_of(texts, st.builds(lambda n, u: f"{n}{u}", st.one_of(st.integers(-5, 2**70), st.floats()),
                                    st.sampled_from(["", "K", "M", "G", "T", "KiB", "mb", "B", "x"])))


@FUZZ
@given(_dates, _sizes)
def test_mtopctl_argument_types_any_text(date, size):
    import argparse

    from mtop import ctl

    try:
        shown = ctl._date(date)
    except argparse.ArgumentTypeError:
        pass
    else:
        assert shown is None or re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", shown)
    for convert in (ctl._size, ctl._count):
        try:
            value = convert(size)
        except argparse.ArgumentTypeError:
            continue
        assert value is None or 0 <= value < 2**63
    try:
        assert 0 < ctl._port(size) <= 65535
    except argparse.ArgumentTypeError:
        pass


_climber_args = st.lists(
    st.one_of(
        st.tuples(st.just("--server"), st.one_of(_link_texts, _links.map(make_url))),
        st.tuples(st.sampled_from(["--socks5", "--http"]), st.one_of(st.sampled_from(["127.0.0.1:0", ":0", "[::1]:0"]), tricky_text)),
        st.tuples(st.just("--forward"), st.one_of(st.just("127.0.0.1:0=example.com:22"), tricky_text)),
        st.tuples(st.just("--strategy"), st.one_of(st.sampled_from(["failover", "fastest"]), tricky_text)),
        st.tuples(st.just("--insecure")),
    ),
    min_size=1,
    max_size=5,
)


@FUZZ
@given(_climber_args)
def test_climber_command_line_any_options(groups):
    from twisted.python import usage

    from climber.tap import Options

    argv = [arg for group in groups for arg in group]
    if "--server" not in argv:
        argv += ["--server", "mtop://u:p@127.0.0.1:1/tls"]
    options = Options()
    try:
        options.parseOptions(argv)
    except usage.UsageError:
        return
    assert options.config_data.usable_servers


# ---------------------------------------------------------------------------
# PROXY protocol headers (mtop.proxyproto)

_ipv4 = st.ip_addresses(v=4)
_ipv6 = st.ip_addresses(v=6)
_v1_headers = st.one_of(
    st.builds(lambda a, b, p, q: f"PROXY TCP4 {a} {b} {p} {q}\r\n".encode(), _ipv4, _ipv4, ports, ports),
    st.builds(lambda a, b, p, q: f"PROXY TCP6 {a} {b} {p} {q}\r\n".encode(), _ipv6, _ipv6, ports, ports),
    st.just(b"PROXY UNKNOWN\r\n"),
    st.builds(lambda t: b"PROXY UNKNOWN " + t + b"\r\n", st.binary(max_size=40).filter(lambda b: b"\n" not in b and b"\r" not in b)),
)


@st.composite
def _v2_headers(draw) -> bytes:
    import struct

    from mtop.proxyproto import V2_SIGNATURE

    command = draw(st.sampled_from([0x20, 0x21]))
    family = draw(st.sampled_from([0x11, 0x12, 0x21, 0x22, 0x00, 0x31]))
    if family >> 4 == 1:
        body = draw(_ipv4).packed + draw(_ipv4).packed + struct.pack("!HH", draw(ports), draw(ports))
    elif family >> 4 == 2:
        body = draw(_ipv6).packed + draw(_ipv6).packed + struct.pack("!HH", draw(ports), draw(ports))
    else:
        body = draw(st.binary(max_size=216))
    body += draw(st.binary(max_size=40))  # TLVs
    return V2_SIGNATURE + bytes([command, family]) + struct.pack("!H", len(body)) + body


@FUZZ
@given(wire_input(st.one_of(_v1_headers, _v2_headers())), cuts)
def test_proxy_protocol_parse_header_any_bytes(data, split_at):
    from mtop import proxyproto

    verdict = check_incremental(proxyproto.parse_header, data, proxyproto.ProxyHeaderError, split_at)
    if verdict[0] == "ok":
        info, used = verdict[1]
        assert used <= proxyproto.V2_MAX
        for address in (info.source, info.destination):
            assert address is None or 0 <= address[1] <= 65535
    elif verdict[0] == "none":
        assert len(data) < proxyproto.V2_MAX


# WebSocket: what a peer sends never raises; the stream either delivers
# bytes or closes.


@FUZZ
@given(st.lists(st.tuples(st.sampled_from([b"x-forwarded-for", b"forwarded", b"host"]), st.binary(max_size=80)), max_size=4),
       st.sampled_from(["127.0.0.1", "10.1.2.3", "192.0.2.1", "::1", "junk"]))
def test_forwarded_client_never_raises(headers, peer):
    import ipaddress

    from mtop.websocket import forwarded_client

    trusted = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("10.0.0.0/8"))
    client = forwarded_client(headers, peer, trusted)
    assert client is None or ipaddress.ip_address(client)


@FUZZ
@given(st.lists(st.binary(max_size=300), max_size=6))
def test_websocket_stream_takes_any_bytes(chunks):
    from twisted.internet.protocol import Protocol
    from twisted.internet.task import Clock
    from wsproto import ConnectionType
    from wsproto.connection import Connection

    from mtop.websocket import WebSocketStream

    class Lower:
        tcp = tls = None
        closed = False

        def write(self, data):
            assert isinstance(data, bytes)

        def loseConnection(self):
            self.closed = True

        abortConnection = loseConnection

    got = []

    class Inner(Protocol):
        def dataReceived(self, data):
            assert isinstance(data, bytes) and data
            got.append(data)

        def readConnectionLost(self):
            pass

    stream = WebSocketStream(Lower(), Connection(ConnectionType.SERVER), Clock(), 0)
    stream.attach(Inner())
    for chunk in chunks:
        stream.receive(chunk)


@FUZZ
@given(st.one_of(
    st.binary(max_size=400),
    st.builds(lambda path, headers: b"GET " + path + b" HTTP/1.1\r\n" + headers + b"\r\n\r\n",
              st.sampled_from([b"/t", b"/", b"/t?x=1", b"*"]), st.binary(max_size=200)),
))
def test_websocket_request_heads_never_raise(head):
    from twisted.internet.protocol import Protocol
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from mtop.stats import Counters
    from mtop.websocket import WebSocketFactory

    outcomes = []

    class Tunnel(Protocol):
        tls_ready = False

        def not_websocket(self, reason, request, refusal):
            outcomes.append(("not", reason))

        def dataReceived(self, data):
            outcomes.append(("data", data))

    class Tunnels:
        counters = Counters()

        class settings:
            handshake_timeout = 5.0

        def admission_refusal(self, addr, key=None, pre_login=True):
            return None

        def buildProtocol(self, addr):
            return Tunnel()

    factory = WebSocketFactory(Tunnels(), Clock(), "/t", (), 0)
    protocol = factory.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    for i in range(0, len(head), 97):
        protocol.dataReceived(head[i : i + 97])
    protocol.connectionLost(None)
    answered = transport.value()
    assert outcomes or answered.startswith(b"HTTP/1.1 101 ") or b"\r\n\r\n" not in head or len(head) <= 8192
