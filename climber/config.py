"""Loading and validating ``climber.yaml``.

The original's keys work unchanged::

    log:    {level}
    http:   {listen}
    socks5: {listen, timeout}
    servers:
      - {host: "example.com:443", type: tls, username, password, ca, proto, enabled}

Our own optional keys: ``strategy`` (random, round_robin, failover,
fastest), ``forward`` (port forwards), ``idle_timeout``,
``handshake_timeout``; per listener ``username``/``password`` (local proxy
auth) and ``timeout``; per server ``url``/``urls`` (``mtop://`` share links),
``sni``, ``insecure``, ``pipelining``, for ``type: tls`` servers
``prewarm``, ``prewarm_max_age`` and ``tcp_fast_open``, and for ``type:
quic`` servers ``max_streams`` and ``quic_packet_size``.

A listen address without a host (``":1080"``) means loopback here: climber
is a local proxy, and an open proxy on every interface would be anyone's.
Write ``0.0.0.0:1080`` or ``[::]:1080`` to listen everywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

from mtop.config import (
    load_quic,
    DEFAULT_QUIC_PACKET_SIZE,
    LOG_LEVELS,
    ConfigError,
    ListenAddress,
    LogConfig,
    MetricsConfig,
    Section,
    as_bool,
    as_non_negative_seconds,
    as_packet_size,
    as_seconds,
    as_string,
    as_ws_path,
    bare_port_error,
    choice,
    is_bare_port,
    load_metrics,
    parse_listen,
    path_in,
    read_yaml,
    require_readable,
)
from mtop.redact import shown
from mtop.urls import DEFAULT_PROTO, URLError, parse_url

STRATEGIES = ("random", "round_robin", "failover", "fastest")
SERVER_TYPES = ("tls", "quic", "wss")
SUPPORTED_TYPES = ("tls", "quic", "wss")
#: Seconds between a ``wss`` connection's pings (under CDNs' 100 s).
DEFAULT_PING_INTERVAL = 30.0
DEFAULT_MAX_STREAMS = 100
#: TLS connections kept ready per ``type: tls`` server unless configured
#: (`climber.prewarm`); the most that can be asked for.
DEFAULT_PREWARM = 2
MAX_PREWARM = 16
#: Age (from the start of its TCP connect) at which an unused prewarmed
#: connection is closed: under the server's ``handshake_timeout`` (10 s by
#: default, counted from accept) with room for the auth message to arrive.
DEFAULT_PREWARM_MAX_AGE = 7.0
DEFAULT_SOCKS5 = ListenAddress("127.0.0.1", 1080)
DEFAULT_HTTP = ListenAddress("127.0.0.1", 8080)
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class ServerEntry:
    """One MTop server climber may tunnel through."""

    host: str
    port: int
    username: str
    password: str = field(repr=False)
    type: str = "tls"
    ca: str = ""
    proto: str = DEFAULT_PROTO
    sni: str | None = None
    insecure: bool = False
    pipelining: bool = False
    enabled: bool = True
    #: QUIC: tunnels (streams) per connection before another one opens.
    max_streams: int = DEFAULT_MAX_STREAMS
    #: QUIC: largest UDP payload sent (no path MTU discovery).
    quic_packet_size: int = DEFAULT_QUIC_PACKET_SIZE
    #: TLS and wss: connections kept handshaken (and upgraded) for the
    #: next tunnels.  0 for an entry made in code; a config file's ``type:
    #: tls`` and ``wss`` entries get `DEFAULT_PREWARM` unless they say
    #: otherwise.
    prewarm: int = 0
    prewarm_max_age: float = DEFAULT_PREWARM_MAX_AGE
    #: TLS: TCP Fast Open (``TCP_FASTOPEN_CONNECT``) on connections to it.
    tcp_fast_open: bool = False
    #: QUIC: the library (``quic.backend``: auto, qh3 or aioquic).
    quic_backend: str = "auto"
    #: WebSocket (``wss``): the upgrade's path, its Host header (``None``:
    #: the TLS server name, with the port unless 443) and seconds between
    #: pings (0: none).
    path: str = "/"
    ws_host: str | None = None
    ping_interval: float = DEFAULT_PING_INTERVAL

    @property
    def host_header(self) -> str:
        if self.ws_host:
            return self.ws_host
        name = self.sni or self.host
        name = f"[{name}]" if ":" in name else name
        return name if self.port == 443 else f"{name}:{self.port}"

    @property
    def name(self) -> str:
        """``host:port``, as shown in logs."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ProxyListener:
    """A local SOCKS5 or HTTP proxy listener."""

    listen: ListenAddress
    timeout: float = 10.0
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def auth_required(self) -> bool:
        return self.username is not None


@dataclass(frozen=True)
class Forward:
    """A port forward: every connection to ``listen`` is tunnelled to
    ``host:port``."""

    listen: ListenAddress
    host: str
    port: int
    timeout: float = 10.0


@dataclass(frozen=True)
class ClimberConfig:
    servers: tuple[ServerEntry, ...] = ()
    strategy: str = "random"
    socks5: ProxyListener | None = None
    http: ProxyListener | None = None
    forwards: tuple[Forward, ...] = ()
    log: LogConfig = LogConfig()
    idle_timeout: float = 300.0
    handshake_timeout: float = 30.0
    metrics: MetricsConfig = MetricsConfig()
    path: str | None = None
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def usable_servers(self) -> tuple[ServerEntry, ...]:
        """Enabled servers of a type this version speaks."""
        return tuple(s for s in self.servers if s.enabled and s.type in SUPPORTED_TYPES)


def _local_listen(key: str, value: Any) -> ListenAddress:
    if is_bare_port(value):
        # ':port' is loopback here, so the two meanings are spelled otherwise.
        raise bare_port_error(key, value, "0.0.0.0:{}", "127.0.0.1:{}")
    address = parse_listen(value, key)
    if address.host is None:
        return ListenAddress(LOOPBACK, address.port)
    return address


def parse_hostport(key: str, value: Any, default_port: int | None) -> tuple[str, int]:
    """``host:port``, ``[v6]:port``, or a bare host when ``default_port`` is
    given.  Returns the host without brackets."""
    text = as_string(key, value).strip()
    if not text:
        raise ConfigError(f"{key}: must not be empty; use 'host:port'")
    if text.startswith("[") and text.endswith("]") or (":" not in text and default_port is not None):
        host, port = text.strip("[]"), default_port
    else:
        address = parse_listen(text, key)
        if address.host is None:
            raise ConfigError(f"{key}: {value!r} has no host; use 'host:port'")
        host, port = address.host, address.port
    if port is None:
        raise ConfigError(f"{key}: {value!r} has no port; use 'host:port'")
    if not host or not 0 < port <= 0xFFFF:
        raise ConfigError(f"{key}: {value!r} is not a host and a port from 1 to 65535")
    return host, port


def _listener(section: Section, default: ListenAddress, warnings: list[str]) -> ProxyListener:
    listen = section.get("listen", default, _local_listen)
    username = section.get("username", None, as_string)
    password = section.get("password", None, as_string)
    if (username is None) != (password is None):
        raise ConfigError(f"{section.name}: set both username and password for local proxy auth, or neither")
    if username is not None and not 0 < len(username.encode()) <= 255:
        raise ConfigError(f"{section.name}.username: must be 1 to 255 bytes long")
    if password is not None and not 0 < len(password.encode()) <= 255:
        raise ConfigError(f"{section.name}.password: must be 1 to 255 bytes long")
    listener = ProxyListener(
        listen=listen,
        timeout=section.get("timeout", 10.0, as_seconds),
        username=username,
        password=password,
    )
    if username is None and listen.host not in ("127.0.0.1", "::1", "localhost") and not listen.host.startswith("127."):
        warnings.append(
            f"{section.name}.listen {listen} is reachable from other machines and has no username/password: "
            "anyone who can reach it can use your tunnels"
        )
    section.finish()
    return listener


def _server_entries(section: Section, base: str) -> list[ServerEntry]:
    """One ``servers:`` item: a plain entry, or ``url``/``urls`` share links
    whose other keys apply to every link."""
    urls: list[Any] = []
    url = section.get("url", None, lambda k, v: v)
    if url is not None:
        urls.append((section.key("url"), url))
    many = section.get("urls", None, lambda k, v: v)
    if many is not None:
        if not isinstance(many, list):
            raise ConfigError(f"{section.key('urls')}: expected a list of mtop:// links")
        urls.extend((f"{section.key('urls')}[{i}]", u) for i, u in enumerate(many))

    enabled = section.get("enabled", True, as_bool)
    ca = section.get("ca", "", as_string)
    if ca:
        ca = path_in(base)(section.key("ca"), ca)
    sni = section.get("sni", None, as_string) or None
    insecure = section.get("insecure", False, as_bool)
    pipelining = section.get("pipelining", False, as_bool)
    if ca and not insecure:
        require_readable(section.key("ca"), ca)
    max_streams = section.get("max_streams", DEFAULT_MAX_STREAMS, _stream_count)
    packet_size = section.get("quic_packet_size", DEFAULT_QUIC_PACKET_SIZE, as_packet_size)
    ws_path = section.get("path", None, as_ws_path)
    ws_host = section.get("ws_host", None, as_string) or None
    ping_interval = section.get("ping_interval", DEFAULT_PING_INTERVAL, as_non_negative_seconds)
    tcp_settings = _TCPSettings(
        section,
        section.get("prewarm", None, _prewarm_count),
        section.get("prewarm_max_age", DEFAULT_PREWARM_MAX_AGE, as_seconds),
        section.get("tcp_fast_open", False, as_bool),
    )

    entries: list[ServerEntry] = []
    if urls:
        for key in ("host", "username", "password"):
            if key in section.data:
                raise ConfigError(f"{section.key(key)}: give either url/urls or host/username/password, not both")
        for key, text in urls:
            try:
                link = parse_url(as_string(key, text))
            except URLError as e:
                raise ConfigError(f"{key}: {e}") from None
            proto = section.get("proto", link.proto, as_string)
            server_type = section.get("type", link.type, choice(SERVER_TYPES))
            entry = ServerEntry(
                link.host, link.port, link.username, link.password, server_type, ca, proto, sni or link.sni, insecure,
                pipelining, enabled, max_streams, packet_size,
                path=ws_path or link.path, ws_host=ws_host or link.ws_host, ping_interval=ping_interval,
            )
            entries.append(tcp_settings.apply(entry))
    else:
        if section.data.get("host") is None:  # absent, or "host:" with no value
            raise ConfigError(f"{section.name}: a server needs host (with username and password) or url")
        host, port = section.get("host", None, lambda k, v: parse_hostport(k, v, 443))
        username = section.get("username", "", as_string)
        password = section.get("password", "", as_string)
        if not username or len(username.encode()) > 255:
            raise ConfigError(f"{section.key('username')}: must be 1 to 255 bytes long")
        if len(password.encode()) > 255:
            raise ConfigError(f"{section.key('password')}: must be at most 255 bytes long")
        entry = ServerEntry(
            host,
            port,
            username,
            password,
            section.get("type", "tls", choice(SERVER_TYPES)),
            ca,
            section.get("proto", DEFAULT_PROTO, as_string),
            sni,
            insecure,
            pipelining,
            enabled,
            max_streams,
            packet_size,
            path=ws_path or "/",
            ws_host=ws_host,
            ping_interval=ping_interval,
        )
        entries.append(tcp_settings.apply(entry))
    for entry in entries:
        if not entry.proto or len(entry.proto.encode()) > 255:
            raise ConfigError(f"{section.key('proto')}: {entry.proto!r} must be 1 to 255 bytes long")
        if entry.type != "wss" and (ws_path is not None or ws_host is not None):
            key = section.key("path" if ws_path is not None else "ws_host")
            raise ConfigError(f"{key}: server {entry.name} is {entry.type}; only type: wss servers have one")
    section.finish()
    return entries


@dataclass(frozen=True)
class _TCPSettings:
    """A ``servers:`` item's keys for TLS over TCP: ``prewarm`` (None when
    not given), ``prewarm_max_age``, ``tcp_fast_open``."""

    section: Section
    prewarm: int | None
    prewarm_max_age: float
    tcp_fast_open: bool

    def apply(self, entry: ServerEntry) -> ServerEntry:
        """``entry`` with these settings (``tls`` and ``wss`` servers: a
        prewarmed ``wss`` connection is through TLS and the WebSocket
        upgrade).  A QUIC server's tunnels are streams of one shared
        connection: asking it for prewarmed connections or TCP Fast Open is
        a config error (a warning would leave the reader believing it
        works)."""
        if entry.type != "quic":
            prewarm = DEFAULT_PREWARM if self.prewarm is None else self.prewarm
            return replace(entry, prewarm=prewarm, prewarm_max_age=self.prewarm_max_age, tcp_fast_open=self.tcp_fast_open)
        if self.prewarm:
            raise ConfigError(
                f"{self.section.key('prewarm')}: server {entry.name} is QUIC, whose tunnels share one connection; "
                "prewarm is for type: tls servers (set 0 or leave it out)"
            )
        if self.tcp_fast_open:
            raise ConfigError(
                f"{self.section.key('tcp_fast_open')}: server {entry.name} is QUIC (UDP); "
                "TCP Fast Open is for type: tls servers (set false or leave it out)"
            )
        return entry


def _prewarm_count(key: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_PREWARM:
        return value
    raise ConfigError(f"{key}: {shown(value)} is not a number of connections from 0 (off) to {MAX_PREWARM}")


def _stream_count(key: str, value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 10000:
        return value
    raise ConfigError(f"{key}: {shown(value)} is not a number of streams from 1 to 10000")


def _forward(section: Section, default_timeout: float) -> Forward:
    if section.data.get("listen") is None or section.data.get("target") is None:
        raise ConfigError(f"{section.name}: a forward needs listen and target, e.g. listen: '127.0.0.1:2222', target: 'host:22'")
    listen = section.get("listen", None, _local_listen)
    host, port = section.get("target", None, lambda k, v: parse_hostport(k, v, None))
    forward = Forward(listen, host, port, section.get("timeout", default_timeout, as_seconds))
    section.finish()
    return forward


def _list(key: str, value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
    return value


def load_climber_data(data: Any, path: str | None = None) -> ClimberConfig:
    """Validate an already-parsed ``climber.yaml`` document."""
    base = os.path.dirname(os.path.abspath(path)) if path else os.getcwd()
    warnings: list[str] = []
    top = Section("", data, warnings)
    top.known("socks5", "http")

    log_section = Section("log", top.get("log", {}, lambda k, v: v), warnings)
    level = log_section.get("level", "info", choice(tuple(LOG_LEVELS)))
    log_format = log_section.get("format", "text", choice(("text", "json")))
    log_section.finish()

    servers: list[ServerEntry] = []
    for i, item in enumerate(top.get("servers", [], _list)):
        servers.extend(_server_entries(Section(f"servers[{i}]", item, warnings), base))
    quic = load_quic(Section("quic", top.get("quic", {}, lambda k, v: v), warnings), server=False)
    servers = [replace(entry, quic_backend=quic.backend) for entry in servers]

    socks5 = http = None
    if "socks5" in top.data:
        socks5 = _listener(Section("socks5", top.get("socks5", {}, lambda k, v: v), warnings), DEFAULT_SOCKS5, warnings)
    if "http" in top.data:
        http = _listener(Section("http", top.get("http", {}, lambda k, v: v), warnings), DEFAULT_HTTP, warnings)
    default_timeout = socks5.timeout if socks5 else 10.0
    forwards = tuple(
        _forward(Section(f"forward[{i}]", item, warnings), default_timeout)
        for i, item in enumerate(top.get("forward", [], _list))
    )

    config = ClimberConfig(
        servers=tuple(servers),
        strategy=top.get("strategy", "random", choice(STRATEGIES)),
        socks5=socks5,
        http=http,
        forwards=forwards,
        log=LogConfig(level=LOG_LEVELS[level], format=log_format),
        idle_timeout=top.get("idle_timeout", 300.0, as_non_negative_seconds),
        handshake_timeout=top.get("handshake_timeout", 30.0, as_seconds),
        metrics=load_metrics(Section("metrics", top.get("metrics", {}, lambda k, v: v), warnings)),
        path=path,
    )
    top.finish()

    if not config.usable_servers:
        raise ConfigError("servers: no enabled server; add one (host, username, password) or a url: mtop://...")
    if not (config.socks5 or config.http or config.forwards):
        raise ConfigError("nothing to listen on: configure socks5, http or forward")
    listens = [(name, listener.listen) for name, listener in (("socks5", socks5), ("http", http)) if listener]
    listens += [(f"forward[{i}]", f.listen) for i, f in enumerate(forwards)]
    seen: dict[ListenAddress, str] = {}
    for name, address in listens:
        if address.port and address in seen:
            raise ConfigError(f"{name}.listen {address} is already used by {seen[address]}")
        seen[address] = name
    return replace(config, warnings=tuple(warnings))


def load_climber_config(path: str) -> ClimberConfig:
    """Read and validate ``path``."""
    return load_climber_data(read_yaml(path), path)


__all__ = [
    "ClimberConfig",
    "ConfigError",
    "Forward",
    "ProxyListener",
    "ServerEntry",
    "STRATEGIES",
    "load_climber_config",
    "load_climber_data",
    "parse_hostport",
]
