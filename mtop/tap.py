"""``twistd mtop``: command-line options and the service tree."""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.python import usage

from mtop import fileperms
from mtop.config import Config, ConfigError, ListenAddress, load_config
from mtop.logs import logger, set_level, use_log_format
from mtop.listeners import listener_services, prepare_listeners
from mtop.tls import TLSConfigError

DEFAULT_CONFIG = "/etc/mtop/mtop.yaml"


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = "Serve MTop protocol v1 over TLS 1.3 and/or QUIC, with users from a database."
    optParameters = [
        ["config", "c", os.environ.get("MTOP_CONFIG", DEFAULT_CONFIG), "Path of mtop.yaml."],
    ]

    config_data: Config
    listeners: list

    def postOptions(self) -> None:
        path = self["config"]
        try:
            self.config_data = load_config(path)
            _check_driver(self.config_data)
            self.listeners = prepare_listeners(self.config_data)
        except (ConfigError, TLSConfigError) as e:
            raise usage.UsageError(f"{path}: {e}") from None
        use_log_format(self.config_data.log.format, self.parent)


def _check_driver(config: Config) -> None:
    """The database driver must be installed (it is an optional extra)."""
    needs = {"postgres": (("txpostgres", "psycopg2"), "postgres"), "mysql": (("pymysql",), "mysql")}
    if config.db.driverName not in needs:
        return
    modules, extra = needs[config.db.driverName]
    for module in modules:
        try:
            __import__(module)
        except ImportError:
            raise ConfigError(
                f"db.driverName {config.db.driverName} needs the Python module {module}: pip install 'mtop[{extra}]'"
            ) from None


def log_config_warnings(log: Any, config: Any) -> None:
    """Log what is worth a warning in a loaded config (at start and after a
    reload): unknown keys and the like, and private keys or
    password-holding configs others can read (climber's config too)."""
    for warning in config.warnings:
        log.warn("config {path}: {warning}", path=config.path, warning=warning)
    for warning in fileperms.startup_warnings(config):
        log.warn("{warning}", warning=warning)


class _StartupNotes(Service):
    """Logs the config's warnings once the log is set up."""

    _log = logger()

    def __init__(self, config: Config):
        self.config = config

    def startService(self) -> None:
        super().startService()
        log_config_warnings(self._log, self.config)


class TunnelCloser(Service):
    """At shutdown, once the listeners are closed, ends every open
    connection (each logs its outcome, ``shutdown``) and waits for them to
    go, at most `SHUTDOWN_WAIT` seconds."""

    SHUTDOWN_WAIT = 2.0

    def __init__(self, reactor: Any, factory: Any):
        self.reactor = reactor
        self.factory = factory

    def stopService(self) -> Any:
        from twisted.internet.task import deferLater

        super().stopService()
        self.factory.close_all()
        deadline = self.reactor.seconds() + self.SHUTDOWN_WAIT

        def gone(_: Any = None) -> Any:
            if not self.factory.tunnels or self.reactor.seconds() >= deadline:
                return None
            return deferLater(self.reactor, 0.01, lambda: None).addCallback(gone)

        return gone()


def user_store(config: Config, reactor: Any) -> Service:
    """The user store ``db.driverName`` names."""
    db = config.db
    if db.driverName == "postgres":
        from mtop.userstore.postgres import PostgresUserStore

        return PostgresUserStore(db.dsn, reactor)
    if db.driverName == "mysql":
        from mtop.userstore.mysql import MySQLUserStore

        return MySQLUserStore(db.dsn, db.query_timeout)
    from mtop.userstore.sqlite import SQLiteUserStore

    return SQLiteUserStore(db.dsn)


def makeService(options: Options) -> MultiService:
    from twisted.internet import reactor
    from twisted.internet.threads import deferToThreadPool

    from mtop.acl import destination_acl
    from mtop.auth import Authenticator
    from mtop.dialer import Dialer
    from mtop.limits import AuthThrottle, ConnectionLimits, limit_settings
    from mtop.memory import MemoryTrimmer
    from mtop.reload import ConfigReloader
    from mtop.server import ServerSettings, TunnelFactory
    from mtop.sessions import UserSessions
    from mtop.stats import Counters

    from mtop.workers import ParentWatch, WorkerSupervisor, effective_workers, worker_number, worker_ports

    config = options.config_data
    set_level(config.log.level)
    root = MultiService()
    _StartupNotes(config).setServiceParent(root)
    workers = effective_workers(config.server.workers)
    number = worker_number()
    if workers > 1 and number is None:
        # The supervisor: the workers do the serving.
        WorkerSupervisor(reactor, config, workers).setServiceParent(root)
        return root
    if number is not None:
        ParentWatch(reactor).setServiceParent(root)

    store = user_store(config, reactor)

    def run_in_thread(f, *args):
        return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    from mtop.fairqueue import FairWorkers

    authenticator = Authenticator(
        store,
        reactor,
        run_in_thread,
        cache_ttl=config.db.cache_ttl,
        query_timeout=config.db.query_timeout,
        outage_grace=config.db.outage_grace,
        workers=FairWorkers(reactor),
    )
    # The sessions own the store: their last traffic flush runs before it
    # closes.
    # One set of counters for the server's events and the sessions' database
    # errors (what the metrics read).
    counters = Counters()
    sessions = UserSessions(
        store,
        authenticator,
        reactor,
        recheck_interval=config.db.recheck_interval,
        flush_interval=config.db.flush_interval,
        flush_timeout=max(config.db.query_timeout, 5.0),
        counters=counters,
    )
    sessions.setServiceParent(root)
    MemoryTrimmer(reactor).setServiceParent(root)
    server = config.server
    factory = TunnelFactory(
        authenticator,
        Dialer(reactor, server.connect_timeout, destination_acl(config)),
        reactor,
        ServerSettings.from_config(server),
        sessions,
        limits=ConnectionLimits(limit_settings(config.limits), counters),
        throttle=AuthThrottle(reactor, config.auth_throttle, counters),
        counters=counters,
    )
    # Stopped after the listeners (services stop in reverse order) and
    # before the sessions' last traffic flush.
    TunnelCloser(reactor, factory).setServiceParent(root)
    from mtop.clientlist import ClientLists, ClientListWatcher

    factory.client_lists = ClientLists.from_config(config.clients)
    watcher = ClientListWatcher(config.clients, factory.client_lists, lambda lists: setattr(factory, "client_lists", lists), reactor)
    watcher.setServiceParent(root)
    listeners = listener_services(
        options.listeners, factory, reactor, server.handshake_timeout, worker_ports() if number is not None else None
    )
    for service in listeners:
        service.setServiceParent(root)
    if config.metrics.listen is not None:
        from mtop.metrics import metrics_service, server_registry

        quic = [service.protocol for service in listeners if service.listener.type == "quic"]
        registry = server_registry(factory, quic, config.metrics.per_user)
        listen = config.metrics.listen
        if number is not None and listen.port:
            listen = ListenAddress(listen.host, listen.port + number - 1)
        metrics_service(reactor, listen, registry).setServiceParent(root)
    ConfigReloader(config, reactor, factory, authenticator, listeners, watcher).setServiceParent(root)
    return root
