"""What a configuration sets in the running server, built once per config.

`runtime_settings` turns a loaded `mtop.config.Config` into one
`RuntimeSettings`: everything the long-lived objects take from the config,
checked and ready (certificates loaded, client list files read).  Start-up
(``mtop.tap.makeService``) and reload (`mtop.reload.ConfigReloader`) both
build it with this one function and hand it with `deliver_settings` to the
same consumers, each providing `mtop.interfaces.ISettingsConsumer` (one
``apply_settings`` method each).  A new setting is a field here and a line
in its consumer's ``apply_settings``, and works at start and on reload.

What a running process cannot take on is `NEEDS_RESTART`: each entry names
a part of the config and says what of a config it depends on;
`restart_needed` compares the config the process runs with a new one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from zope.interface import implementer

from mtop.interfaces import ISettingsConsumer
from mtop.logs import set_level

if TYPE_CHECKING:
    from mtop.acl import DestinationACL
    from mtop.clientlist import ClientLists
    from mtop.config import ClientsConfig, Config, ListenerConfig
    from mtop.limits import LimitSettings, ThrottleSettings
    from mtop.listeners import PreparedListener
    from mtop.server import TunnelSettings


@dataclass(frozen=True)
class AuthSettings:
    """What the authenticator takes from ``db:``."""

    #: Seconds a verified login is remembered.
    cache_ttl: float
    #: Seconds a user lookup may take.
    query_timeout: float
    #: Seconds a remembered login still admits while the store is down.
    outage_grace: float


@dataclass(frozen=True)
class RuntimeSettings:
    """Everything a configuration gives the running server's long-lived
    objects (see `runtime_settings`)."""

    #: The tunnel factory's (timeouts, ``reply_errors``, fallback...).
    tunnel: TunnelSettings
    #: The dialer's: seconds to connect to a target, and where it may go.
    connect_timeout: float
    acl: DestinationACL
    #: The factory's connection limits and login throttle (its login gate
    #: takes ``throttle.max_in_flight``).
    limits: LimitSettings
    throttle: ThrottleSettings
    auth: AuthSettings
    #: The lowest log level that is logged.
    log_level: str
    #: The client allow and block lists as written, and as read.
    clients: ClientsConfig
    client_lists: ClientLists = field(compare=False)
    #: Every listener of the config with its loaded TLS context or QUIC
    #: configuration, in the config's order.
    listeners: tuple[PreparedListener, ...] = field(default=(), compare=False)

    def listener_security(self, running: ListenerConfig, index: int) -> Any:
        """The TLS context or QUIC configuration for the running listener
        ``running`` (number ``index`` when it started): the new config's
        listener of the same type on the same address, else the one of the
        same type at the same place (its address changed, which needs a
        restart, but a renewed certificate need not wait for it); ``None``
        if there is neither."""
        for item in self.listeners:
            if (item.config.type, item.config.listen) == (running.type, running.listen):
                return item.security
        if index < len(self.listeners) and self.listeners[index].config.type == running.type:
            return self.listeners[index].security
        return None


def runtime_settings(config: Config, reactor: Any = None) -> RuntimeSettings:
    """The settings ``config`` gives the running server.  Loads every
    listener's certificate and reads the client list files, so it raises
    what those raise (`mtop.config.ConfigError`, `mtop.tls.TLSConfigError`,
    `mtop.clientlist.ClientListError`, each naming the file); ``reactor``
    (the installed one by default) is the one QUIC listeners must run on."""
    from mtop.acl import destination_acl
    from mtop.clientlist import ClientLists
    from mtop.limits import limit_settings
    from mtop.listeners import prepare_listeners
    from mtop.server import TunnelSettings

    server = config.server
    db = config.db
    return RuntimeSettings(
        tunnel=TunnelSettings.from_config(server),
        connect_timeout=server.connect_timeout,
        acl=destination_acl(config),
        limits=limit_settings(config.limits),
        throttle=config.auth_throttle,
        auth=AuthSettings(cache_ttl=db.cache_ttl, query_timeout=db.query_timeout, outage_grace=db.outage_grace),
        log_level=config.log.level,
        clients=config.clients,
        client_lists=ClientLists.from_config(config.clients),
        listeners=tuple(prepare_listeners(config, reactor)),
    )


def deliver_settings(settings: RuntimeSettings, consumers: Iterable[ISettingsConsumer]) -> None:
    """Hand ``settings`` to every consumer, in order."""
    for consumer in consumers:
        consumer.apply_settings(settings)


@implementer(ISettingsConsumer)
class LogLevel:
    """The process's log level (``log.level``) as a settings consumer;
    deliver to it first, so what the others log is filtered by the new
    level."""

    def apply_settings(self, settings: RuntimeSettings) -> None:
        set_level(settings.log_level)


def _listener_shape(config: Config) -> tuple:
    return tuple(
        (item.type, item.listen, item.proxy_protocol, item.tcp_fast_open, item.destination) for item in config.listeners
    )


#: What a running process cannot change: the name a reload's warning uses,
#: and what of a config it depends on.  Listeners are bound, the user store
#: and its timers are started, the metrics listener is bound, the worker
#: processes are running and the log observer is set; certificates are not
#: in here (they are reloaded).
NEEDS_RESTART: tuple[tuple[str, Callable[[Config], Any]], ...] = (
    ("listeners", _listener_shape),
    ("db", lambda config: (config.db.driverName, config.db.dsn, config.db.recheck_interval, config.db.flush_interval, config.db.history_days)),
    ("metrics", lambda config: config.metrics),
    ("admin", lambda config: config.admin),
    ("workers", lambda config: (config.server.workers, config.server.worker_affinity)),
    # twistd's log observer is chosen once, before the tap starts.
    ("log.format", lambda config: config.log.format),
)


def restart_needed(running: Config, new: Config) -> list[str]:
    """The names in `NEEDS_RESTART` of what differs between the config the
    process runs (the one it started with) and ``new``."""
    return [name for name, part in NEEDS_RESTART if part(running) != part(new)]
