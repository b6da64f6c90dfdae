"""The local HTTP proxy: CONNECT, and plain ``http://`` requests.

CONNECT opens a tunnel and splices it like SOCKS5 does.

A plain request (``GET http://host/path HTTP/1.1``) gets one tunnel to
``host:port``; climber sends the request in origin form with hop-by-hop
headers removed and ``Connection: close``, streams the body (by
``Content-Length`` or chunked, unchanged), and streams the response back.
The response's end is found from its own framing (length, chunked, or the
origin closing), never by a size limit, so bodies of any size pass intact
with memory bounded by flow control in both directions.  The client
connection stays open for its next request (to any host) when both sides
allow it.

Errors are HTTP responses: 400 for a bad request, 407 when local auth is on
and missing, 502 when no tunnel can be opened or the origin misbehaves,
504 when opening the tunnel times out.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from typing import Any

from twisted.python.failure import Failure

from climber import http_codec as http
from climber.frontend import Climber, LocalConnection
from climber.tunnel import ServerTunnel, TunnelError
from mtop.relay import IdleWatch

STATUS_FOR_ERROR = {"timeout": 504}
CONNECT_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
#: A client that goes on sending while its previous request is answered is
#: paused; this caps what one read can add to the buffer.
MAX_PIPELINED = 2 * http.MAX_HEAD


class HTTPProxyConnection(LocalConnection):
    """One HTTP proxy client connection, possibly many requests."""

    kind = "http"

    def __init__(self, climber: Climber, timeout: float, username: str | None = None, password: str | None = None):
        super().__init__(climber, timeout)
        self._expected_auth = (
            b"basic " + base64.b64encode(f"{username}:{password}".encode()) if username is not None else None
        )
        self._buffer = b""
        self._request: http.RequestHead | None = None
        self._request_body: Any = None
        self._origin_head: bytes = b""
        self._response_buffer = b""
        self._response_body: Any = None
        self._response_started = False
        self._keep_alive = False
        self._tunnel: ServerTunnel | None = None
        self._idle: IdleWatch | None = None
        self._up = 0
        self._down = 0

    # Request heads

    def handshake_data(self, data: bytes) -> None:
        self._buffer += data
        try:
            parsed = http.parse_request_head(self._buffer)
        except http.HTTPError as e:
            self.detail = e.message
            self.close_after(http.error_response(e.status, e.message))
            return
        if parsed is None:
            return
        head, used = parsed
        rest, self._buffer = self._buffer[used:], b""
        if not self._authorised(head):
            self.detail = "local proxy authentication required"
            self.close_after(
                http.error_response(
                    407, "Proxy authentication required", [("Proxy-Authenticate", 'Basic realm="climber"')]
                )
            )
            return
        try:
            if head.method == "CONNECT":
                host, port = http.parse_authority(head.target, None)
                self.open_tunnel(host, port, rest)
                return
            self._start_request(head, rest)
        except http.HTTPError as e:
            self.detail = e.message
            self.close_after(http.error_response(e.status, e.message))

    def _authorised(self, head: http.RequestHead) -> bool:
        if self._expected_auth is None:
            return True
        offered = head.get("Proxy-Authorization")
        if offered is None:
            return False
        scheme, _, token = offered.strip().partition(" ")
        try:
            normalised = scheme.lower().encode("latin-1") + b" " + base64.b64encode(base64.b64decode(token.strip(), validate=True))
        except (binascii.Error, UnicodeEncodeError, ValueError):
            return False
        return hmac.compare_digest(normalised, self._expected_auth)

    def _start_request(self, head: http.RequestHead, rest: bytes) -> None:
        scheme, host, port, path = http.split_absolute_uri(head.target)
        body = http.request_body(head)
        headers = http.strip_hop_by_hop(head.headers, keep=("transfer-encoding",))
        if isinstance(body, http.ChunkedBody):
            headers = [(n, v) for n, v in headers if n.lower() != "content-length"]
        authority = host if port == 80 else f"{host}:{port}"
        if ":" in host:
            authority = f"[{host}]" if port == 80 else f"[{host}]:{port}"
        headers = [(n, v) for n, v in headers if n.lower() != "host"]
        headers.insert(0, ("Host", authority))
        headers.append(("Connection", "close"))
        self._request = head
        self._request_body = body
        self._keep_alive = http.wants_keep_alive(head)
        self._origin_head = http.encode_head(f"{head.method} {path} {head.version}", headers)
        self._up = self._down = 0
        self._response_buffer = b""
        self._response_body = None
        self._response_started = False
        self.open_tunnel(host, port, rest)

    # Tunnel open

    def tunnel_ready(self, tunnel: ServerTunnel) -> None:
        if self._request is None:  # CONNECT
            self.reply(CONNECT_ESTABLISHED)
            self.splice_tunnel(tunnel)
            return
        self.state = "forwarding"
        self._tunnel = tunnel
        tunnel.attach(self._origin_data, self._origin_eof, self._origin_lost)
        self._send_up(self._origin_head)
        if self.climber.idle_timeout > 0:
            self._idle = IdleWatch(self.climber.clock, self.climber.idle_timeout, lambda: self._up + self._down, self._idle_expired)
        early, self._early = self._early, b""
        # The response may be slow to read: the origin waits for the client.
        self.transport.registerProducer(tunnel.transport, True)
        if not self._request_body.done:
            tunnel.transport.registerProducer(self.transport, True)
        self._client_bytes(early)
        if self.state == "forwarding" and not self._request_body.done:
            if self._client_eof:
                self._abandon("client-closed", "the client closed before sending the whole request body")
            else:
                self.transport.resumeProducing()

    def tunnel_failed(self, error: TunnelError) -> None:
        status = STATUS_FOR_ERROR.get(error.kind, 502)
        self.close_after(http.error_response(status, f"climber: {error.message}"))

    # Request body, client to origin

    def dataReceived(self, data: bytes) -> None:
        if self.state == "forwarding":
            self._client_bytes(data)
        else:
            super().dataReceived(data)

    def _client_bytes(self, data: bytes) -> None:
        if not data:
            return
        body = self._request_body
        if not body.done:
            try:
                used = body.feed(data)
            except http.HTTPError as e:
                self._abandon("client-error", e.message)
                return
            if used:
                self._send_up(data if used == len(data) else data[:used])
            data = data[used:]
            if body.done:
                # The next request waits until this response is complete.
                self._tunnel.transport.unregisterProducer()
                self.transport.pauseProducing()
        if data:
            self._buffer += data
            if len(self._buffer) > MAX_PIPELINED:
                self._abandon("client-error", "too much pipelined data")

    def _send_up(self, data: bytes) -> None:
        self._up += len(data)
        self._tunnel.transport.write(data)

    def readConnectionLost(self) -> None:
        if self.state != "forwarding":
            super().readConnectionLost()
            return
        self._client_eof = True
        if not self._request_body.done:
            self._abandon("client-closed", "the client closed before sending the whole request body")

    def connectionLost(self, reason: Failure = None) -> None:
        if self.state == "forwarding":
            self.outcome = self.outcome or "client-closed"
            self._close_tunnel(abort=True)
            self.state = "closed"
            self.finish(self._up, self._down)
        super().connectionLost(reason)

    # Response, origin to client

    def _origin_data(self, data: bytes) -> None:
        if self.state != "forwarding":
            return
        if self._response_body is None:
            self._response_buffer += data
            if not self._response_head():
                return
            data, self._response_buffer = self._response_buffer, b""
        if not data:
            return
        try:
            used = self._response_body.feed(data)
        except http.HTTPError as e:
            self._abandon("origin-error", e.message)
            return
        if used:
            self._send_down(data if used == len(data) else data[:used])
        if self._response_body.done:
            self._response_complete()

    def _response_head(self) -> bool:
        """Parse response heads (1xx ones are passed on) until the final
        one; True once it has been sent and its body framer is set."""
        while True:
            try:
                parsed = http.parse_response_head(self._response_buffer)
            except http.HTTPError as e:
                self._abandon("origin-error", e.message)
                return False
            if parsed is None:
                return False
            head, used = parsed
            self._response_buffer = self._response_buffer[used:]
            headers = http.strip_hop_by_hop(head.headers, keep=("transfer-encoding",))
            if 100 <= head.status < 200 and head.status != 101:
                self._send_down(http.encode_head(f"HTTP/1.1 {head.status} {head.reason}".rstrip(), headers))
                continue
            try:
                body = http.response_body(head, self._request.method)
            except http.HTTPError as e:
                self._abandon("origin-error", e.message)
                return False
            if isinstance(body, http.UntilClose) or self._client_eof:
                self._keep_alive = False
            if not self._keep_alive:
                headers.append(("Connection", "close"))
            elif self._request.version == "HTTP/1.0":
                headers.append(("Connection", "keep-alive"))
            self._response_body = body
            self._send_down(http.encode_head(f"HTTP/1.1 {head.status} {head.reason}".rstrip(), headers))
            if body.done:
                self._response_complete()
                return False
            return True

    def _send_down(self, data: bytes) -> None:
        self._response_started = True
        self._down += len(data)
        self.transport.write(data)

    def _origin_eof(self) -> None:
        if self.state != "forwarding":
            return
        if isinstance(self._response_body, http.UntilClose):
            self._response_complete()
        elif self._response_body is None:
            self._abandon("origin-error", "the origin closed without a response")
        else:
            self._abandon("origin-error", "the origin closed before the end of the response")

    def _origin_lost(self) -> None:
        self._origin_eof()

    def _response_complete(self) -> None:
        """The response is complete: next request, or close."""
        self._close_tunnel(abort=False)
        self.outcome = "done"
        self.finish(self._up, self._down)
        uploading = not self._request_body.done
        keep = self._keep_alive and not uploading and not self._client_eof
        self._request = None
        self._request_body = None
        self._response_body = None
        if not keep:
            self._close(uploading)
            return
        # Ready for the next request on this connection.
        self.state = "handshake"
        self.target = self.server = self.outcome = self.detail = None
        self._reported = False
        self.started = self.climber.clock.seconds()
        self.start_deadline(self.climber.handshake_timeout, self._handshake_expired)
        self.transport.resumeProducing()
        if self._buffer:
            pending, self._buffer = self._buffer, b""
            self.handshake_data(pending)

    def _idle_expired(self) -> None:
        self._idle = None
        self._abandon("idle-timeout", f"no data either way for {self.climber.idle_timeout:g}s", 504)

    def _abandon(self, outcome: str, detail: str, status: int = 502) -> None:
        """The exchange cannot complete: a 502 if nothing was sent yet,
        otherwise the client connection is closed after what was received,
        which its framing (length or chunked) shows to be truncated."""
        if self.state != "forwarding":
            return
        self.outcome, self.detail = outcome, detail
        self._close_tunnel(abort=True)
        self.finish(self._up, self._down)
        if self._response_started:
            self._close(self._request_body is not None and not self._request_body.done)
        else:
            self.close_after(http.error_response(status, f"climber: {detail}"))

    def _close(self, uploading: bool) -> None:
        """Close after what was sent; while the application is still
        sending its request body (an early response), with a lingering
        close (`close_after`), or the reset its unread upload causes could
        destroy the response before it is read."""
        if uploading:
            self.close_after(b"")
        else:
            self.state = "closed"
            self.transport.loseConnection()

    def _close_tunnel(self, abort: bool) -> None:
        if self._idle is not None:
            self._idle.stop()
            self._idle = None
        tunnel, self._tunnel = self._tunnel, None
        if tunnel is None:
            return
        self.transport.unregisterProducer()
        tunnel.transport.unregisterProducer()
        tunnel.attach(_ignore, _ignore, _ignore)
        if abort:
            tunnel.transport.abortConnection()
        else:
            tunnel.transport.loseConnection()


def _ignore(*args: Any) -> None:
    pass
