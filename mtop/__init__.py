"""MTop: an authenticated tunnel proxy (protocol v1 over TLS 1.3 or QUIC)."""

__version__ = "0.1.0"
