"""Tests for climber.http_codec: heads, targets, hop-by-hop headers, body framing."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from climber import http_codec as http
from climber.http_codec import (
    MAX_CHUNK_LINE,
    MAX_HEAD,
    MAX_HEADERS,
    ChunkedBody,
    HTTPError,
    LengthBody,
    RequestHead,
    ResponseHead,
    UntilClose,
    connection_tokens,
    encode_head,
    error_response,
    parse_authority,
    parse_request_head,
    parse_response_head,
    request_body,
    response_body,
    split_absolute_uri,
    strip_hop_by_hop,
    wants_keep_alive,
)

GET = (
    b"GET http://example.com:8080/a?b=1 HTTP/1.1\r\n"
    b"Host: example.com:8080\r\n"
    b"User-Agent:  curl/8.5  \r\n"
    b"Accept: text/html\r\n"
    b"accept: text/plain\r\n"
    b"X-Empty:\r\n"
    b"\r\n"
)

RESPONSE = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Length: 5\r\n"
    b"\r\n"
)

CHUNKED = (
    b"5\r\nhello\r\n"
    b"1A;name=value;flag\r\n" + b"x" * 26 + b"\r\n"
    b"3 ; ext\nabc\n"
    b"0\r\n"
    b"Expires: never\r\n"
    b"X-Checksum: 1234\r\n"
    b"\r\n"
)


def request(headers=(), version="HTTP/1.1", method="POST"):
    return RequestHead(method, "http://h/", version, list(headers))


def response(status=200, headers=(), version="HTTP/1.1"):
    return ResponseHead(version, status, "", list(headers))


def raises_status(status, func, *args):
    with pytest.raises(HTTPError) as info:
        func(*args)
    assert info.value.status == status, info.value.message
    return info.value


# HTTPError


def test_http_error_carries_status_and_message():
    error = HTTPError(431, "too big")
    assert isinstance(error, ValueError)
    assert (error.status, error.message, str(error)) == (431, "too big", "too big")


# Request heads


def test_request_head_parses_fields_in_order():
    head, used = parse_request_head(GET)
    assert used == len(GET)
    assert (head.method, head.target, head.version) == ("GET", "http://example.com:8080/a?b=1", "HTTP/1.1")
    assert head.headers == [
        ("Host", "example.com:8080"),
        ("User-Agent", "curl/8.5"),
        ("Accept", "text/html"),
        ("accept", "text/plain"),
        ("X-Empty", ""),
    ]


def test_header_lookup_is_case_insensitive_and_joins_repeats():
    head, _ = parse_request_head(GET)
    assert head.get("ACCEPT") == "text/html, text/plain"
    assert head.get_all("accept") == ["text/html", "text/plain"]
    assert head.get("x-empty") == ""
    assert head.get("Missing") is None
    assert head.get_all("Missing") == []


def test_request_head_with_bare_lf_line_endings():
    data = GET.replace(b"\r\n", b"\n")
    head, used = parse_request_head(data)
    assert used == len(data)
    assert head.get("host") == "example.com:8080"


def test_mixed_line_endings():
    data = b"GET http://h/ HTTP/1.1\nHost: h\r\n\n"
    head, used = parse_request_head(data)
    assert used == len(data) and head.headers == [("Host", "h")]


def test_leading_empty_lines_are_skipped_and_consumed():
    data = b"\r\n\n\r\n" + GET
    head, used = parse_request_head(data)
    assert used == len(data)
    assert head.method == "GET"


def test_body_bytes_after_the_head_are_not_consumed():
    data = GET + b"body bytes\r\n\r\nGET / HTTP/1.1\r\n\r\n"
    _, used = parse_request_head(data)
    assert used == len(GET)
    assert data[used:].startswith(b"body bytes")


def test_request_line_alone():
    head, used = parse_request_head(b"CONNECT example.com:443 HTTP/1.0\r\n\r\n")
    assert (head.method, head.target, head.version, head.headers) == ("CONNECT", "example.com:443", "HTTP/1.0", [])
    assert used == 36


def test_latin1_header_values_round_trip():
    head, _ = parse_request_head(b"GET http://h/ HTTP/1.1\r\nX-Name: caf\xe9\r\n\r\n")
    assert head.get("x-name") == "caf\xe9"
    assert encode_head("GET / HTTP/1.1", head.headers) == b"GET / HTTP/1.1\r\nX-Name: caf\xe9\r\n\r\n"


def test_bytearray_buffer_is_accepted():
    head, used = parse_request_head(bytearray(GET))
    assert used == len(GET) and head.method == "GET"


@pytest.mark.parametrize(
    "data",
    [GET, GET.replace(b"\r\n", b"\n"), b"\r\n\r\n" + GET, b"\n" + b"GET http://h/ HTTP/1.0\n\n"],
)
def test_every_strict_prefix_of_a_request_head_is_incomplete(data):
    for end in range(len(data)):
        assert parse_request_head(data[:end]) is None, data[:end]
    assert parse_request_head(data)[1] == len(data)


@pytest.mark.parametrize(
    "data, status",
    [
        (b"GET http://h/\r\n\r\n", 400),  # HTTP/0.9 style
        (b"GET  http://h/ HTTP/1.1\r\n\r\n", 400),  # two spaces
        (b"GET http://h/ HTTP/1.1 \r\n\r\n", 400),
        (b"GET http://h/a b HTTP/1.1\r\n\r\n", 400),
        (b"G(T http://h/ HTTP/1.1\r\n\r\n", 400),  # method not a token
        (b" GET http://h/ HTTP/1.1\r\n\r\n", 400),
        (b"GET http://h/\x00 HTTP/1.1\r\n\r\n", 400),
        (b"GET http://h/ HTTP/1.1\r\r\n\r\n", 400),  # bare CR
        (b"GET http://h/ http/1.1\r\n\r\n", 400),
        (b"GET http://h/ HTTP/1.10\r\n\r\n", 400),
        (b"GET http://h/ HTTP/11\r\n\r\n", 400),
        (b"GET http://h/ HTTP/2.0\r\n\r\n", 505),
        (b"GET http://h/ HTTP/1.2\r\n\r\n", 505),
        (b"GET http://h/ HTTP/0.9\r\n\r\n", 505),
        (b"GET http://h/ HTTP/1.1\r\nNo colon here\r\n\r\n", 400),
        (b"GET http://h/ HTTP/1.1\r\nHost : h\r\n\r\n", 400),
        (b"GET http://h/ HTTP/1.1\r\nHost\t: h\r\n\r\n", 400),
        (b"GET http://h/ HTTP/1.1\r\n: empty name\r\n\r\n", 400),
        (b"GET http://h/ HTTP/1.1\r\nBad Name: v\r\n\r\n", 400),
        (b"GET http://h/ HTTP/1.1\r\nX-A: one\r\n two\r\n\r\n", 400),  # obs-fold
        (b"GET http://h/ HTTP/1.1\r\nX-A: one\r\n\ttwo\r\n\r\n", 400),
        (b"GET http://h/ HTTP/1.1\r\n Host: h\r\n\r\n", 400),  # whitespace before first field
        (b"GET http://h/ HTTP/1.1\r\nX-A: a\x00b\r\n\r\n", 400),
        (b"GET http://h/ HTTP/1.1\r\nX-A: a\rb\r\n\r\n", 400),  # bare CR in a value
        (b"GET http://h/ HTTP/1.1\r\nX-A: a\x7fb\r\n\r\n", 400),
        (b"GET http://h/ HTTP/1.1\r\nX-A: a\x1bb\r\n\r\n", 400),
    ],
)
def test_bad_request_heads(data, status):
    raises_status(status, parse_request_head, data)


def test_tab_is_allowed_inside_a_value():
    head, _ = parse_request_head(b"GET http://h/ HTTP/1.1\r\nX-A: \ta\tb\t\r\n\r\n")
    assert head.get("x-a") == "a\tb"


def test_a_bad_request_line_is_refused_before_the_head_ends():
    raises_status(400, parse_request_head, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\n")
    raises_status(505, parse_request_head, b"GET http://h/ HTTP/2.0\r\nHost: h")


def test_head_at_the_size_limit_is_accepted():
    line = b"GET http://h/ HTTP/1.1\r\n"
    filler = b"X-Fill: " + b"a" * (MAX_HEAD - len(line) - len(b"X-Fill: \r\n\r\n")) + b"\r\n"
    data = line + filler + b"\r\n"
    assert len(data) == MAX_HEAD
    head, used = parse_request_head(data + b"body")
    assert used == MAX_HEAD and len(head.get("x-fill")) > 60000


def test_head_over_the_size_limit_is_431():
    data = b"GET http://h/ HTTP/1.1\r\nX-Fill: " + b"a" * MAX_HEAD
    assert parse_request_head(data[:MAX_HEAD]) is None
    raises_status(431, parse_request_head, data[: MAX_HEAD + 1])
    # The end arriving just past the limit is still too late.
    raises_status(431, parse_request_head, data[: MAX_HEAD - 2] + b"\r\n\r\n")


def test_endless_leading_empty_lines_are_431():
    assert parse_request_head(b"\r\n" * (MAX_HEAD // 2)) is None
    raises_status(431, parse_request_head, b"\r\n" * (MAX_HEAD // 2 + 1))


def test_too_many_header_fields_is_431():
    fields = b"".join(b"X-%d: v\r\n" % i for i in range(MAX_HEADERS))
    head, _ = parse_request_head(b"GET http://h/ HTTP/1.1\r\n" + fields + b"\r\n")
    assert len(head.headers) == MAX_HEADERS
    data = b"GET http://h/ HTTP/1.1\r\n" + fields + b"X-Last: v\r\n\r\n"
    raises_status(431, parse_request_head, data)


# Response heads


def test_response_head():
    head, used = parse_response_head(RESPONSE + b"hello")
    assert used == len(RESPONSE)
    assert (head.version, head.status, head.reason) == ("HTTP/1.1", 200, "OK")
    assert head.get("content-length") == "5"
    assert head.get_all("Content-Type") == ["text/plain"]


@pytest.mark.parametrize(
    "line, expected",
    [
        (b"HTTP/1.0 404 Not Found", ("HTTP/1.0", 404, "Not Found")),
        (b"HTTP/1.1 204 ", ("HTTP/1.1", 204, "")),
        (b"HTTP/1.1 204", ("HTTP/1.1", 204, "")),
        (b"HTTP/1.1 599 Custom  reason\twith tab", ("HTTP/1.1", 599, "Custom  reason\twith tab")),
        (b"HTTP/1.1 200 D\xe9j\xe0 vu", ("HTTP/1.1", 200, "D\xe9j\xe0 vu")),
    ],
)
def test_status_lines(line, expected):
    head, _ = parse_response_head(line + b"\n\n")
    assert (head.version, head.status, head.reason) == expected


def test_response_head_with_bare_lf_and_leading_empty_lines():
    data = b"\r\n\n" + RESPONSE.replace(b"\r\n", b"\n")
    head, used = parse_response_head(data + b"hello")
    assert used == len(data) and head.status == 200


@pytest.mark.parametrize("data", [RESPONSE, RESPONSE.replace(b"\r\n", b"\n"), b"\r\n" + RESPONSE])
def test_every_strict_prefix_of_a_response_head_is_incomplete(data):
    for end in range(len(data)):
        assert parse_response_head(data[:end]) is None, data[:end]


@pytest.mark.parametrize(
    "data",
    [
        b"<html>hello</html>",  # HTTP/0.9 style: no status line
        b"\r\n<html>",
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.2 200 OK\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 099 Low\r\n\r\n",
        b"HTTP/1.1 abc OK\r\n\r\n",
        b"HTTP/1.1  200 OK\r\n\r\n",
        b"HTTP/1.1 200 O\x00K\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nNo colon\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A : b\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: b\r\n c\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: b\x01\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(MAX_HEADERS + 1)) + b"\r\n",
        b"HTTP/1.1 200 OK\r\nX: " + b"a" * MAX_HEAD,
    ],
)
def test_bad_responses_are_502(data):
    raises_status(502, parse_response_head, data)


def test_non_http_response_is_refused_from_its_first_bytes():
    raises_status(502, parse_response_head, b"SSH-")
    assert parse_response_head(b"HTT") is None
    assert parse_response_head(b"\r") is None


# Authorities and absolute URIs


@pytest.mark.parametrize(
    "text, default, expected",
    [
        ("example.com", 80, ("example.com", 80)),
        ("example.com:8080", 80, ("example.com", 8080)),
        ("example.com:443", None, ("example.com", 443)),
        ("example.com:", 80, ("example.com", 80)),
        ("10.0.0.1:1", None, ("10.0.0.1", 1)),
        ("h:65535", None, ("h", 65535)),
        ("[::1]:8443", None, ("::1", 8443)),
        ("[2001:db8::1]", 80, ("2001:db8::1", 80)),
        ("[::ffff:10.0.0.1]:22", None, ("::ffff:10.0.0.1", 22)),
        ("under_score.example", 80, ("under_score.example", 80)),
    ],
)
def test_parse_authority(text, default, expected):
    assert parse_authority(text, default) == expected


@pytest.mark.parametrize(
    "text, default",
    [
        ("example.com", None),
        ("[::1]", None),
        ("", 80),
        (":80", 80),
        ("user@example.com:80", None),
        ("user:pw@example.com", 80),
        ("example.com:0", None),
        ("example.com:65536", None),
        ("example.com:123456", None),
        ("example.com:-1", None),
        ("example.com:8o", None),
        ("example.com: 80", None),
        ("::1:80", None),
        ("[::1", 80),
        ("[::1]x", 80),
        ("[::1]:", None),
        ("[not-v6]:80", None),
        ("[]:80", None),
        ("exa mple.com", 80),
        ("exa/mple.com", 80),
        ("a" * 256, 80),
    ],
)
def test_bad_authorities_are_400(text, default):
    raises_status(400, parse_authority, text, default)


@pytest.mark.parametrize(
    "target, expected",
    [
        ("http://h:8080/path?q=1", ("http", "h", 8080, "/path?q=1")),
        ("http://h/path", ("http", "h", 80, "/path")),
        ("HTTP://Example.com/", ("http", "Example.com", 80, "/")),
        ("http://h", ("http", "h", 80, "/")),
        ("http://h?q", ("http", "h", 80, "/?q")),
        ("http://h:81?q=1#frag", ("http", "h", 81, "/?q=1")),
        ("http://h/p#frag", ("http", "h", 80, "/p")),
        ("http://h#frag", ("http", "h", 80, "/")),
        ("http://[::1]:8080/x", ("http", "::1", 8080, "/x")),
        ("http://[2001:db8::2]/", ("http", "2001:db8::2", 80, "/")),
        ("http://h/a//b;c?d=e/f", ("http", "h", 80, "/a//b;c?d=e/f")),
    ],
)
def test_split_absolute_uri(target, expected):
    assert split_absolute_uri(target) == expected


@pytest.mark.parametrize("target", ["/x", "*", "h:80", "http:/x", "http:x", "//h/x", ""])
def test_origin_form_targets_are_400_with_a_proxy_hint(target):
    error = raises_status(400, split_absolute_uri, target)
    assert "this is a proxy" in error.message


@pytest.mark.parametrize("target", ["http://user@h/", "http://u:p@h:80/x", "http:///x", "http://h:0/", "http://h:x/"])
def test_bad_absolute_uris_are_400(target):
    raises_status(400, split_absolute_uri, target)


@pytest.mark.parametrize("target", ["https://h/", "ftp://h/f", "ws://h/"])
def test_other_schemes_are_501(target):
    raises_status(501, split_absolute_uri, target)


# Hop-by-hop headers


def test_connection_tokens_from_both_connection_fields():
    headers = [
        ("Connection", "Keep-Alive, X-Private"),
        ("connection", " close ,,"),
        ("Proxy-Connection", "keep-alive"),
        ("X-Other", "close"),
    ]
    assert connection_tokens(headers) == {"keep-alive", "x-private", "close"}
    assert connection_tokens([]) == set()


def test_strip_hop_by_hop_drops_standard_and_listed_fields():
    headers = [
        ("Host", "h"),
        ("Connection", "X-Private, Keep-Alive"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"),
        ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
        ("Proxy-Authenticate", "Basic"),
        ("TE", "trailers"),
        ("Upgrade", "websocket"),
        ("Transfer-Encoding", "chunked"),
        ("x-private", "secret"),
        ("Accept", "*/*"),
        ("X-Public", "yes"),
    ]
    assert strip_hop_by_hop(headers) == [("Host", "h"), ("Accept", "*/*"), ("X-Public", "yes")]
    kept = strip_hop_by_hop(headers, keep=("transfer-encoding", "x-private"))
    assert kept == [
        ("Host", "h"),
        ("Transfer-Encoding", "chunked"),
        ("x-private", "secret"),
        ("Accept", "*/*"),
        ("X-Public", "yes"),
    ]
    assert headers[1] == ("Connection", "X-Private, Keep-Alive")  # input untouched


@pytest.mark.parametrize(
    "version, connection, expected",
    [
        ("HTTP/1.1", None, True),
        ("HTTP/1.1", "close", False),
        ("HTTP/1.1", "Keep-Alive", True),
        ("HTTP/1.1", "foo, Close", False),
        ("HTTP/1.0", None, False),
        ("HTTP/1.0", "keep-alive", True),
        ("HTTP/1.0", "Keep-Alive, close", False),
    ],
)
def test_wants_keep_alive(version, connection, expected):
    headers = [] if connection is None else [("Connection", connection)]
    assert wants_keep_alive(request(headers, version)) is expected


def test_proxy_connection_counts_for_keep_alive():
    assert wants_keep_alive(request([("Proxy-Connection", "keep-alive")], "HTTP/1.0"))
    assert not wants_keep_alive(request([("Proxy-Connection", "close")], "HTTP/1.1"))


# Body framing decisions


def framer(body):
    """A comparable description of a BodyFramer."""
    if isinstance(body, LengthBody):
        return ("length", body.remaining)
    if isinstance(body, ChunkedBody):
        return ("chunked", body.error_status)
    assert isinstance(body, UntilClose)
    return ("close",)


@pytest.mark.parametrize(
    "headers, version, expected",
    [
        ([], "HTTP/1.1", ("length", 0)),
        ([("Content-Length", "42")], "HTTP/1.1", ("length", 42)),
        ([("Content-Length", "0")], "HTTP/1.0", ("length", 0)),
        ([("Content-Length", "007")], "HTTP/1.1", ("length", 7)),
        ([("Content-Length", "42, 42")], "HTTP/1.1", ("length", 42)),
        ([("Content-Length", "42"), ("content-length", "42")], "HTTP/1.1", ("length", 42)),
        ([("Transfer-Encoding", "chunked")], "HTTP/1.1", ("chunked", 400)),
        ([("Transfer-Encoding", "Chunked")], "HTTP/1.1", ("chunked", 400)),
        ([("Transfer-Encoding", "gzip, chunked")], "HTTP/1.1", ("chunked", 400)),
        ([("Transfer-Encoding", "gzip"), ("Transfer-Encoding", "chunked")], "HTTP/1.1", ("chunked", 400)),
        ([("Transfer-Encoding", "chunked"), ("Content-Length", "10")], "HTTP/1.1", ("chunked", 400)),
        ([("Transfer-Encoding", "chunked"), ("Content-Length", "bogus")], "HTTP/1.1", ("chunked", 400)),
    ],
)
def test_request_body_framing(headers, version, expected):
    assert framer(request_body(request(headers, version))) == expected


@pytest.mark.parametrize(
    "headers, version",
    [
        ([("Transfer-Encoding", "gzip")], "HTTP/1.1"),
        ([("Transfer-Encoding", "chunked, gzip")], "HTTP/1.1"),
        ([("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "identity")], "HTTP/1.1"),
        ([("Transfer-Encoding", "chunked, chunked")], "HTTP/1.1"),
        ([("Transfer-Encoding", "")], "HTTP/1.1"),
        ([("Transfer-Encoding", "chunked")], "HTTP/1.0"),
        ([("Content-Length", "42, 43")], "HTTP/1.1"),
        ([("Content-Length", "42"), ("Content-Length", "43")], "HTTP/1.1"),
        ([("Content-Length", "42,")], "HTTP/1.1"),
        ([("Content-Length", "")], "HTTP/1.1"),
        ([("Content-Length", "-1")], "HTTP/1.1"),
        ([("Content-Length", "+5")], "HTTP/1.1"),
        ([("Content-Length", "0x10")], "HTTP/1.1"),
        ([("Content-Length", "1 2")], "HTTP/1.1"),
        ([("Content-Length", "\xb2")], "HTTP/1.1"),  # a digit to str.isdigit, not to HTTP
        ([("Content-Length", "9" * 5000)], "HTTP/1.1"),
    ],
)
def test_bad_request_framing_is_400(headers, version):
    raises_status(400, request_body, request(headers, version))


@pytest.mark.parametrize(
    "method, status, headers, version, expected",
    [
        ("HEAD", 200, [("Content-Length", "42")], "HTTP/1.1", ("length", 0)),
        ("HEAD", 200, [("Transfer-Encoding", "chunked")], "HTTP/1.1", ("length", 0)),
        ("GET", 100, [], "HTTP/1.1", ("length", 0)),
        ("GET", 101, [], "HTTP/1.1", ("length", 0)),
        ("GET", 204, [("Content-Length", "42")], "HTTP/1.1", ("length", 0)),
        ("GET", 304, [("Transfer-Encoding", "chunked")], "HTTP/1.1", ("length", 0)),
        ("CONNECT", 200, [("Content-Length", "42")], "HTTP/1.1", ("close",)),
        ("CONNECT", 407, [("Content-Length", "42")], "HTTP/1.1", ("length", 42)),
        ("GET", 200, [("Transfer-Encoding", "chunked")], "HTTP/1.1", ("chunked", 502)),
        ("GET", 200, [("Transfer-Encoding", "gzip, chunked")], "HTTP/1.1", ("chunked", 502)),
        ("GET", 200, [("Transfer-Encoding", "chunked"), ("Content-Length", "9")], "HTTP/1.1", ("chunked", 502)),
        ("GET", 200, [("Transfer-Encoding", "gzip")], "HTTP/1.1", ("close",)),
        ("GET", 200, [("Transfer-Encoding", "chunked, gzip")], "HTTP/1.1", ("close",)),
        ("GET", 200, [("Transfer-Encoding", "chunked")], "HTTP/1.0", ("close",)),
        ("GET", 200, [("Content-Length", "42")], "HTTP/1.1", ("length", 42)),
        ("POST", 500, [("Content-Length", "0")], "HTTP/1.0", ("length", 0)),
        ("GET", 200, [("Content-Length", "42, 42")], "HTTP/1.1", ("length", 42)),
        ("GET", 200, [], "HTTP/1.1", ("close",)),
        ("GET", 200, [], "HTTP/1.0", ("close",)),
    ],
)
def test_response_body_framing(method, status, headers, version, expected):
    assert framer(response_body(response(status, headers, version), method)) == expected


@pytest.mark.parametrize("value", ["42, 43", "abc", "", "-1", "1.5"])
def test_bad_response_content_length_is_502(value):
    raises_status(502, response_body, response(200, [("Content-Length", value)]), "GET")


# Body framers


def test_length_body_across_every_split():
    body = b"0123456789"
    data = body + b"GET next"
    for split in range(len(data) + 1):
        framer = LengthBody(len(body))
        first = framer.feed(data[:split])
        assert first == min(split, len(body))
        assert framer.done is (split >= len(body))
        second = framer.feed(data[split:])
        assert first + second == len(body)
        assert framer.done
        assert framer.feed(b"more") == 0


def test_empty_length_body_is_done_at_once():
    framer = LengthBody(0)
    assert framer.done
    assert framer.feed(b"GET /") == 0


def test_until_close_takes_everything():
    framer = UntilClose()
    assert framer.feed(b"abc") == 3
    assert framer.feed(memoryview(b"de")) == 2
    assert not framer.done


def feed_all(framer, pieces):
    """Feed pieces until the framer is done; total bytes it claimed."""
    total = 0
    for piece in pieces:
        used = framer.feed(piece)
        assert 0 <= used <= len(piece)
        if framer.done:
            return total + used
        assert used == len(piece)
        total += used
    return total


def test_chunked_body_in_one_piece_leaves_what_follows():
    framer = ChunkedBody()
    assert framer.feed(CHUNKED + b"GET next") == len(CHUNKED)
    assert framer.done
    assert framer.feed(b"more") == 0


def test_chunked_body_split_at_every_position():
    data = CHUNKED + b"HTTP/1.1 200 OK\r\n"
    for split in range(len(data) + 1):
        framer = ChunkedBody()
        assert feed_all(framer, [data[:split], data[split:]]) == len(CHUNKED), split
        assert framer.done


def test_chunked_body_split_at_every_pair_of_positions():
    data = b"3;e=1\r\nabc\r\n2\nde\n0\r\nT: v\r\n\r\nXY"
    for first in range(len(data) + 1):
        for second in range(first, len(data) + 1):
            framer = ChunkedBody()
            pieces = [data[:first], data[first:second], data[second:]]
            assert feed_all(framer, pieces) == len(data) - 2
            assert framer.done


def test_chunked_body_one_byte_at_a_time():
    data = CHUNKED + b"NEXT"
    framer = ChunkedBody()
    total = 0
    for i in range(len(data)):
        used = framer.feed(data[i : i + 1])
        total += used
        assert framer.done is (total == len(CHUNKED))
        if i >= len(CHUNKED):
            assert used == 0
    assert total == len(CHUNKED)


def test_chunked_body_from_memoryview_and_bytearray():
    data = CHUNKED + b"NEXT"
    for split in range(0, len(data) + 1, 7):
        framer = ChunkedBody()
        view = memoryview(bytearray(data))
        assert feed_all(framer, [view[:split], bytearray(data[split:])]) == len(CHUNKED)


def test_smallest_chunked_bodies():
    for data in (b"0\r\n\r\n", b"0\n\n", b"0;ext\r\n\r\n", b"00000\r\n\r\n"):
        framer = ChunkedBody()
        assert framer.feed(data + b"x") == len(data)
        assert framer.done


def test_large_chunk_is_counted_not_buffered():
    size = 10 * 1024 * 1024
    framer = ChunkedBody()
    assert framer.feed(b"%x\r\n" % size) == len(b"%x\r\n" % size)
    block = memoryview(bytes(1024 * 1024))
    for _ in range(size // len(block)):
        assert framer.feed(block) == len(block)
    assert framer.feed(b"\r\n0\r\n\r\nrest") == 7
    assert framer.done


def test_sixteen_hex_digit_chunk_size_is_accepted():
    framer = ChunkedBody()
    assert framer.feed(b"ffffffffffffffff\r\nabc") == 21
    assert not framer.done


def test_trailer_section_up_to_the_limit():
    field = b"X-T: " + b"a" * (MAX_HEAD - len(b"X-T: \r\n\r\n")) + b"\r\n"
    framer = ChunkedBody()
    data = b"0\r\n" + field + b"\r\n"
    assert framer.feed(data) == len(data) and framer.done
    raises_status(400, ChunkedBody().feed, b"0\r\n" + field.replace(b"X-T", b"X-TT") + b"\r\n")


def test_trailer_section_over_the_limit_fed_in_pieces():
    framer = ChunkedBody(502)
    framer.feed(b"0\r\n")
    line = b"X-T: " + b"a" * 1000 + b"\r\n"
    with pytest.raises(HTTPError) as info:
        for _ in range(MAX_HEAD // len(line) + 1):
            framer.feed(line)
    assert info.value.status == 502


@pytest.mark.parametrize(
    "data",
    [
        b"x\r\n",
        b"\r\n",
        b" 5\r\nhello\r\n",
        b"-5\r\nhello\r\n",
        b"0x5\r\nhello\r\n",
        b"5\r\nhelloXX",
        b"5\r\nhello\rX",
        b"5\r\nhello\r\r\n",
        b"1" * 17 + b"\r\n",
        b"5;ext\x00\r\nhello\r\n",
        b"5;ext\rx\r\nhello\r\n",
        b"5\r\r\nhello\r\n",
        b"5" + b" " * MAX_CHUNK_LINE,
        b"5;" + b"e" * MAX_CHUNK_LINE + b"\r\n",
        b"0\r\nno colon\r\n\r\n",
        b"0\r\nX-A : b\r\n\r\n",
        b"0\r\n folded\r\n\r\n",
        b"0\r\nX-A: b\x00\r\n\r\n",
        b"0\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(MAX_HEADERS + 1)) + b"\r\n",
        b"0\r\nX: " + b"a" * MAX_HEAD,
    ],
)
def test_malformed_chunked_bodies(data):
    for status in (400, 502):
        raises_status(status, ChunkedBody(status).feed, data)


def test_malformed_chunked_body_fed_one_byte_at_a_time():
    framer = ChunkedBody()
    with pytest.raises(HTTPError):
        for byte in b"5\r\nhelloX":
            framer.feed(bytes([byte]))


def test_chunked_body_stays_failed():
    framer = ChunkedBody()
    raises_status(400, framer.feed, b"zz\r\n")
    raises_status(400, framer.feed, b"0\r\n\r\n")
    assert not framer.done


def test_size_line_at_the_limit():
    line = b"5;" + b"e" * (MAX_CHUNK_LINE - 4) + b"\r\n"
    assert len(line) == MAX_CHUNK_LINE
    framer = ChunkedBody()
    assert framer.feed(line + b"hello\r\n0\r\n\r\n") == len(line) + 12
    assert framer.done
    raises_status(400, ChunkedBody().feed, b"5;e" + line[2:])


# Output


def test_encode_head():
    assert encode_head("GET / HTTP/1.1", [("Host", "h"), ("X-A", "")]) == b"GET / HTTP/1.1\r\nHost: h\r\nX-A: \r\n\r\n"
    assert encode_head("HTTP/1.1 204 No Content", []) == b"HTTP/1.1 204 No Content\r\n\r\n"


@pytest.mark.parametrize("headers", [[("X-A", "a\r\nEvil: yes")], [("X-A\n", "a")]])
def test_encode_head_refuses_line_breaks(headers):
    with pytest.raises(ValueError):
        encode_head("GET / HTTP/1.1", headers)


def test_error_response_is_a_complete_response():
    data = error_response(407, "Proxy authentication required", [("Proxy-Authenticate", 'Basic realm="climber"')])
    head, used = parse_response_head(data)
    assert (head.version, head.status, head.reason) == ("HTTP/1.1", 407, "Proxy Authentication Required")
    assert head.headers == [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", "30"),
        ("Connection", "close"),
        ("Proxy-Authenticate", 'Basic realm="climber"'),
    ]
    assert data[used:] == b"Proxy authentication required\n"


@pytest.mark.parametrize("status", [400, 431, 501, 502, 505])
def test_error_response_reason_phrases(status):
    data = error_response(status, "caf\u00e9 \u2603")
    head, used = parse_response_head(data)
    assert head.status == status and head.reason
    body = data[used:]
    assert int(head.get("content-length")) == len(body)
    assert body.decode("utf-8") == "caf\u00e9 \u2603\n"


# Properties: any input is incomplete, valid, or one HTTPError

_PROPERTY_SETTINGS = settings(max_examples=200, deadline=None)

_HTTPISH = st.lists(
    st.sampled_from(
        [b"GET ", b"HTTP/1.1", b"HTTP/1.0", b" 200 ", b"\r\n", b"\n", b"\r", b":", b" ", b"\t", b"X-A", b"0", b"5",
         b"http://h/", b"; e=1", b"\x00", b"\xff", b"abcde"]
    ),
    max_size=30,
).map(b"".join)


def _check_parse(parse, data, statuses):
    try:
        result = parse(data)
    except HTTPError as e:
        assert e.status in statuses
        return
    if result is not None:
        head, used = result
        assert 0 < used <= len(data)
        # The head is complete: more bytes do not change the verdict.
        assert parse(data + b"\r\n\r\n") == (head, used)


@_PROPERTY_SETTINGS
@given(st.one_of(st.binary(max_size=300), _HTTPISH))
def test_any_bytes_parse_as_request_head_or_http_error(data):
    _check_parse(parse_request_head, data, {400, 431, 505})
    _check_parse(parse_request_head, b"GET http://h/ HTTP/1.1\r\n" + data, {400, 431, 505})


@_PROPERTY_SETTINGS
@given(st.one_of(st.binary(max_size=300), _HTTPISH))
def test_any_bytes_parse_as_response_head_or_http_error(data):
    _check_parse(parse_response_head, data, {502})
    _check_parse(parse_response_head, b"HTTP/1.1 200 OK\r\n" + data, {502})


@_PROPERTY_SETTINGS
@given(st.one_of(st.binary(max_size=300), _HTTPISH), st.integers(min_value=0, max_value=300))
def test_any_bytes_into_chunked_body_count_or_http_error(data, split):
    framer = ChunkedBody(502)
    try:
        first = framer.feed(data[:split])
        assert 0 <= first <= min(split, len(data))
        second = framer.feed(data[split:])
        assert 0 <= second <= len(data[split:])
        if not framer.done:
            assert first + second == len(data)
    except HTTPError as e:
        assert e.status == 502


_token = st.text(alphabet="!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1)
_value = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=20)


@_PROPERTY_SETTINGS
@given(_token, st.lists(st.tuples(_token, _value), max_size=10), st.sampled_from(["\r\n", "\n"]))
def test_encoded_heads_parse_back(method, headers, newline):
    headers = [(name, value.strip(" \t")) for name, value in headers]
    data = encode_head(f"{method} http://h/ HTTP/1.1", headers).replace(b"\r\n", newline.encode())
    head, used = parse_request_head(data + b"body")
    assert used == len(data)
    assert (head.method, head.target, head.version, head.headers) == (method, "http://h/", "HTTP/1.1", headers)


@_PROPERTY_SETTINGS
@given(st.lists(st.binary(max_size=40), max_size=6), st.lists(st.integers(0, 400), max_size=5))
def test_generated_chunked_bodies_end_exactly(chunks, cuts):
    body = b"".join(b"%x;n=v\r\n%s\r\n" % (len(c), c) for c in chunks if c) + b"0\r\nT: v\r\n\r\n"
    data = body + b"after"
    points = sorted({min(cut, len(data)) for cut in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    framer = ChunkedBody()
    assert feed_all(framer, pieces) == len(body)
    assert framer.done


def test_module_exports_exist():
    for name in http.__all__:
        assert hasattr(http, name), name
