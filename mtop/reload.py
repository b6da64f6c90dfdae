"""Reloading ``mtop.yaml`` on SIGHUP without dropping open tunnels.

A reload builds the new config's `mtop.settings.RuntimeSettings` with the
same function start-up uses and hands them to the same consumers
(`mtop.interfaces.ISettingsConsumer`).  What that changes, for new
connections and logins (open tunnels go on as they are): the login cache is
emptied (and ``db.cache_ttl``, ``query_timeout``, ``outage_grace`` apply),
the destination ACL, the client allow and block lists (their files
re-read), the limits and the throttle's settings, the ``server:`` settings
(timeouts, ``reply_errors``, ``auth_failure_delay``, ``fallback``),
``log.level``, and every listener's certificate and key (re-read from
their files, so renewed certificates are picked up).

What a running process cannot change (`mtop.settings.NEEDS_RESTART`:
listen addresses, listener types, the database, metrics, workers) is
compared with what runs, the config the process started with: a reload
that changes it applies the rest and says what needs a restart, and once
the file says again what runs, the next reload no longer does.

The new file is validated first, certificates included; a file that fails
is rejected with one log line and the running configuration stays.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from typing import Any

from twisted.application.service import Service

from mtop.config import Config, ConfigError, load_config
from mtop.interfaces import ISettingsConsumer
from mtop.logs import logger
from mtop.settings import deliver_settings, restart_needed, runtime_settings
from mtop.startup import log_config_warnings
from mtop.tls import TLSConfigError


class ConfigReloader(Service):
    """Applies a re-read config to the running objects; `reload` is what
    SIGHUP calls.  An `IService` (it holds the SIGHUP handler while
    running)."""

    _log = logger()
    _previous_handler: Any = None

    def __init__(self, config: Config, reactor: Any, consumers: Sequence[ISettingsConsumer]):
        """``config``: the one the process started with (what runs);
        ``consumers``: what ``makeService`` delivered its settings to, in
        the same order."""
        #: What runs: compared with each new config for what needs a restart.
        self.running_config = config
        #: The config last applied (its path is the file read again).
        self.config = config
        self.reactor = reactor
        self.consumers = list(consumers)

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
        from mtop.clientlist import ClientListError

        path = self.config.path
        try:
            config = load_config(path)
            settings = runtime_settings(config, self.reactor)
        except (ConfigError, TLSConfigError, ClientListError) as e:
            self._log.error("config reload rejected, the running configuration stays: {path}: {error}", path=path, error=e)
            return False
        deliver_settings(settings, self.consumers)
        self.config = config
        log_config_warnings(self._log, config)
        restart = restart_needed(self.running_config, config)
        if restart:
            self._log.warn(
                "config reloaded from {path}, but changes to {sections} need a restart",
                path=config.path,
                sections=" and ".join(restart),
            )
        else:
            self._log.info("config reloaded from {path}", path=config.path)
        return True
