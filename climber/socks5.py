"""The local SOCKS5 proxy (RFC 1928), with optional username/password
authentication (RFC 1929).

Only CONNECT is offered; BIND and UDP ASSOCIATE get "command not
supported".  Tunnel failures map to reply codes:

=============================================  ===========================
why                                            reply
=============================================  ===========================
server replied "authentication failure" (02)   0x02 not allowed by ruleset
server replied "connection failure" (03)       0x04 host unreachable
server closed without a reply (original)       0x05 connection refused
no server reachable                            0x03 network unreachable
no answer in ``socks5.timeout``                0x06 TTL expired
anything else                                  0x01 general failure
=============================================  ===========================

Malformed input is a clean close (or, once the request stage is reached,
the matching reply and a close), never an exception.
"""

from __future__ import annotations

import hmac

from climber import socks5_codec as codec
from climber.frontend import Climber, LocalConnection
from climber.tunnel import ServerTunnel, TunnelError

REPLY_FOR_ERROR = {
    "auth": codec.REP_NOT_ALLOWED,
    "target": codec.REP_HOST_UNREACHABLE,
    "refused": codec.REP_CONNECTION_REFUSED,
    "unreachable": codec.REP_NETWORK_UNREACHABLE,
    "timeout": codec.REP_TTL_EXPIRED,
    "protocol": codec.REP_GENERAL_FAILURE,
}


class Socks5Connection(LocalConnection):
    """One SOCKS5 client: greeting, optional auth, request, then relay."""

    kind = "socks5"

    def __init__(self, climber: Climber, timeout: float, username: str | None = None, password: str | None = None):
        super().__init__(climber, timeout)
        self._credentials = (username, password) if username is not None else None
        self._stage = "greeting"
        self._buffer = b""

    def handshake_data(self, data: bytes) -> None:
        self._buffer += data
        try:
            while self.state == "handshake" and self._buffer:
                if not self._step():
                    return
        except codec.SocksError as e:
            self.detail = str(e)
            self.close_after(codec.encode_reply(e.reply) if e.reply is not None and self._stage == "request" else b"")

    def _step(self) -> bool:
        """Handle one message if it is complete; False when more is needed."""
        if self._stage == "greeting":
            parsed = codec.parse_greeting(self._buffer)
            if parsed is None:
                return False
            methods, used = parsed
            self._buffer = self._buffer[used:]
            wanted = codec.METHOD_USERPASS if self._credentials else codec.METHOD_NO_AUTH
            if wanted not in methods:
                self.close_after(codec.encode_method_choice(codec.METHOD_NONE_ACCEPTABLE))
                return False
            self.reply(codec.encode_method_choice(wanted))
            self._stage = "auth" if self._credentials else "request"
            return True
        if self._stage == "auth":
            parsed = codec.parse_userpass(self._buffer)
            if parsed is None:
                return False
            username, password, used = parsed
            self._buffer = self._buffer[used:]
            expected_user, expected_password = self._credentials
            # Both comparisons always run: timing says nothing about which failed.
            user_ok = hmac.compare_digest(username.encode(), expected_user.encode())
            password_ok = hmac.compare_digest(password.encode(), expected_password.encode())
            if not (user_ok and password_ok):
                self.detail = "local SOCKS5 authentication failed"
                self.close_after(codec.encode_userpass_status(False))
                return False
            self.reply(codec.encode_userpass_status(True))
            self._stage = "request"
            return True
        parsed = codec.parse_request(self._buffer)
        if parsed is None:
            return False
        request, used = parsed
        early, self._buffer = self._buffer[used:], b""
        self.open_tunnel(request.host, request.port, early)
        return False

    def tunnel_ready(self, tunnel: ServerTunnel) -> None:
        self.reply(codec.encode_reply(codec.REP_SUCCEEDED))
        self.splice_tunnel(tunnel)

    def tunnel_failed(self, error: TunnelError) -> None:
        self.close_after(codec.encode_reply(REPLY_FOR_ERROR.get(error.kind, codec.REP_GENERAL_FAILURE)))
