"""TLS contexts for the server and for MTop clients (pyOpenSSL).

The server context is TLS 1.3 only unless configured otherwise, carries the
certificate chain from ``server.crt``, and enforces ALPN: a client that offers
no ALPN is accepted, one that offers only other protocols fails the handshake
with a ``no_application_protocol`` alert (or, with a fallback web server
configured, is answered as that server would be and spliced to it).
"""

from __future__ import annotations

from typing import Callable

from OpenSSL import SSL

TLS_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}

#: TLS 1.3 cipher suites, most preferred first (the server's order wins).
#: OpenSSL's default puts AES-256-GCM-SHA384 first; AES-128-GCM-SHA256
#: first, as Go's crypto/tls (so the original) and the big CDNs choose it,
#: takes 2 % fewer instructions per resumed handshake (callgrind: SHA-256
#: in the key schedule instead of SHA-384) and 10 AES rounds per block
#: moved instead of 14.  Clients that only take the others still get them.
TLS13_CIPHERSUITES = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"


def _prefer_ciphersuites(ctx: SSL.Context) -> None:
    # pyOpenSSL 25.1 and later; older ones keep OpenSSL's order.
    setter = getattr(ctx, "set_tls13_ciphersuites", None)
    if setter is not None:
        setter(TLS13_CIPHERSUITES)


class TLSConfigError(ValueError):
    """A certificate, key or setting that OpenSSL refuses; the message names
    the file."""


class ALPNMismatch(SSL.Error):
    """The client offered ALPN protocols, none of them ours."""


#: What the fallback web server is offered as, in this order of preference.
FALLBACK_PROTOCOLS = (b"http/1.1", b"h2")
#: The connection app data marking a fallback choice (`mtop.server` reads it).
FALLBACK_ALPN = "fallback-alpn"


def _alpn_selector(proto: bytes, fallback: bool = False) -> Callable[[SSL.Connection, list[bytes]], bytes]:
    def select(connection: SSL.Connection, offered: list[bytes]) -> bytes:
        if proto in offered:
            return proto
        if fallback:
            # Answer like the web server we stand in front of would.
            connection.set_app_data(FALLBACK_ALPN)
            for candidate in FALLBACK_PROTOCOLS:
                if candidate in offered:
                    return candidate
            return SSL.NO_OVERLAPPING_PROTOCOLS
        raise ALPNMismatch(f"client offered ALPN {offered!r}, not {proto!r}")

    return select


def _openssl_reason(error: SSL.Error) -> str:
    try:
        return "; ".join(str(entry[2]) for entry in error.args[0]) or str(error)
    except (IndexError, TypeError):
        return str(error)


def server_context(crt: str, key: str, proto: str, min_version: str = "1.3", fallback: bool = False) -> SSL.Context:
    """A server context with the chain in ``crt`` (leaf first), the private
    key in ``key`` and ALPN ``proto``.  Raises `TLSConfigError` naming the
    file that is wrong.  With ``fallback``, a client offering other
    protocols gets ``http/1.1`` (or ``h2``, or no ALPN) instead of an
    alert, and is marked for the fallback web server."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(TLS_VERSIONS[min_version])
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_RENEGOTIATION)
    _prefer_ciphersuites(ctx)
    # Idle tunnels are the common case: give read/write buffers back to the
    # allocator between records.
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    try:
        ctx.use_certificate_chain_file(crt)
    except SSL.Error as e:
        raise TLSConfigError(f"server.crt: cannot load certificate chain from {crt}: {_openssl_reason(e)}") from None
    try:
        ctx.use_privatekey_file(key)
    except SSL.Error as e:
        raise TLSConfigError(f"server.key: cannot load private key from {key}: {_openssl_reason(e)}") from None
    try:
        ctx.check_privatekey()
    except SSL.Error:
        raise TLSConfigError(f"server.key: the key in {key} does not belong to the certificate in {crt}") from None
    ctx.set_alpn_select_callback(_alpn_selector(proto.encode("utf-8"), fallback))
    # Stateless TLS 1.3 session tickets let returning clients resume.
    ctx.set_session_id(b"mtop")
    return ctx


def client_context(
    ca: str | None = None,
    proto: str | None = "mtop",
    insecure: bool = False,
    min_version: str = "1.3",
) -> SSL.Context:
    """A client context trusting ``ca`` (a PEM file), or the system store
    when ``ca`` is empty.  Name checks happen after the handshake (see
    `mtop.tlstransport.verify_hostname`)."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(TLS_VERSIONS[min_version])
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
    _prefer_ciphersuites(ctx)
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    if insecure:
        ctx.set_verify(SSL.VERIFY_NONE)
    else:
        ctx.set_verify(SSL.VERIFY_PEER)
        if ca:
            try:
                ctx.load_verify_locations(ca)
            except SSL.Error as e:
                raise TLSConfigError(f"ca: cannot load CA certificates from {ca}: {_openssl_reason(e)}") from None
        else:
            ctx.set_default_verify_paths()
    if proto:
        ctx.set_alpn_protos([proto.encode("utf-8")])
    # Sessions are kept by the caller (one per server name, set on each new
    # connection), not by OpenSSL's cache: with the client cache on,
    # OpenSSL 3+ makes a TLS 1.3 session single-use (the first connection
    # that resumes it marks it not resumable), so every tunnel opened while
    # another was resuming did a full handshake (a third of them at 4 at a
    # time), and every ticket went into a cache nothing reads.
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    return ctx
