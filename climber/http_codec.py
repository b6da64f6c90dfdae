"""HTTP/1.x codec for climber's local forward proxy: pure functions, no I/O.

The proxy takes ``CONNECT host:port`` and absolute-URI requests
(``GET http://host:port/path HTTP/1.1``) from local applications and sends
each one through its own tunnel to the origin.  This module holds everything
that proxy needs to know about HTTP/1.x syntax:

* `parse_request_head` and `parse_response_head` are incremental: they return
  ``None`` while the buffer holds a strict prefix of a head, the parsed head
  plus the number of bytes it used once the blank line has arrived (body bytes
  after it are left to the caller), or raise one `HTTPError` whose ``status``
  is the answer to send.  A head is at most `MAX_HEAD` bytes, so a caller
  never buffers more than that before a verdict.
* `parse_authority` and `split_absolute_uri` turn request targets into the
  host and port a tunnel is opened to.
* `strip_hop_by_hop`, `connection_tokens` and `wants_keep_alive` handle the
  headers that describe one connection rather than the message.
* `request_body` and `response_body` decide how a message body is framed
  (RFC 9112 section 6.3) and return a `BodyFramer` that finds where the body
  ends.  Bodies are streamed unchanged: chunked bodies are not decoded, only
  their chunk-size lines and trailers are parsed, and chunk data is counted
  rather than scanned, so a body of any size passes in constant memory.
* `encode_head` and `error_response` build bytes to send.

Header bytes are decoded as latin-1 (RFC 9110 section 5.5), so every byte
string decodes and the original bytes can be re-encoded exactly.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus

__all__ = [
    "HOP_BY_HOP",
    "MAX_CHUNK_LINE",
    "MAX_HEAD",
    "MAX_HEADERS",
    "BodyFramer",
    "ChunkedBody",
    "HTTPError",
    "Headers",
    "LengthBody",
    "RequestHead",
    "ResponseHead",
    "UntilClose",
    "connection_tokens",
    "encode_head",
    "error_response",
    "parse_authority",
    "parse_request_head",
    "parse_response_head",
    "request_body",
    "response_body",
    "split_absolute_uri",
    "strip_hop_by_hop",
    "wants_keep_alive",
]

#: Largest request or response head (leading empty lines, start line, fields
#: and the blank line), and largest trailer section of a chunked body.
MAX_HEAD = 64 * 1024
#: Most header fields in one head (or trailer fields in one chunked body).
MAX_HEADERS = 200
#: Longest chunk-size line, including its extensions and line ending.
MAX_CHUNK_LINE = 4096

#: Header fields that describe one connection, not the message; a proxy never
#: forwards them (RFC 9110 section 7.6.1), plus the de facto ones clients send.
HOP_BY_HOP: frozenset[str] = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "upgrade",
        "transfer-encoding",
    }
)

SUPPORTED_VERSIONS = ("HTTP/1.1", "HTTP/1.0")

#: Field lines as received: (name as sent, value without surrounding OWS).
Headers = list[tuple[str, str]]

# RFC 9110 section 5.6.2: token = 1*tchar.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Control characters other than HTAB; NUL and bare CR are among them.
_CTL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# A request target: visible characters (obs-text tolerated), no space.
_TARGET = re.compile(r"[\x21-\x7e\x80-\xff]+")
_VERSION = re.compile(r"HTTP/[0-9]\.[0-9]")
_STATUS_CODE = re.compile(r"[1-9][0-9][0-9]")
_DIGITS = re.compile(r"[0-9]+")
_PORT = re.compile(r"[0-9]{1,5}")
# RFC 3986 reg-name (unreserved, pct-encoded and sub-delims characters).
_REG_NAME = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=%]+")
_ABSOLUTE_URI = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://([^/?#]*)(.*)", re.DOTALL)
_HEX_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
_CTL_BYTES = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_LEADING_EMPTY_LINES = re.compile(rb"(?:\r?\n)*")
# The end of a head: a line ending followed by an empty line.
_HEAD_END = re.compile(rb"\n\r?\n")

_MAX_HOST = 255  # what an MTop v1 domain address can carry
_MAX_QUOTED = 80  # how much of a bad input an error message echoes


class HTTPError(ValueError):
    """Input we must refuse.

    ``status`` is the HTTP status to answer with: 400, 431, 501 or 505 for
    requests, 502 for bad responses from an origin.  ``message`` is a sentence
    for the client and the log; ``str(error) == error.message``.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _quote(text: str | bytes) -> str:
    """A short printable rendering of bad input for an error message."""
    if len(text) > _MAX_QUOTED:
        return repr(text[:_MAX_QUOTED]) + "..."
    return repr(text)


class _FieldAccess:
    """Case-insensitive header lookup shared by request and response heads."""

    headers: Headers

    def get_all(self, name: str) -> list[str]:
        """Every value of the field ``name`` (any case), in order."""
        wanted = name.lower()
        return [value for field, value in self.headers if field.lower() == wanted]

    def get(self, name: str) -> str | None:
        """The value of ``name``; repeated fields joined with ``", "``, or
        ``None`` when the field is absent."""
        values = self.get_all(name)
        return ", ".join(values) if values else None


@dataclass
class RequestHead(_FieldAccess):
    """A parsed request line and its header fields."""

    method: str
    target: str
    version: str
    headers: Headers


@dataclass
class ResponseHead(_FieldAccess):
    """A parsed status line and its header fields."""

    version: str
    status: int
    reason: str
    headers: Headers


# Heads


def _split_head(
    buf: bytes | bytearray,
    too_large_status: int,
    check_start_line: Callable[[str], object],
) -> tuple[list[str], int] | None:
    """Find the end of the head in ``buf``.

    Returns the head's lines (decoded, line endings removed, leading empty
    lines skipped) and the bytes used up to and including the blank line, or
    ``None`` while the head is incomplete.  ``check_start_line`` is run on a
    complete first line even before the head ends, so garbage is refused as
    soon as it can be recognised.
    """
    start = _LEADING_EMPTY_LINES.match(buf, 0, MAX_HEAD).end()
    end = _HEAD_END.search(buf, start, MAX_HEAD)
    if end is None:
        if len(buf) > MAX_HEAD:
            raise HTTPError(too_large_status, f"the head is longer than {MAX_HEAD} bytes")
        first_end = buf.find(b"\n", start)
        if first_end >= 0:
            check_start_line(_decode_line(buf[start:first_end]))
        return None
    text = bytes(buf[start : end.start()]).decode("latin-1")
    lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    return lines, end.end()


def _decode_line(raw: bytes | bytearray) -> str:
    """One line without its LF (and without the CR before it)."""
    text = bytes(raw).decode("latin-1")
    return text[:-1] if text.endswith("\r") else text


def _parse_fields(lines: list[str], status: int, too_many_status: int) -> Headers:
    """Parse field lines; raises `HTTPError` with ``status`` for bad syntax."""
    if len(lines) > MAX_HEADERS:
        raise HTTPError(too_many_status, f"more than {MAX_HEADERS} header fields")
    return [_parse_field_line(line, status) for line in lines]


def _parse_field_line(line: str, status: int) -> tuple[str, str]:
    """``name: value`` into (name, value without surrounding OWS)."""
    if line[:1] in (" ", "\t"):
        raise HTTPError(status, "obsolete line folding (a field line starting with whitespace) is not accepted")
    name, colon, value = line.partition(":")
    if not colon:
        raise HTTPError(status, f"header line without a colon: {_quote(line)}")
    if not _TOKEN.fullmatch(name):
        if name and name.rstrip(" \t") != name:
            raise HTTPError(status, f"whitespace between the field name and the colon: {_quote(line)}")
        raise HTTPError(status, f"invalid header field name {_quote(name)}")
    value = value.strip(" \t")
    if _CTL.search(value):
        raise HTTPError(status, f"control character in the value of header field {name}")
    return name, value


def _parse_request_line(line: str) -> tuple[str, str, str]:
    """``method SP target SP version``; raises `HTTPError` (400 or 505)."""
    parts = line.split(" ")
    if len(parts) != 3:
        raise HTTPError(400, f"malformed request line {_quote(line)}")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise HTTPError(400, f"the request method {_quote(method)} is not a token")
    if not _TARGET.fullmatch(target):
        raise HTTPError(400, f"invalid request target {_quote(target)}")
    if version not in SUPPORTED_VERSIONS:
        if _VERSION.fullmatch(version):
            raise HTTPError(505, f"{version} is not supported; use HTTP/1.1 or HTTP/1.0")
        raise HTTPError(400, f"malformed HTTP version {_quote(version)}")
    return method, target, version


def _parse_status_line(line: str) -> tuple[str, int, str]:
    """``version SP status [SP reason]``; raises `HTTPError` (502)."""
    version, _, rest = line.partition(" ")
    if version not in SUPPORTED_VERSIONS:
        raise HTTPError(502, f"the origin did not send an HTTP/1.x status line: {_quote(line)}")
    code, _, reason = rest.partition(" ")
    if not _STATUS_CODE.fullmatch(code):
        raise HTTPError(502, f"the origin sent an invalid status code {_quote(code)}")
    if _CTL.search(reason):
        raise HTTPError(502, "the origin sent a control character in the reason phrase")
    return version, int(code), reason


def parse_request_head(buf: bytes | bytearray) -> tuple[RequestHead, int] | None:
    """Parse a request head at the start of ``buf``.

    Returns ``None`` while the head is incomplete, or the head and the bytes
    it used (leading empty lines and the blank line included; body bytes after
    it are not).  Raises `HTTPError`: 431 for a head over `MAX_HEAD` bytes or
    over `MAX_HEADERS` fields, 505 for an HTTP version other than 1.0 and 1.1,
    400 for anything else malformed.
    """
    found = _split_head(buf, 431, _parse_request_line)
    if found is None:
        return None
    lines, used = found
    method, target, version = _parse_request_line(lines[0])
    headers = _parse_fields(lines[1:], 400, 431)
    return RequestHead(method, target, version, headers), used


def _check_status_line_start(buf: bytes | bytearray) -> None:
    """Refuse a response at once when it cannot start with ``HTTP/``."""
    start = _LEADING_EMPTY_LINES.match(buf, 0, MAX_HEAD).end()
    prefix = bytes(buf[start : start + 5])
    # A lone CR may still become a leading empty line.
    if prefix not in (b"", b"\r") and not b"HTTP/".startswith(prefix):
        raise HTTPError(502, "the origin did not answer with an HTTP/1.x response")


def parse_response_head(buf: bytes | bytearray) -> tuple[ResponseHead, int] | None:
    """Parse a response head at the start of ``buf``.

    Same contract as `parse_request_head`; every error is a 502 since the
    proxy answers its client with it.  HTTP/1.0 and HTTP/1.1 are accepted; a
    response without a status line (HTTP/0.9 style) is an error.
    """
    _check_status_line_start(buf)
    found = _split_head(buf, 502, _parse_status_line)
    if found is None:
        return None
    lines, used = found
    version, status, reason = _parse_status_line(lines[0])
    headers = _parse_fields(lines[1:], 502, 502)
    return ResponseHead(version, status, reason, headers), used


# Targets


def parse_authority(text: str, default_port: int | None) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` into (host, port).

    IPv6 addresses come back without brackets.  A missing (or empty) port is
    ``default_port``; when that is ``None`` the port is required, as in a
    ``CONNECT`` target.  Raises `HTTPError` (400) for an empty host, user
    information, a bad IPv6 literal or a port outside 1-65535.
    """
    if not text:
        raise HTTPError(400, "the target has no host")
    if "@" in text:
        raise HTTPError(400, "user information (user@host) in the target is not accepted")
    if text.startswith("["):
        inside, bracket, after = text[1:].partition("]")
        if not bracket:
            raise HTTPError(400, f"unterminated IPv6 literal in {_quote(text)}")
        try:
            ipaddress.IPv6Address(inside)
        except ValueError:
            raise HTTPError(400, f"invalid IPv6 address {_quote(inside)}") from None
        host = inside
        if after and not after.startswith(":"):
            raise HTTPError(400, f"unexpected text after the IPv6 address in {_quote(text)}")
        port_text = after[1:] if after else ""
    else:
        host, _, port_text = text.partition(":")
        if not host:
            raise HTTPError(400, f"the target {_quote(text)} has no host")
        if ":" in port_text:
            raise HTTPError(400, f"IPv6 addresses must be in brackets: {_quote(text)}")
        if len(host) > _MAX_HOST or not _REG_NAME.fullmatch(host):
            raise HTTPError(400, f"invalid host name {_quote(host)}")
    if not port_text:
        if default_port is None:
            raise HTTPError(400, f"the target {_quote(text)} has no port; use host:port")
        return host, default_port
    port = int(port_text) if _PORT.fullmatch(port_text) else 0
    if not 0 < port <= 0xFFFF:
        raise HTTPError(400, f"invalid port {_quote(port_text)}; ports are 1-65535")
    return host, port


def split_absolute_uri(target: str) -> tuple[str, str, int, str]:
    """An absolute-form target into (scheme, host, port, origin-form path).

    ``"http://h:8080/p?q#f"`` gives ``("http", "h", 8080, "/p?q")``: the scheme
    lower-cased, port 80 when absent, ``"/"`` when there is no path (a query
    is kept), the fragment dropped.  Raises `HTTPError`: 400 for a target that
    is not absolute (this is a proxy: origin-form ``/path`` is for servers) or
    has user information, 501 for a scheme other than ``http`` (``https``
    included: clients must tunnel it with ``CONNECT``).
    """
    match = _ABSOLUTE_URI.fullmatch(target)
    if match is None:
        raise HTTPError(
            400,
            f"the request target {_quote(target)} is not an absolute URI; "
            "this is a proxy, so requests must name the full URL (http://host/path)",
        )
    scheme, authority, rest = match.groups()
    scheme = scheme.lower()
    if scheme != "http":
        raise HTTPError(
            501, f"climber forwards only http:// URLs, not {scheme}://; use CONNECT to tunnel other schemes"
        )
    host, port = parse_authority(authority, 80)
    path = rest.partition("#")[0]
    if not path.startswith("/"):
        path = "/" + path
    return scheme, host, port, path


# Connection management


def connection_tokens(headers: Headers) -> set[str]:
    """The lower-cased tokens of every ``Connection`` and ``Proxy-Connection``
    field, e.g. ``{"close"}`` or ``{"keep-alive", "x-private"}``."""
    tokens: set[str] = set()
    for name, value in headers:
        if name.lower() in ("connection", "proxy-connection"):
            for token in value.split(","):
                token = token.strip(" \t").lower()
                if token:
                    tokens.add(token)
    return tokens


def strip_hop_by_hop(headers: Headers, keep: Iterable[str] = ()) -> Headers:
    """``headers`` without the fields that must not be forwarded.

    Drops the `HOP_BY_HOP` fields and those named by ``Connection`` tokens,
    except the (lower-case) names in ``keep``, e.g. ``transfer-encoding`` when
    the body is forwarded still chunked.  Order is kept.
    """
    drop = (HOP_BY_HOP | connection_tokens(headers)) - {name.lower() for name in keep}
    return [(name, value) for name, value in headers if name.lower() not in drop]


def wants_keep_alive(head: RequestHead) -> bool:
    """Whether the client wants its connection kept open after this exchange:
    by default with HTTP/1.1, only on request with HTTP/1.0."""
    tokens = connection_tokens(head.headers)
    if "close" in tokens:
        return False
    if head.version == "HTTP/1.1":
        return True
    return "keep-alive" in tokens


# Body framing (RFC 9112 section 6.3)


def _transfer_codings(head: RequestHead | ResponseHead) -> list[str] | None:
    """The lower-cased transfer codings, or ``None`` without Transfer-Encoding."""
    values = head.get_all("Transfer-Encoding")
    if not values:
        return None
    codings = []
    for value in values:
        for coding in value.split(","):
            coding = coding.strip(" \t").lower()
            if coding:
                codings.append(coding)
    return codings


def _content_length(head: RequestHead | ResponseHead, status: int) -> int | None:
    """The Content-Length, ``None`` when absent; raises `HTTPError` with
    ``status`` unless every (comma-separated) value is the same number."""
    values = head.get_all("Content-Length")
    if not values:
        return None
    parts = {part.strip(" \t") for value in values for part in value.split(",")}
    if len(parts) != 1:
        raise HTTPError(status, f"conflicting Content-Length values {_quote(', '.join(values))}")
    (text,) = parts
    if not _DIGITS.fullmatch(text):
        raise HTTPError(status, f"invalid Content-Length {_quote(text)}")
    if len(text.lstrip("0")) > 18:
        raise HTTPError(status, f"Content-Length {_quote(text)} is too large")
    return int(text)


def request_body(head: RequestHead) -> BodyFramer:
    """How the body of the request ``head`` is framed.

    A chunked body (Transfer-Encoding wins over Content-Length, which the
    caller then drops), a Content-Length body, or no body.  Raises
    `HTTPError` (400) for a Transfer-Encoding whose final coding is not
    chunked, for one in an HTTP/1.0 request, and for an invalid or
    conflicting Content-Length: framing the proxy and the origin could read
    differently is refused rather than guessed.
    """
    codings = _transfer_codings(head)
    if codings is not None:
        if head.version != "HTTP/1.1":
            raise HTTPError(400, f"Transfer-Encoding is not allowed in an {head.version} request")
        if not codings or codings[-1] != "chunked" or codings.count("chunked") != 1:
            raise HTTPError(400, "the request's Transfer-Encoding must end with chunked (once)")
        return ChunkedBody(400)
    return LengthBody(_content_length(head, 400) or 0)


def response_body(head: ResponseHead, request_method: str) -> BodyFramer:
    """How the body of the response ``head`` to a ``request_method`` request
    is framed.

    No body for HEAD requests and 1xx, 204 and 304 responses; the rest of the
    connection after a 2xx answer to CONNECT; chunked when Transfer-Encoding
    ends with chunked; until the origin closes for any other
    Transfer-Encoding (and, per RFC 9112 section 6.1, for Transfer-Encoding
    in an HTTP/1.0 response, whose framing is faulty); a Content-Length body;
    otherwise until the origin closes.  Raises `HTTPError` (502) for an
    invalid or conflicting Content-Length.
    """
    if request_method == "HEAD" or head.status < 200 or head.status in (204, 304):
        return LengthBody(0)
    if request_method == "CONNECT" and head.status < 300:
        return UntilClose()
    codings = _transfer_codings(head)
    if codings is not None:
        if head.version == "HTTP/1.1" and codings and codings[-1] == "chunked":
            return ChunkedBody(502)
        return UntilClose()
    length = _content_length(head, 502)
    if length is not None:
        return LengthBody(length)
    return UntilClose()


class BodyFramer:
    """Finds where a streamed message body ends, without buffering it.

    ``feed`` is given the bytes that follow the head, as they arrive, and
    says how many at their start belong to the body; ``done`` becomes true
    once the whole body has been seen, and the bytes after it (the next
    pipelined message) are left to the caller.
    """

    done: bool = False

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        """How many bytes at the start of ``data`` belong to the body
        (0 once `done`).  Raises `HTTPError` for malformed framing."""
        raise NotImplementedError


class LengthBody(BodyFramer):
    """A body of a known length (Content-Length, or 0 for no body)."""

    def __init__(self, length: int) -> None:
        if length < 0:
            raise ValueError(f"a body length cannot be negative ({length})")
        self.remaining = length
        self.done = length == 0

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        used = min(self.remaining, len(data))
        self.remaining -= used
        self.done = self.remaining == 0
        return used


class UntilClose(BodyFramer):
    """A body that ends when the sender closes the connection."""

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        return len(data)


# ChunkedBody states
_SIZE_LINE, _DATA, _DATA_CR, _DATA_LF, _TRAILER, _DONE = range(6)
_LONG_SIZE_LINE = f"a chunk-size line is longer than {MAX_CHUNK_LINE} bytes"
_LONG_TRAILER = f"the trailer section is longer than {MAX_HEAD} bytes"


def _find_lf(data: bytes | bytearray | memoryview, start: int, stop: int) -> int:
    """Index of the first LF in ``data[start:stop]``, or -1."""
    if isinstance(data, memoryview):
        index = bytes(data[start:stop]).find(b"\n")
        return index + start if index >= 0 else -1
    return data.find(b"\n", start, stop)


class ChunkedBody(BodyFramer):
    """A chunked body (RFC 9112 section 7.1), tracked but not decoded.

    Chunk-size lines (at most `MAX_CHUNK_LINE` bytes, at most 16 hex digits,
    extensions allowed, CRLF or bare LF) and the trailer section (at most
    `MAX_HEAD` bytes and `MAX_HEADERS` fields) are parsed; chunk data is only
    counted.  ``error_status`` is the status of the `HTTPError` raised for
    malformed framing: 400 for request bodies, 502 for response bodies.
    """

    def __init__(self, error_status: int = 400) -> None:
        self.error_status = error_status
        self.done = False
        self._state = _SIZE_LINE
        self._line = bytearray()
        self._chunk_left = 0
        self._trailer_bytes = 0
        self._trailer_fields = 0

    def _error(self, message: str) -> HTTPError:
        self._state = _DONE
        return HTTPError(self.error_status, f"malformed chunked body: {message}")

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        if self._state == _DONE:
            if self.done:
                return 0
            raise self._error("the body already failed to parse")
        pos, end = 0, len(data)
        while pos < end:
            state = self._state
            if state == _DATA:
                take = min(self._chunk_left, end - pos)
                pos += take
                self._chunk_left -= take
                if not self._chunk_left:
                    self._state = _DATA_CR
            elif state in (_DATA_CR, _DATA_LF):
                byte = data[pos]
                pos += 1
                if byte == 0x0A:
                    self._state = _SIZE_LINE
                elif byte == 0x0D and state == _DATA_CR:
                    self._state = _DATA_LF
                else:
                    raise self._error("chunk data is not followed by CRLF")
            elif state == _SIZE_LINE:
                pos, complete = self._read_line(data, pos, end, MAX_CHUNK_LINE, _LONG_SIZE_LINE)
                if complete:
                    self._size_line()
            else:  # _TRAILER
                room = MAX_HEAD - self._trailer_bytes
                pos, complete = self._read_line(data, pos, end, room, _LONG_TRAILER)
                if complete and self._trailer_line():
                    break
        return pos

    def _read_line(
        self, data: bytes | bytearray | memoryview, pos: int, end: int, limit: int, too_long: str
    ) -> tuple[int, bool]:
        """Collect a line of at most ``limit`` bytes (line ending included)
        into ``self._line``; returns the new position and whether the line is
        complete.  The line ending is not kept; ``too_long`` is the error message
        when the limit is reached."""
        room = limit - len(self._line)
        stop = min(end, pos + room)
        lf = _find_lf(data, pos, stop)
        if lf < 0:
            if stop - pos >= room:
                raise self._error(too_long)
            self._line += data[pos:stop]
            return stop, False
        self._line += data[pos:lf]
        return lf + 1, True

    def _take_line(self) -> bytes:
        line = bytes(self._line)
        self._line.clear()
        return line[:-1] if line.endswith(b"\r") else line

    def _size_line(self) -> None:
        """Parse a complete chunk-size line and move to its data or, for the
        last chunk, to the trailer section."""
        line = self._take_line()
        size, semicolon, extensions = line.partition(b";")
        size = size.rstrip(b" \t")
        if not _HEX_SIZE.fullmatch(size):
            raise self._error(f"invalid chunk size {_quote(size)}")
        if semicolon and _CTL_BYTES.search(extensions):
            raise self._error("control character in a chunk extension")
        self._chunk_left = int(size, 16)
        self._state = _DATA if self._chunk_left else _TRAILER

    def _trailer_line(self) -> bool:
        """Check a complete trailer line; true at the empty line that ends
        the body."""
        self._trailer_bytes += len(self._line) + 1
        line = self._take_line()
        if not line:
            self._state = _DONE
            self.done = True
            return True
        self._trailer_fields += 1
        if self._trailer_fields > MAX_HEADERS:
            raise self._error(f"more than {MAX_HEADERS} trailer fields")
        try:
            _parse_field_line(line.decode("latin-1"), self.error_status)
        except HTTPError as e:
            raise self._error(f"bad trailer field: {e.message}") from None
        return False


# Output


def encode_head(first_line: str, headers: Headers) -> bytes:
    """A head to send: the start line, ``Name: value`` lines and the blank
    line, CRLF-terminated and latin-1 encoded.  Raises `ValueError` for a
    line break in a name or value, which would smuggle in a header."""
    lines = [first_line]
    for name, value in headers:
        if "\r" in name or "\n" in name or "\r" in value or "\n" in value:
            raise ValueError(f"line break in header field {name!r}")
        lines.append(f"{name}: {value}")
    lines.append("")
    lines.append("")
    return "\r\n".join(lines).encode("latin-1")


def _reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def error_response(status: int, message: str, headers: Iterable[tuple[str, str]] = ()) -> bytes:
    """A complete HTTP/1.1 response reporting ``message`` as plain text,
    with ``Connection: close`` (the caller closes after sending it) and any
    extra ``headers`` such as ``Proxy-Authenticate``."""
    body = (message + "\n").encode("utf-8")
    fields: Headers = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
        *headers,
    ]
    return encode_head(f"HTTP/1.1 {status} {_reason_phrase(status)}", fields) + body
