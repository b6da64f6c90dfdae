"""``twistd climber``: command-line options and the service tree.

Server links come from the config file, ``--server`` (seen by every local
user in ``ps``), ``--server-file`` and ``$CLIMBER_SERVERS`` (both kept out
of ``ps``).  The root is a `mtop.startup.TapService`: a proxy, forward or
metrics listener that cannot listen ends the process with exit status 1.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

from twisted.application.service import MultiService, Service

from climber.config import ClimberConfig, ConfigError, load_climber_data
from mtop.config import read_yaml
from mtop.logs import logger, use_log_format
from mtop.startup import ConfigUsageError, TapOptions
from mtop.tls import TLSConfigError, client_context
from mtop.urls import URLError, parse_url

DEFAULT_CONFIG = "/etc/climber/climber.yaml"
#: The environment variable holding server links (separated by whitespace).
SERVERS_VARIABLE = "CLIMBER_SERVERS"
#: The warning logged at start when a link on the command line holds a password.
PASSWORD_IN_ARGV = (
    "--server: a password on the command line is shown to every local user by ps; "
    "use --server-file FILE or $" + SERVERS_VARIABLE + " instead"
)


class Options(TapOptions):
    """``twistd climber``'s options (`TapOptions`: ``--version``, one-line
    config errors)."""

    tapname = "climber"
    synopsis = (
        "[--config FILE] [--server-file FILE] [--server mtop://... ...] [--socks5 ADDR] [--http ADDR] "
        "[--forward LISTEN=TARGET ...] [--version]"
    )
    longdesc = (
        "Local SOCKS5 and HTTP proxies (and port forwards) whose every connection goes through an "
        "MTop tunnel.  Server links come from the config file, --server-file, $" + SERVERS_VARIABLE + " "
        "(links separated by spaces or newlines) and --server, all together.  Without --config and "
        "links, reads " + DEFAULT_CONFIG + " (or $CLIMBER_CONFIG)."
    )
    optParameters = [
        ["config", "c", None, "Path of climber.yaml."],
        ["server-file", None, None, "A file of mtop:// share links, one a line ('#' starts a comment line)."],
        ["socks5", None, None, "SOCKS5 listen address (default 127.0.0.1:1080 without a config file)."],
        ["http", None, None, "HTTP proxy listen address (default 127.0.0.1:8080 without a config file)."],
        ["strategy", None, None, "Server choice: random, round_robin, failover or fastest."],
        ["ca", None, None, "CA certificate (PEM) for the links of --server, --server-file and $CLIMBER_SERVERS; default: the system's trust store."],
    ]
    optFlags = [
        ["insecure", None, "Do not verify the certificates of the links of --server, --server-file and $CLIMBER_SERVERS (dangerous)."],
    ]

    config_data: ClimberConfig

    def __init__(self) -> None:
        super().__init__()
        self["servers"] = []
        self["forwards"] = []

    def opt_server(self, url: str) -> None:
        """An mtop:// share link of a server (repeatable).  Its password is
        shown to every local user by ps: prefer --server-file or
        $CLIMBER_SERVERS."""
        self["servers"].append(url)

    def opt_forward(self, spec: str) -> None:
        """A port forward LISTEN=TARGET, e.g. 127.0.0.1:2222=host:22 (repeatable)."""
        listen, sep, target = spec.partition("=")
        if not sep or not listen or not target:
            raise ConfigUsageError(f"--forward {spec!r}: use LISTEN=TARGET, e.g. 127.0.0.1:2222=example.com:22")
        self["forwards"].append({"listen": listen, "target": target})

    def postOptions(self) -> None:
        from mtop.sip003 import from_environment

        try:
            plugin = from_environment()
            if plugin is not None:
                from climber.sip003 import climber_data

                self.config_data = load_climber_data(climber_data(plugin), None)
                for server in self.config_data.usable_servers:
                    client_context(server.ca or None, server.proto, server.insecure)
                _check_quic_reactor(self.config_data, "shadowsocks plugin")
        except (ConfigError, TLSConfigError) as e:
            raise ConfigUsageError(f"shadowsocks plugin: {e}") from None
        if plugin is not None:
            use_log_format(self.config_data.log.format, self.parent)
            return
        path = self["config"]
        try:
            links = self._links()
        except ConfigError as e:
            raise ConfigUsageError(str(e)) from None
        if path is None and not links:
            path = os.environ.get("CLIMBER_CONFIG", DEFAULT_CONFIG)
        label = path or "command line"
        try:
            data = read_yaml(path) if path else {}
            if data is None:
                data = {}
            if not isinstance(data, dict):
                raise ConfigError("the top level must be a mapping of keys")
            self._apply_command_line(data, links, from_file=path is not None)
            self.config_data = load_climber_data(data, path)
            for server in self.config_data.usable_servers:
                client_context(server.ca or None, server.proto, server.insecure)
            _check_quic_reactor(self.config_data, label)
        except (ConfigError, TLSConfigError) as e:
            raise ConfigUsageError(f"{label}: {e}") from None
        if any(_has_password(url) for url in self["servers"]):
            self.config_data = replace(self.config_data, warnings=(*self.config_data.warnings, PASSWORD_IN_ARGV))
        use_log_format(self.config_data.log.format, self.parent)

    def _links(self) -> list[str]:
        """The server links of ``--server-file``, ``$CLIMBER_SERVERS`` and
        ``--server``, in that order."""
        links: list[str] = []
        if self["server-file"]:
            links += read_server_file(self["server-file"])
        links += os.environ.get(SERVERS_VARIABLE, "").split()
        return links + self["servers"]

    def _apply_command_line(self, data: dict, links: list[str], from_file: bool) -> None:
        if links:
            extra: dict[str, Any] = {"urls": links}
            if self["ca"]:
                extra["ca"] = os.path.abspath(self["ca"])
            if self["insecure"]:
                extra["insecure"] = True
            servers = data.get("servers") or []
            if not isinstance(servers, list):
                raise ConfigError("servers: expected a list")
            data["servers"] = servers + [extra]
        for key in ("socks5", "http"):
            if self[key]:
                section = data.get(key) or {}
                if not isinstance(section, dict):
                    raise ConfigError(f"{key}: expected a mapping of keys")
                data[key] = {**section, "listen": self[key]}
        if not from_file and not (self["socks5"] or self["http"] or self["forwards"]):
            data["socks5"] = {}
            data["http"] = {}
        if self["forwards"]:
            forwards = data.get("forward") or []
            if not isinstance(forwards, list):
                raise ConfigError("forward: expected a list")
            data["forward"] = forwards + self["forwards"]
        if self["strategy"]:
            data["strategy"] = self["strategy"]


def read_server_file(path: str) -> list[str]:
    """The links in the file ``path``: one a line; blank lines and lines
    starting with ``#`` are skipped (a ``#`` later in a line is a link's
    fragment, its name)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ConfigError(f"--server-file: cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--server-file: {path} is not UTF-8 text") from None
    links = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not links:
        raise ConfigError(f"--server-file: {path} holds no mtop:// link")
    return links


def _has_password(url: str) -> bool:
    """Whether the link ``url`` holds a password (a bad link is refused
    when the config loads, so it counts as none here)."""
    try:
        return bool(parse_url(url).password)
    except URLError:
        return False


def _check_quic_reactor(config: ClimberConfig, label: str) -> None:
    """QUIC servers need a reactor that can host QUIC (the asyncio one):
    installed here unless twistd was told another with ``-r``."""
    quic = [s for s in config.usable_servers if s.type == "quic"]
    if not quic:
        return
    from mtop.quic import install_reactor, reactor_problem

    install_reactor()
    from twisted.internet import reactor

    command = f"twistd -r asyncio climber --config {config.path}" if config.path else "twistd -r asyncio climber ..."
    problem = reactor_problem(reactor, command)
    if problem:
        raise ConfigError(f"server {quic[0].name} is QUIC: {problem}")
    from mtop.quic.backend import BackendUnavailable, load

    try:
        load(quic[0].quic_backend)
    except BackendUnavailable as e:
        raise ConfigError(str(e)) from None


class _Lifecycle(Service):
    """Says which servers climber will use; closes the connections still
    open when it stops."""

    _log = logger()

    def __init__(self, climber: Any, config: ClimberConfig):
        self.climber = climber
        self.config = config

    def startService(self) -> None:
        super().startService()
        servers = self.config.usable_servers
        self._log.info(
            "climber: {count} server(s), strategy {strategy}: {servers}",
            count=len(servers),
            strategy=self.config.strategy,
            servers=", ".join(s.name for s in servers),
        )
        quic = [s for s in servers if s.type == "quic"]
        if quic:
            from mtop.quic.backend import describe, load

            self._log.info("QUIC with {library}", library=describe(load(quic[0].quic_backend)))

    def stopService(self) -> None:
        super().stopService()
        self.climber.close_all()
        self.climber.opener.close()


def makeService(options: Options, reactor: Any = None) -> MultiService:
    """climber's service tree for ``options`` (on ``reactor``, the
    installed one by default)."""
    if reactor is None:
        from twisted.internet import reactor

    from climber.forward import ForwardConnection
    from climber.frontend import Climber, LocalFactory
    from climber.httpproxy import HTTPProxyConnection
    from climber.pool import ServerPool
    from climber.socks5 import Socks5Connection
    from climber.tunnel import TunnelOpener
    from mtop import fastpath
    from mtop.listening import ListeningService, listening_endpoint
    from mtop.logs import set_level
    from mtop.memory import MemoryTrimmer
    from mtop.startup import StartupNotes, TapService, daemonizing
    from mtop.wire import format_hostport

    config = options.config_data
    set_level(config.log.level)
    root = TapService(daemon=daemonizing(options))
    root.stop_signals = True
    StartupNotes(config).setServiceParent(root)
    fastpath.log_data_path_at_start(root)

    pool = ServerPool(config.usable_servers, config.strategy, reactor)
    climber = Climber(TunnelOpener(reactor, pool, config.idle_timeout), reactor, config.idle_timeout, config.handshake_timeout)
    _Lifecycle(climber, config).setServiceParent(root)
    MemoryTrimmer(reactor).setServiceParent(root)

    for listener, protocol, label in (
        (config.socks5, Socks5Connection, "SOCKS5 proxy"),
        (config.http, HTTPProxyConnection, "HTTP proxy"),
    ):
        if listener is None:
            continue
        factory = LocalFactory(
            protocol, climber, timeout=listener.timeout, username=listener.username, password=listener.password
        )
        ListeningService(listening_endpoint(reactor, listener.listen), factory, label, listener.listen).setServiceParent(root)
    for forward in config.forwards:
        factory = LocalFactory(ForwardConnection, climber, timeout=forward.timeout, host=forward.host, port=forward.port)
        label = f"forward to {format_hostport(forward.host, forward.port)}"
        ListeningService(listening_endpoint(reactor, forward.listen), factory, label, forward.listen).setServiceParent(root)
    if config.metrics.listen is not None:
        from climber.metrics import climber_registry
        from mtop.metrics import metrics_service

        metrics_service(reactor, config.metrics.listen, climber_registry(climber, pool)).setServiceParent(root)
    return root
