"""``twistd mtop``: command-line options and the service tree.

``postOptions`` loads the config and builds its `mtop.settings.RuntimeSettings`
(certificates loaded, client lists read, a SQLite database present:
problems are one-line usage errors, `mtop.startup.ConfigUsageError`);
``makeService`` builds the long-lived objects, delivers those settings to
each (`mtop.interfaces.ISettingsConsumer`) and gives the same consumers to
the reloader.  Its root is a `mtop.startup.TapService`: a listener that
cannot listen ends the process with exit status 1.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import MultiService, Service

from mtop.clientlist import ClientListError
from mtop.config import Config, ConfigError, ListenAddress, load_config, require_database
from mtop.logs import use_log_format
from mtop.quic import install_reactor as install_quic_reactor
from mtop.settings import RuntimeSettings, runtime_settings
from mtop.startup import ConfigUsageError, TapOptions
from mtop.tls import TLSConfigError

DEFAULT_CONFIG = "/etc/mtop/mtop.yaml"


class Options(TapOptions):
    """``twistd mtop``'s options (`TapOptions`: ``--version``, one-line
    config errors)."""

    tapname = "mtop"
    synopsis = "[--config FILE] [--version]"
    longdesc = "Serve MTop protocol v1 over TLS 1.3 and/or QUIC, with users from a database."
    optParameters = [
        ["config", "c", os.environ.get("MTOP_CONFIG", DEFAULT_CONFIG), "Path of mtop.yaml."],
    ]

    config_data: Config
    #: What the config sets in the running objects (`makeService` delivers it).
    settings: RuntimeSettings

    def postOptions(self) -> None:
        from mtop import sip003

        path = self["config"]
        try:
            plugin = sip003.from_environment()
            if plugin is not None:
                # ss-server's plugin: one listener on the public address, every
                # tunnel to ss-server; the rest from the config.
                path = sip003.config_path(plugin, path)
                self.config_data = sip003.server_config(plugin, load_config(path))
            else:
                self.config_data = load_config(path)
            if any(listener.type == "quic" for listener in self.config_data.listeners):
                install_quic_reactor()
            _check_driver(self.config_data)
            self.settings = runtime_settings(self.config_data)
            require_database(self.config_data)
        except (ConfigError, TLSConfigError, ClientListError) as e:
            raise ConfigUsageError(f"{path}: {e}") from None
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
    store: Any
    if db.driverName == "postgres":
        from mtop.userstore.postgres import PostgresUserStore

        store = PostgresUserStore(db.dsn, reactor)
    elif db.driverName == "mysql":
        from mtop.userstore.mysql import MySQLUserStore

        store = MySQLUserStore(db.dsn, db.query_timeout)
    else:
        from mtop.userstore.sqlite import SQLiteUserStore

        store = SQLiteUserStore(db.dsn)
    store.history_days = db.history_days
    return store


def _login_share(number: int | None) -> Any:
    """The workers' shared verified logins (`mtop.loginshare`), in a
    worker whose supervisor made them; ``None`` otherwise."""
    if number is None:
        return None
    from mtop.loginshare import LoginShare
    from mtop.logs import logger

    try:
        return LoginShare.inherited()
    except (OSError, ValueError) as e:
        logger().warn("worker {number}: verified logins not shared with the other workers: {error}", number=number, error=e)
        return None


def makeService(options: Options, reactor: Any = None) -> MultiService:
    """The server's service tree for ``options`` (on ``reactor``, the
    installed one by default)."""
    if reactor is None:
        from twisted.internet import reactor
    from twisted.internet.threads import deferToThreadPool

    from mtop.auth import Authenticator
    from mtop.clientlist import ClientListWatcher
    from mtop.dialer import Dialer
    from mtop import fastpath
    from mtop.fairqueue import FairWorkers
    from mtop.limits import AuthThrottle, ConnectionLimits
    from mtop.listeners import listener_services
    from mtop.memory import MemoryTrimmer
    from mtop.reload import ConfigReloader
    from mtop.server import TunnelFactory
    from mtop.sessions import UserSessions
    from mtop.settings import LogLevel, deliver_settings
    from mtop.startup import StartupNotes, TapService, daemonizing
    from mtop.stats import Counters
    from mtop.workers import ParentWatch, WorkerSupervisor, effective_workers, worker_number, worker_ports

    config = options.config_data
    settings = options.settings
    # Every object that takes settings from the config, in delivery order
    # (the log level first); delivered once here, and each reloaded
    # config's by the reloader.
    consumers: list[Any] = [LogLevel()]
    root = TapService(daemon=daemonizing(options))
    root.stop_signals = True
    StartupNotes(config).setServiceParent(root)
    fastpath.log_data_path_at_start(root)
    workers = effective_workers(config.server.workers)
    number = worker_number()
    if workers > 1 and number is None:
        # The supervisor: the workers do the serving.
        WorkerSupervisor(reactor, config, workers).setServiceParent(root)
        deliver_settings(settings, consumers)
        return root
    if number is not None:
        ParentWatch(reactor).setServiceParent(root)

    store = user_store(config, reactor)

    def run_in_thread(f, *args):
        return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)

    authenticator = Authenticator(store, reactor, run_in_thread, workers=FairWorkers(reactor), share=_login_share(number))
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
        presence_interval=config.db.presence_interval,
        flush_timeout=max(config.db.query_timeout, 5.0),
        counters=counters,
    )
    sessions.setServiceParent(root)
    MemoryTrimmer(reactor).setServiceParent(root)
    dialer = Dialer(reactor)
    factory = TunnelFactory(
        authenticator,
        dialer,
        reactor,
        sessions=sessions,
        limits=ConnectionLimits(counters=counters),
        throttle=AuthThrottle(reactor, counters=counters),
        counters=counters,
    )
    # Stopped after the listeners (services stop in reverse order) and
    # before the sessions' last traffic flush.
    TunnelCloser(reactor, factory).setServiceParent(root)
    # A changed list file replaces the factory's lists between reloads.
    watcher = ClientListWatcher(
        settings.clients, settings.client_lists, lambda lists: setattr(factory, "client_lists", lists), reactor
    )
    watcher.setServiceParent(root)
    listeners = listener_services(
        settings.listeners, factory, reactor, config.server.handshake_timeout, worker_ports() if number is not None else None,
        config.quic.max_streams, config.server.ws_ping_interval,
        steer=workers if number is not None and config.server.worker_affinity == "address" else 0,
    )
    for service in listeners:
        service.setServiceParent(root)
    consumers += [authenticator, dialer, factory, watcher, *listeners]
    deliver_settings(settings, consumers)
    health = None
    if config.metrics.listen is not None or config.health.listen is not None:
        from mtop.health import Health

        health = Health(
            reactor,
            listeners,
            store,
            outage_grace=lambda: authenticator.outage_grace,
            tunnels=factory.tunnels,
            query_timeout=config.db.query_timeout,
        )
        health.setServiceParent(root)
    if config.metrics.listen is not None:
        from mtop.metrics import metrics_service, server_registry

        quic = [service.protocol for service in listeners if service.listener.type == "quic"]
        registry = server_registry(factory, quic, config.metrics.per_user)
        listen = config.metrics.listen
        if number is not None and listen.port:
            listen = ListenAddress(listen.host, listen.port + number - 1)
        metrics_service(reactor, listen, registry, health).setServiceParent(root)
    if config.health.listen is not None:
        from mtop.health import health_service

        health_service(reactor, config.health.listen, health, reuse_port=number is not None).setServiceParent(root)
    if config.admin.listen is not None and (number is None or number == 1):
        # One admin API per server (a worker setup's first worker serves it).
        from mtop.adminapi import admin_service

        admin_service(reactor, config, factory).setServiceParent(root)
    ConfigReloader(config, reactor, consumers).setServiceParent(root)
    from mtop.drain import Drain

    root.drain = Drain(reactor, factory, listeners, lambda: factory.settings.drain_timeout, health)
    return root
