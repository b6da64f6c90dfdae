"""Reloading ``mtop.yaml`` on SIGHUP without dropping open tunnels.

What a reload changes, for new connections and logins (open tunnels go on
as they are): the login cache is emptied (and ``db.cache_ttl``,
``query_timeout``, ``outage_grace`` apply), the destination ACL, the
client allow and block lists (their files re-read), the limits and the throttle's settings, the ``server:`` settings (timeouts,
``reply_errors``, ``auth_failure_delay``, ``fallback``), ``log.level``, and
every listener's certificate and key (re-read from their files, so renewed
certificates are picked up).  Listen addresses, listener types and the
database need a restart: a reload that changes them applies the rest and
says so.

The new file is validated first, certificates included; a file that fails
is rejected with one log line and the running configuration stays.
"""

from __future__ import annotations

import signal
from typing import Any

from twisted.application.service import Service

from mtop.config import Config, ConfigError, load_config
from mtop.logs import logger, set_level
from mtop.tls import TLSConfigError


class ConfigReloader(Service):
    """Applies a re-read config to the running objects; `reload` is what
    SIGHUP calls."""

    _log = logger()
    _previous_handler: Any = None

    def __init__(
        self, config: Config, reactor: Any, factory: Any, authenticator: Any, listeners: list[Any], client_lists: Any = None
    ):
        """``client_lists``: the `mtop.clientlist.ClientListWatcher` that
        keeps ``factory.client_lists`` up to date with its files."""
        self.config = config
        self.reactor = reactor
        self.factory = factory
        self.authenticator = authenticator
        self.listeners = listeners
        self.client_lists = client_lists

    def startService(self) -> None:
        super().startService()
        if self.config.path and hasattr(signal, "SIGHUP"):
            try:
                self._previous_handler = signal.signal(signal.SIGHUP, self._on_signal)
            except ValueError:  # not the main thread (embedded use)
                self._previous_handler = None

    def stopService(self) -> None:
        super().stopService()
        if self._previous_handler is not None:
            signal.signal(signal.SIGHUP, self._previous_handler)
            self._previous_handler = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self.reload)

    def reload(self) -> bool:
        """Read the config file again and apply it; ``False`` (and nothing
        changed) when it is not valid."""
        from mtop.clientlist import ClientListError, ClientLists
        from mtop.listeners import prepare_listeners

        path = self.config.path
        try:
            config = load_config(path)
            prepared = prepare_listeners(config, self.reactor)
            lists = ClientLists.from_config(config.clients)
        except (ConfigError, TLSConfigError, ClientListError) as e:
            self._log.error("config reload rejected, the running configuration stays: {path}: {error}", path=path, error=e)
            return False
        self._apply(config, prepared)
        self.factory.client_lists = lists
        if self.client_lists is not None:
            self.client_lists.use(config.clients, lists)
        self.config = config
        return True

    def _apply(self, config: Config, prepared: list[Any]) -> None:
        from mtop.acl import destination_acl
        from mtop.limits import limit_settings
        from mtop.server import ServerSettings
        from mtop.tap import log_config_warnings

        old = self.config
        set_level(config.log.level)
        log_config_warnings(self._log, config)
        factory = self.factory
        factory.dialer.acl = destination_acl(config)
        factory.dialer.connect_timeout = config.server.connect_timeout
        factory.limits.settings = limit_settings(config.limits)
        factory.throttle.settings = config.auth_throttle
        factory.login_gate.limit = config.auth_throttle.max_in_flight
        factory.settings = ServerSettings.from_config(config.server)
        auth = self.authenticator
        auth.cache_ttl = config.db.cache_ttl
        auth.query_timeout = config.db.query_timeout
        auth.outage_grace = config.db.outage_grace
        auth.forget()
        restart = []
        if _shape(old) != _shape(config):
            restart.append("listeners")
        else:
            for service, item in zip(self.listeners, prepared):
                service.use_security(item.security)
        if (old.db.driverName, old.db.dsn, old.db.recheck_interval, old.db.flush_interval) != (
            config.db.driverName,
            config.db.dsn,
            config.db.recheck_interval,
            config.db.flush_interval,
        ):
            restart.append("db")
        if old.metrics != config.metrics:
            restart.append("metrics")
        if restart:
            self._log.warn(
                "config reloaded from {path}, but changes to {sections} need a restart",
                path=config.path,
                sections=" and ".join(restart),
            )
        else:
            self._log.info("config reloaded from {path}", path=config.path)


def _shape(config: Config) -> list[tuple]:
    """What listening depends on (certificates aside)."""
    return [(item.type, item.listen, item.proxy_protocol) for item in config.listeners]
