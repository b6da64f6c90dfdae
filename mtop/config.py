"""Loading and validating ``mtop.yaml``.

Keys are the original implementation's (``server: {type, listen, crt, key,
proto}``, ``log: {level, format}``, ``db: {driverName, dsn}``) plus our own
optional ones.  Every problem becomes a `ConfigError` whose message names the
key, the value and what is allowed; unknown keys become warnings, so an
original file keeps working while typos are still pointed out.

Relative paths (certificates, the SQLite database) are taken relative to the
directory of the config file, so a config works whatever the working
directory of the process is.
"""

from __future__ import annotations

import ipaddress
import os
import shlex
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import yaml

from mtop.acl import ACLError, DestinationACL, parse_network, parse_port_range
from mtop.clientlist import ClientListError, is_file_entry, load_client_lists, read_entry, resolve_entries
from mtop.limits import ThrottleSettings
from mtop.redact import redact, shown


class ConfigError(ValueError):
    """A configuration that cannot be used; the message is one sentence
    (with any password in it masked: it is printed and logged)."""

    def __init__(self, message: str) -> None:
        super().__init__(redact(message))


@dataclass(frozen=True)
class ListenAddress:
    """Where to listen.  ``host`` is ``None`` for all interfaces (IPv4 and
    IPv6)."""

    host: str | None
    port: int

    def __str__(self) -> str:
        if self.host is None:
            return f":{self.port}"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


#: QUIC's UDP payload size unless configured: fits every usual path
#: (1500-byte Ethernet minus IPv6, UDP and tunnel overheads).
DEFAULT_QUIC_PACKET_SIZE = 1350


@dataclass(frozen=True)
class ServerConfig:
    """The ``server:`` section as loaded (what the tunnels take from it at
    run time is `mtop.server.TunnelSettings`)."""

    type: str = "tls"
    listen: ListenAddress = ListenAddress(None, 443)
    crt: str = ""
    key: str = ""
    proto: str = "mtop"
    tls_min_version: str = "1.3"
    reply_errors: bool = False
    handshake_timeout: float = 10.0
    connect_timeout: float = 10.0
    idle_timeout: float = 300.0
    #: Largest UDP payload QUIC listeners send (no path MTU discovery).
    quic_packet_size: int = DEFAULT_QUIC_PACKET_SIZE
    #: Failed logins are answered this long after the auth message at the
    #: earliest (so every reason for failing takes the same time).
    auth_failure_delay: float = 0.5
    #: ``(host, port)`` of a web server that non-MTop TLS clients are
    #: spliced to, or ``None`` (they are closed, as the original does).
    fallback: tuple[str, int] | None = None
    #: TLS listeners expect a PROXY protocol header (v1 or v2) first.
    proxy_protocol: bool = False
    #: Server processes sharing the ports (0: one per CPU).
    workers: int = 1
    #: How the kernel spreads new connections over the workers:
    #: ``address`` (all of one client address's to one worker) or
    #: ``connection`` (each by its address pair).
    worker_affinity: str = "address"
    #: TCP Fast Open queue length of the TLS listening sockets (0: off).
    tcp_fast_open: int = 0
    #: On SIGTERM, open tunnels get this long to finish before they are
    #: closed (0: closed at once).
    drain_timeout: float = 30.0
    #: Every tunnel goes to this ``(host, port)`` (see `ListenerConfig`).
    destination: tuple[str, int] | None = None
    #: WebSocket listeners: the upgrade's path, trusted proxies (``None``:
    #: loopback for ``ws``, none for ``wss``) and seconds between pings.
    path: str = "/"
    trusted_proxies: tuple | None = None
    ws_ping_interval: float = 30.0


@dataclass(frozen=True)
class ListenerConfig:
    """One listener of ``listeners:`` (or the one ``server:`` describes):
    a transport on an address, with its certificate and ALPN."""

    type: str
    listen: ListenAddress
    crt: str
    key: str
    proto: str
    proxy_protocol: bool = False
    #: TCP Fast Open queue length of its listening socket (TLS; 0: off).
    tcp_fast_open: int = 0
    #: ``(host, port)`` every tunnel on it goes to, whatever target the
    #: client names (mos-tls-tunnel's ``-d``), or ``None``.
    destination: tuple[str, int] | None = None
    #: WebSocket (``ws``, ``wss``): the request path of the upgrade.
    path: str = "/"
    #: WebSocket: proxies whose ``Forwarded``/``X-Forwarded-For`` name the
    #: client (IP networks).
    trusted_proxies: tuple = ()

    @property
    def on_tcp(self) -> bool:
        return self.type in TCP_TYPES


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"
    format: str = "text"


@dataclass(frozen=True)
class DBConfig:
    """``driverName`` is normalised to ``sqlite``, ``postgres`` or ``mysql``;
    ``dsn`` is an absolute path for SQLite."""

    driverName: str = "sqlite"
    #: Not in repr: a PostgreSQL or MySQL DSN may hold the password.
    dsn: str = field(default="mtop.db", repr=False)
    cache_ttl: float = 5.0
    query_timeout: float = 5.0
    recheck_interval: float = 5.0
    flush_interval: float = 5.0
    #: How often the server publishes the users it carries (``mtop_presence``;
    #: 0: never, each server enforces max_connections and rate_limit alone).
    presence_interval: float = 1.0
    outage_grace: float = 600.0
    #: Days of traffic history kept (``mtop_usage_history``, for the admin
    #: panel's charts); 0: none written.
    history_days: int = 30


@dataclass(frozen=True)
class QuicConfig:
    """``quic:``: the QUIC library (``backend``: auto, qh3 or aioquic; both
    configs) and, for the server, the concurrent tunnels (streams) a client
    may open on one QUIC connection."""

    backend: str = "auto"
    max_streams: int = 512


@dataclass(frozen=True)
class LimitsConfig:
    """``limits:``; ``max_tunnels`` ``None`` means derived from the open
    files limit at start, 0 means no limit."""

    max_tunnels: int | None = None
    max_handshakes: int = 1024
    max_per_client: int = 512
    max_handshakes_per_client: int = 64


@dataclass(frozen=True)
class MetricsConfig:
    """``metrics:``: where to serve Prometheus metrics (``None``: nowhere)."""

    listen: ListenAddress | None = None
    per_user: bool = False


@dataclass(frozen=True)
class HealthConfig:
    """``health:``: where to serve the readiness check (``/health``) on its
    own listener (``None``: only on the metrics listener, if any)."""

    listen: ListenAddress | None = None


@dataclass(frozen=True)
class AdminConfig:
    """``admin:``: where to serve the admin API (``None``: nowhere), and
    its TLS certificate (``tls``: the server's, or ``crt``/``key`` of its
    own; without TLS only on a loopback address)."""

    listen: ListenAddress | None = None
    tls: bool = False
    crt: str = ""
    key: str = ""
    #: The servers' public name, for share links (``None``: the request's).
    public_host: str | None = None


@dataclass(frozen=True)
class ClientsConfig:
    """``clients:``: client address allow and block lists, as written
    (networks, addresses, list file paths; relative paths made absolute).
    `mtop.clientlist.ClientLists.from_config` builds the lists."""

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    #: The `ClientLists` built while loading (list files read), or
    #: ``None`` when the files were not read (mtopctl).
    lists: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Config:
    server: ServerConfig = ServerConfig()
    log: LogConfig = LogConfig()
    db: DBConfig = DBConfig()
    acl: DestinationACL = DestinationACL()
    clients: ClientsConfig = ClientsConfig()
    limits: LimitsConfig = LimitsConfig()
    auth_throttle: ThrottleSettings = ThrottleSettings()
    metrics: MetricsConfig = MetricsConfig()
    health: HealthConfig = HealthConfig()
    quic: QuicConfig = QuicConfig()
    admin: AdminConfig = AdminConfig()
    #: What to listen on: ``listeners:`` if given, else the ``server:`` block.
    listeners: tuple[ListenerConfig, ...] = ()
    path: str | None = None
    warnings: tuple[str, ...] = field(default=(), compare=False)


LOG_LEVELS = {
    "trace": "debug",
    "debug": "debug",
    "info": "info",
    "warn": "warn",
    "warning": "warn",
    "error": "error",
    "fatal": "critical",
    "panic": "critical",
    "critical": "critical",
}
LOG_FORMATS = ("text", "json")
#: driverName values (the original's and common spellings) -> our driver.
DRIVER_NAMES = {
    "sqlite": "sqlite",
    "sqlite3": "sqlite",
    "psql": "postgres",
    "postgres": "postgres",
    "postgresql": "postgres",
    "pgx": "postgres",
    "mysql": "mysql",
    "mariadb": "mysql",
}
EXAMPLE_DSNS = {
    "postgres": "postgres://postgres@127.0.0.1/mtop?sslmode=disable",
    "mysql": "root:password@tcp(127.0.0.1:3306)/mtop",
}
TLS_VERSIONS = ("1.2", "1.3")
SERVER_TYPES = ("tls", "quic", "wss", "ws")
#: Listener types on TCP (the others are on UDP).
TCP_TYPES = ("tls", "wss", "ws")
#: Where a ``ws`` listener (no TLS: for a reverse proxy or CDN on the same
#: host) listens when its entry names no address.
WS_DEFAULT_LISTEN = "127.0.0.1:8080"
#: Whose ``Forwarded``/``X-Forwarded-For`` a ``ws`` listener believes when
#: its entry names none: the reverse proxy on the same host.
WS_DEFAULT_TRUSTED = ("127.0.0.0/8", "::1/128")


def is_bare_port(value: Any) -> bool:
    """Whether ``value`` is a port number alone (``29643`` or ``"29643"``),
    which does not say on which interfaces to listen."""
    if isinstance(value, int) and not isinstance(value, bool):
        return True
    return isinstance(value, str) and value.strip().isascii() and value.strip().isdigit()


def bare_port_error(key: str, value: Any, all_interfaces: str, this_machine: str) -> ConfigError:
    """The error for a listen value that is a port alone: it names the two
    spellings meant (``all_interfaces``, ``this_machine``: formats of the
    port)."""
    port = str(value).strip()
    return ConfigError(
        f"{key}: {port} is a port without an address; write {all_interfaces.format(port)!r} to listen on "
        f"all interfaces or {this_machine.format(port)!r} for this machine only"
    )


def parse_listen(value: Any, key: str = "server.listen") -> ListenAddress:
    """Parse ``:443``, ``host:port`` or ``[v6]:port``.  A port alone is an
    error: it used to mean every interface, which a ``listen: 29643``
    meant for this machine only must not silently do."""
    if is_bare_port(value):
        raise bare_port_error(key, value, ":{}", "127.0.0.1:{}")
    if isinstance(value, str):
        text = value.strip()
    else:
        raise ConfigError(f"{key}: {shown(value)} is not an address; use ':443', 'host:port' or '[v6]:port'")
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep or not host:
            raise ConfigError(f"{key}: {value!r} is not an address; use '[v6]:port' for IPv6")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ConfigError(f"{key}: {value!r} has no port; use ':443', 'host:port' or '[v6]:port'")
        if ":" in host:
            raise ConfigError(f"{key}: {value!r} is ambiguous; write IPv6 addresses as '[v6]:port'")
    if not (port_text.isascii() and port_text.isdigit()) or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{key}: port {port_text!r} in {value!r} is not a number from 0 to 65535")
    return ListenAddress(host or None, int(port_text))


class Section:
    """Reads one mapping of the YAML document, remembering which keys were
    used so the rest can be reported as unknown."""

    def __init__(self, name: str, data: Any, warnings: list[str]):
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{name}: expected a mapping of keys, got {type(data).__name__} {shown(data)}")
        self.name = name
        self.data = data
        self.used: set[str] = set()
        self.warnings = warnings

    def key(self, key: str) -> str:
        return f"{self.name}.{key}" if self.name else key

    def get(self, key: str, default: Any, convert: Callable[[str, Any], Any]) -> Any:
        self.used.add(key)
        if key not in self.data or self.data[key] is None:
            return default
        return convert(self.key(key), self.data[key])

    def known(self, *keys: str) -> None:
        """Mark ``keys`` as keys of this section though they were not read
        (read only when present), so a near miss of one is caught."""
        self.used.update(keys)

    def finish(self) -> None:
        """Check the keys that were not read: one edit away from a known key
        (or differing only in case) is an error, as a misspelled key would
        silently leave its default in place (``server.lisen`` listening on
        every interface); any other is a warning."""
        for key in self.data:
            if key not in self.used:
                # backslashreplace: a lone surrogate ("\ud800" in YAML) made
                # the log observer drop the whole line.
                name = str(key).encode("utf-8", "backslashreplace").decode("utf-8")
                meant = _near_miss(name, self.used)
                if meant is not None:
                    raise ConfigError(f"{self.key(name)}: unknown key; did you mean {self.key(meant)}?")
                self.warnings.append(f"unknown key {self.key(name)} ignored")


def _near_miss(name: str, known: set[str]) -> str | None:
    """The known key ``name`` is one edit (insertion, deletion or
    substitution) away from, ignoring case; ``None`` if there is none."""
    lowered = name.lower()
    for key in sorted(known):
        if _one_edit_apart(lowered, key.lower()):
            return key
    return None


def _one_edit_apart(a: str, b: str) -> bool:
    """Whether the Levenshtein distance of ``a`` and ``b`` is at most 1."""
    if abs(len(a) - len(b)) > 1:
        return False
    if len(a) > len(b):
        a, b = b, a
    i = 0
    while i < len(a) and a[i] == b[i]:
        i += 1
    if len(a) == len(b):
        return a[i + 1 :] == b[i + 1 :]
    return a[i:] == b[i + 1 :]


def as_string(key: str, value: Any) -> str:
    if isinstance(value, str) and not _encodable(value):
        raise ConfigError(f"{key}: the text holds a lone surrogate ({shown(value[:40])}), which is not Unicode text")
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    if key.rpartition(".")[2] in _SECRET_KEYS:
        raise ConfigError(f"{key}: a {type(value).__name__} is not a string")
    raise ConfigError(f"{key}: {shown(value)} is not a string")


#: Keys whose values are never echoed in errors.
_SECRET_KEYS = frozenset({"password", "dsn"})


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # "\ud800" in a double-quoted YAML string
        return False
    return True


def as_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{key}: {shown(value)} is not a boolean; use true or false")


def as_count(key: str, value: Any) -> int:
    """A non-negative whole number (0 usually meaning "no limit")."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31:
        return value
    raise ConfigError(f"{key}: {shown(value)} is not a whole number from 0 (no limit) up")


def as_history_days(key: str, value: Any) -> int:
    """Days of usage history: 0 (none kept) to 3650."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 3650:
        return value
    raise ConfigError(f"{key}: {shown(value)} is not a number of days from 0 (keep no history) to 3650")


def as_workers(key: str, value: Any) -> int:
    """A number of processes from 1 to 256, or ``auto`` (0: one per CPU)."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return 0
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 256:
        return value
    raise ConfigError(f"{key}: {value!r} is not a number of processes from 1 to 256 or 'auto'")


def as_fast_open_queue(key: str, value: Any) -> int:
    """A TCP Fast Open queue length: 0 (off) to 65535."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0xFFFF:
        return value
    raise ConfigError(f"{key}: {shown(value)} is not a TCP Fast Open queue length from 0 (off) to 65535")


def as_host_port(key: str, value: Any) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` with a host."""
    if is_bare_port(value):
        raise ConfigError(f"{key}: {value!r} needs a host and a port, e.g. '127.0.0.1:8080'")
    address = parse_listen(value, key)
    if address.host is None or address.port == 0:
        raise ConfigError(f"{key}: {value!r} needs a host and a port, e.g. '127.0.0.1:8080'")
    return address.host, address.port


def as_networks(key: str, value: Any) -> tuple:
    if not isinstance(value, list):
        value = [value]
    networks = []
    for item in value:
        try:
            networks.append(parse_network(as_string(key, item)))
        except ACLError as e:
            raise ConfigError(f"{key}: {e}") from None
    return tuple(networks)


def as_port_ranges(key: str, value: Any) -> tuple:
    if not isinstance(value, list):
        value = [value]
    ranges = []
    for item in value:
        try:
            ranges.append(parse_port_range(item))
        except ACLError as e:
            raise ConfigError(f"{key}: {e}") from None
    return tuple(ranges)


def as_packet_size(key: str, value: Any) -> int:
    """A QUIC UDP payload size: 1200 (QUIC's minimum) to 65527 bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and 1200 <= value <= 65527:
        return value
    raise ConfigError(f"{key}: {shown(value)} is not a UDP payload size from 1200 to 65527 bytes")


def as_seconds(key: str, value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except OverflowError:  # an int beyond float range
            seconds = float("inf")
    elif isinstance(value, str):
        seconds = _duration(key, value)
    else:
        raise ConfigError(f"{key}: {shown(value)} is not a duration; use seconds (10) or '10s', '500ms', '5m'")
    if not 0 < seconds < 10**7:
        raise ConfigError(f"{key}: {shown(value)} must be a positive duration")
    return seconds


def as_non_negative_seconds(key: str, value: Any) -> float:
    if value in (0, "0"):
        return 0.0
    return as_seconds(key, value)


_UNITS = (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0))


def _duration(key: str, text: str) -> float:
    text = text.strip()
    for suffix, scale in _UNITS:
        if text.endswith(suffix):
            number = text[: -len(suffix)]
            break
    else:
        number, scale = text, 1.0
    try:
        return float(number) * scale
    except ValueError:
        raise ConfigError(f"{key}: {text!r} is not a duration; use seconds (10) or '10s', '500ms', '5m'") from None


WORKER_AFFINITIES = ("address", "connection")


def choice(allowed: tuple[str, ...]) -> Callable[[str, Any], str]:
    def convert(key: str, value: Any) -> str:
        text = as_string(key, value).lower()
        if text not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")
        return text

    return convert


def path_in(base: str) -> Callable[[str, Any], str]:
    def convert(key: str, value: Any) -> str:
        text = os.path.expanduser(as_string(key, value))
        return text if os.path.isabs(text) else os.path.normpath(os.path.join(base, text))

    return convert


def require_readable(key: str, path: str) -> None:
    if not path:
        raise ConfigError(f"{key} is required: the path of a PEM file")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path}: {e.strerror}") from None


def _load_server(section: Section, base: str, check_files: bool, has_listeners: bool = False) -> ServerConfig:
    d = ServerConfig()
    server_type = section.get("type", d.type, as_string).lower()
    if server_type not in SERVER_TYPES:
        raise ConfigError(f"server.type: {server_type!r} is not one of {', '.join(SERVER_TYPES)}")
    proto = section.get("proto", d.proto, as_string)
    if not proto or len(proto.encode("utf-8")) > 255:
        raise ConfigError(f"server.proto: {proto!r} must be 1 to 255 bytes long")
    crt = section.get("crt", "", path_in(base))
    key = section.get("key", "", path_in(base))
    if check_files and not has_listeners and server_type != "ws":
        require_readable("server.crt", crt)
        require_readable("server.key", key)
    config = ServerConfig(
        type=server_type,
        listen=section.get("listen", d.listen, lambda k, v: parse_listen(v, k)),
        crt=crt,
        key=key,
        proto=proto,
        tls_min_version=section.get("tls_min_version", d.tls_min_version, lambda k, v: choice(TLS_VERSIONS)(k, str(v))),
        reply_errors=section.get("reply_errors", d.reply_errors, as_bool),
        handshake_timeout=section.get("handshake_timeout", d.handshake_timeout, as_seconds),
        connect_timeout=section.get("connect_timeout", d.connect_timeout, as_seconds),
        idle_timeout=section.get("idle_timeout", d.idle_timeout, as_non_negative_seconds),
        quic_packet_size=section.get("quic_packet_size", d.quic_packet_size, as_packet_size),
        auth_failure_delay=section.get("auth_failure_delay", d.auth_failure_delay, as_non_negative_seconds),
        fallback=section.get("fallback", d.fallback, as_host_port),
        proxy_protocol=section.get("proxy_protocol", d.proxy_protocol, as_bool),
        workers=section.get("workers", d.workers, as_workers),
        worker_affinity=section.get("worker_affinity", d.worker_affinity, choice(WORKER_AFFINITIES)),
        tcp_fast_open=section.get("tcp_fast_open", d.tcp_fast_open, as_fast_open_queue),
        drain_timeout=section.get("drain_timeout", d.drain_timeout, as_non_negative_seconds),
        destination=section.get("destination", d.destination, as_host_port),
        path=section.get("path", d.path, as_ws_path),
        trusted_proxies=section.get("trusted_proxies", d.trusted_proxies, as_networks),
        ws_ping_interval=section.get("ws_ping_interval", d.ws_ping_interval, as_non_negative_seconds),
    )
    if config.proxy_protocol and config.type == "quic" and not has_listeners:
        raise ConfigError("server.proxy_protocol: the PROXY protocol is for TLS on TCP, not for QUIC")
    if config.tcp_fast_open and config.type == "quic" and not has_listeners:
        raise ConfigError("server.tcp_fast_open: TCP Fast Open is for TLS on TCP, not for QUIC (UDP)")
    section.finish()
    return config


def _load_listeners(value: Any, server: ServerConfig, base: str, check_files: bool, warnings: list[str]) -> tuple[ListenerConfig, ...]:
    """``listeners:``, each ``{type, listen, crt, key, proto}`` with what it
    leaves out taken from ``server:``; without it, the ``server:`` block."""
    if value is None:
        listen = server.listen
        if server.type == "ws" and listen == ServerConfig.listen:
            listen = parse_listen(WS_DEFAULT_LISTEN)
        listener = ListenerConfig(
            server.type, listen, server.crt, server.key, server.proto, server.proxy_protocol,
            destination=server.destination, path=server.path,
            trusted_proxies=_trusted(server.type, server.trusted_proxies),
        )
        _warn_open_ws(listener, "server.listen", warnings)
        return (_with_fast_open(listener, server),)
    if not isinstance(value, list) or not value:
        raise ConfigError(f"listeners: expected a list of {{type, listen}} entries, got {shown(value)}")
    listeners = []
    for i, item in enumerate(value):
        section = Section(f"listeners[{i}]", item, warnings)
        listener_type = section.get("type", server.type, choice(SERVER_TYPES))
        proto = section.get("proto", server.proto, as_string)
        if not proto or len(proto.encode("utf-8")) > 255:
            raise ConfigError(f"{section.key('proto')}: {proto!r} must be 1 to 255 bytes long")
        crt = section.get("crt", server.crt, path_in(base))
        key = section.get("key", server.key, path_in(base))
        if check_files and listener_type != "ws":
            require_readable(section.key("crt"), crt)
            require_readable(section.key("key"), key)
        default_listen = parse_listen(WS_DEFAULT_LISTEN) if listener_type == "ws" else server.listen
        listen = section.get("listen", default_listen, lambda k, v: parse_listen(v, k))
        proxy_protocol = section.get("proxy_protocol", server.proxy_protocol and listener_type in TCP_TYPES, as_bool)
        if proxy_protocol and listener_type == "quic":
            raise ConfigError(f"{section.key('proxy_protocol')}: the PROXY protocol is for TLS on TCP, not for QUIC")
        destination = section.get("destination", server.destination, as_host_port)
        path = section.get("path", server.path, as_ws_path)
        trusted = section.get("trusted_proxies", server.trusted_proxies, as_networks)
        if listener_type not in ("ws", "wss"):
            for name in ("path", "trusted_proxies"):
                if isinstance(item, dict) and name in item:
                    raise ConfigError(f"{section.key(name)}: only WebSocket listeners (type ws or wss) have one")
        section.finish()
        listener = ListenerConfig(
            listener_type, listen, crt, key, proto, proxy_protocol, destination=destination, path=path,
            trusted_proxies=_trusted(listener_type, trusted),
        )
        _warn_open_ws(listener, section.key("listen"), warnings)
        listener = _with_fast_open(listener, server)
        for other in listeners:
            if (other.type, other.listen) == (listener.type, listener.listen):
                raise ConfigError(f"{section.key('listen')}: {listen} is already a {listener_type} listener")
        listeners.append(listener)
    return tuple(listeners)


def _trusted(listener_type: str, configured: tuple | None) -> tuple:
    if listener_type not in ("ws", "wss"):
        return ()
    if configured is None:
        return as_networks("trusted_proxies", list(WS_DEFAULT_TRUSTED)) if listener_type == "ws" else ()
    return configured


def _warn_open_ws(listener: ListenerConfig, key: str, warnings: list[str]) -> None:
    host = listener.listen.host
    if listener.type == "ws" and host not in ("127.0.0.1", "::1", "localhost") and not (host or "").startswith("127."):
        warnings.append(
            f"{key}: a ws listener (no TLS) on {listener.listen}: passwords cross the network in the clear "
            "unless only a TLS-terminating proxy on this host can reach it"
        )


def as_ws_path(key: str, value: Any) -> str:
    path = as_string(key, value)
    if not path.startswith("/") or any(c in path for c in "?# \t\r\n") or not path.isascii() or len(path) > 1024:
        raise ConfigError(f"{key}: {path!r} is not a request path: it starts with '/' and has no spaces, '?' or '#'")
    return path


def _with_fast_open(listener: ListenerConfig, server: ServerConfig) -> ListenerConfig:
    """``listener`` with ``server.tcp_fast_open`` if it is on TCP."""
    if not listener.on_tcp or not server.tcp_fast_open:
        return listener
    return replace(listener, tcp_fast_open=server.tcp_fast_open)


def _load_log(section: Section) -> LogConfig:
    level = section.get("level", "info", choice(tuple(LOG_LEVELS)))
    config = LogConfig(level=LOG_LEVELS[level], format=section.get("format", "text", choice(LOG_FORMATS)))
    section.finish()
    return config


def _load_acl(section: Section) -> DestinationACL:
    acl = DestinationACL(
        allow=section.get("allow", (), as_networks),
        deny=section.get("deny", (), as_networks),
        allow_ports=section.get("allow_ports", (), as_port_ranges),
        deny_ports=section.get("deny_ports", (), as_port_ranges),
    )
    section.finish()
    return acl


def _load_clients(section: Section, base: str, check_files: bool = True) -> ClientsConfig:
    """``clients: {allow, deny}``: networks, addresses or list file paths.
    Every entry is read here, once (list files too, unless ``check_files``
    is false, as for mtopctl), into the lists the server uses, so a bad
    network or list file line stops the load rather than the server's
    start."""

    def entries(key: str, value: Any) -> tuple[str, ...]:
        items = value if isinstance(value, list) else [value]
        resolved = resolve_entries([as_string(f"{key}[{i}]", item) for i, item in enumerate(items)], base)
        if not check_files:
            for i, entry in enumerate(resolved):
                if not is_file_entry(entry):
                    try:
                        read_entry(entry)
                    except ClientListError as e:
                        raise ConfigError(f"{key}[{i}]: {e}") from None
        return resolved

    allow, deny = section.get("allow", (), entries), section.get("deny", (), entries)
    section.finish()
    lists = None
    if check_files:
        try:
            lists = load_client_lists(allow, deny, where=lambda denied, i: section.key(f"{'deny' if denied else 'allow'}[{i}]"))
        except ClientListError as e:
            raise ConfigError(str(e)) from None
    return ClientsConfig(allow=allow, deny=deny, lists=lists)


def _load_limits(section: Section) -> LimitsConfig:
    d = LimitsConfig()
    config = LimitsConfig(
        max_tunnels=section.get("max_tunnels", d.max_tunnels, as_count),
        max_handshakes=section.get("max_handshakes", d.max_handshakes, as_count),
        max_per_client=section.get("max_per_client", d.max_per_client, as_count),
        max_handshakes_per_client=section.get("max_handshakes_per_client", d.max_handshakes_per_client, as_count),
    )
    section.finish()
    return config


#: ``quic.backend`` values (`mtop.quic.backend.CHOICES`; not imported from
#: there, so reading a config needs no QUIC library).
QUIC_BACKENDS = ("auto", "qh3", "aioquic")
#: Bounds of ``quic.max_streams``.
QUIC_MAX_STREAMS = (1, 65535)


def _stream_limit(key: str, value: Any) -> int:
    count = as_count(key, value)
    low, high = QUIC_MAX_STREAMS
    if not low <= count <= high:
        raise ConfigError(f"{key}: must be {low} to {high}, got {shown(value)}")
    return count


def load_quic(section: Section, server: bool = True) -> QuicConfig:
    """``quic: {backend, max_streams}`` (climber's config has ``backend``)."""
    d = QuicConfig()
    backend = section.get("backend", d.backend, choice(QUIC_BACKENDS))
    max_streams = section.get("max_streams", d.max_streams, _stream_limit) if server else d.max_streams
    section.finish()
    return QuicConfig(backend=backend, max_streams=max_streams)


def _load_throttle(section: Section) -> ThrottleSettings:
    d = ThrottleSettings()
    config = ThrottleSettings(
        max_failures=section.get("max_failures", d.max_failures, as_count),
        window=section.get("window", d.window, as_seconds),
        ban=section.get("ban", d.ban, as_seconds),
        max_in_flight=section.get("max_in_flight", d.max_in_flight, as_count),
    )
    section.finish()
    return config


def load_metrics(section: Section) -> MetricsConfig:
    """``metrics: {listen, per_user}`` (climber's config has it too)."""
    config = MetricsConfig(
        listen=section.get("listen", None, lambda k, v: parse_listen(v, k)),
        per_user=section.get("per_user", False, as_bool),
    )
    section.finish()
    return config


def _is_loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return host is not None and ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _load_admin(section: Section, server: ServerConfig, base: str, check_files: bool) -> AdminConfig:
    """``admin: {listen, tls, crt, key}``: the admin API's listener."""
    listen = section.get("listen", None, lambda k, v: parse_listen(v, k))
    crt = section.get("crt", "", path_in(base))
    key = section.get("key", "", path_in(base))
    tls = section.get("tls", bool(crt or key), as_bool)
    public_host = section.get("public_host", None, as_string) or None
    section.finish()
    if bool(crt) != bool(key):
        raise ConfigError("admin.crt and admin.key: give both (or neither, for the server's with tls: true)")
    if tls and not crt:
        crt, key = server.crt, server.key
    if listen is not None and not tls and not _is_loopback(listen.host):
        raise ConfigError(
            f"admin.listen: {listen} without TLS would carry admin passwords and tokens in the clear; "
            "listen on a loopback address (127.0.0.1:8444) or set admin.tls: true"
        )
    if listen is not None and tls and check_files:
        require_readable("admin.crt", crt)
        require_readable("admin.key", key)
    return AdminConfig(listen=listen, tls=tls, crt=crt, key=key, public_host=public_host)


def _load_health(section: Section) -> HealthConfig:
    """``health: {listen}``."""
    config = HealthConfig(listen=section.get("listen", None, lambda k, v: parse_listen(v, k)))
    section.finish()
    return config


def _load_db(section: Section, base: str) -> DBConfig:
    d = DBConfig()
    name = section.get("driverName", d.driverName, as_string)
    driver = DRIVER_NAMES.get(name.lower())
    if driver is None:
        raise ConfigError(
            f"db.driverName: {name!r} is not one of sqlite, psql (or postgres, postgresql), mysql (or mariadb)"
        )
    dsn = section.get("dsn", d.dsn if driver == "sqlite" else "", as_string).strip()
    if driver == "sqlite":
        if dsn.startswith("file:"):
            dsn = dsn[len("file:") :].split("?", 1)[0]
        if not dsn:
            raise ConfigError("db.dsn: the SQLite database path must not be empty")
        dsn = path_in(base)("db.dsn", dsn)
    else:
        if not dsn:
            example = EXAMPLE_DSNS[driver]
            raise ConfigError(f"db.dsn is required for {name}, e.g. {example!r}")
        from mtop.dsn import DSNError, check_postgres_dsn, parse_mysql_dsn

        try:
            check_postgres_dsn(dsn) if driver == "postgres" else parse_mysql_dsn(dsn)
        except DSNError as e:
            raise ConfigError(f"db.dsn: {e}") from None
    config = DBConfig(
        driverName=driver,
        dsn=dsn,
        cache_ttl=section.get("cache_ttl", d.cache_ttl, as_non_negative_seconds),
        query_timeout=section.get("query_timeout", d.query_timeout, as_seconds),
        recheck_interval=section.get("recheck_interval", d.recheck_interval, as_seconds),
        flush_interval=section.get("flush_interval", d.flush_interval, as_seconds),
        presence_interval=section.get("presence_interval", d.presence_interval, as_non_negative_seconds),
        outage_grace=section.get("outage_grace", d.outage_grace, as_non_negative_seconds),
        history_days=section.get("history_days", d.history_days, as_history_days),
    )
    # The original's SQL statement logging: accepted (its configs set it),
    # not used (our log level decides what is logged).
    section.get("debug", False, as_bool)
    section.finish()
    return config


def require_database(config: Config) -> None:
    """A SQLite database must exist before the server starts (it would
    start and refuse every login); `ConfigError` naming the file and the
    command that creates it.  PostgreSQL and MySQL are checked when the
    server connects."""
    if config.db.driverName != "sqlite" or os.path.isfile(config.db.dsn):
        return
    ctl = f"mtopctl -c {shlex.quote(config.path)} db init" if config.path else "mtopctl db init"
    raise ConfigError(f"db.dsn: the SQLite database {config.db.dsn} does not exist; create it with: {ctl}")


def load_config_data(data: Any, path: str | None = None, check_files: bool = True) -> Config:
    """Validate an already-parsed YAML document.  ``check_files`` makes sure
    the certificate and key are readable (the server needs them, mtopctl
    does not)."""
    base = os.path.dirname(os.path.abspath(path)) if path else os.getcwd()
    warnings: list[str] = []
    top = Section("", data, warnings)
    listeners_data = top.get("listeners", None, lambda k, v: v)
    server = _load_server(
        Section("server", top.get("server", {}, lambda k, v: v), warnings), base, check_files, listeners_data is not None
    )
    listeners = _load_listeners(listeners_data, server, base, check_files, warnings)
    log = _load_log(Section("log", top.get("log", {}, lambda k, v: v), warnings))
    db = _load_db(Section("db", top.get("db", {}, lambda k, v: v), warnings), base)
    acl = _load_acl(Section("acl", top.get("acl", {}, lambda k, v: v), warnings))
    clients = _load_clients(Section("clients", top.get("clients", {}, lambda k, v: v), warnings), base, check_files)
    limits = _load_limits(Section("limits", top.get("limits", {}, lambda k, v: v), warnings))
    throttle = _load_throttle(Section("auth_throttle", top.get("auth_throttle", {}, lambda k, v: v), warnings))
    metrics = load_metrics(Section("metrics", top.get("metrics", {}, lambda k, v: v), warnings))
    health = _load_health(Section("health", top.get("health", {}, lambda k, v: v), warnings))
    quic = load_quic(Section("quic", top.get("quic", {}, lambda k, v: v), warnings))
    admin = _load_admin(Section("admin", top.get("admin", {}, lambda k, v: v), warnings), server, base, check_files)
    top.finish()
    return Config(
        admin=admin,
        quic=quic,
        health=health,
        server=server,
        log=log,
        db=db,
        acl=acl,
        clients=clients,
        limits=limits,
        auth_throttle=throttle,
        metrics=metrics,
        listeners=listeners,
        path=path,
        warnings=tuple(warnings),
    )


def read_yaml(path: str) -> Any:
    """Parse a YAML file, turning every failure into a `ConfigError`."""
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from None
    except Exception as e:
        # PyYAML's constructors raise plain ValueError, KeyError, ... for
        # values like 2001-02-30 or !!int x, and RecursionError for deep
        # nesting; their messages may quote the value, so they are not shown.
        raise ConfigError(f"config file {path} is not valid YAML: a value cannot be read ({type(e).__name__})") from None


def load_config(path: str, check_files: bool = True) -> Config:
    """Read and validate ``path``."""
    return load_config_data(read_yaml(path), path, check_files)
