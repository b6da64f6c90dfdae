"""What both taps (``twistd mtop``, ``twistd climber``) do at start-up.

`TapService` is the root service each ``makeService`` returns: it decides
what a listener that cannot listen means for the process (the process
ends, exit status 1; `daemonizing` says how to tell twistd).  `StartupNotes` logs a config's warnings once the log
is set up; `log_config_warnings` is what it (and the server's reload) logs.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService, Service

from mtop import fileperms
from mtop.listening import ListenFailed
from mtop.logs import logger


def log_config_warnings(log: Any, config: Any) -> None:
    """Log what is worth a warning in a loaded config (at start and after a
    reload): unknown keys and the like, and private keys or
    password-holding configs others can read (climber's config too)."""
    for warning in config.warnings:
        log.warn("config {path}: {warning}", path=config.path, warning=warning)
    for warning in fileperms.startup_warnings(config):
        log.warn("{warning}", warning=warning)


class StartupNotes(Service):
    """Logs the config's warnings once the log is set up (an `IService`)."""

    _log = logger()

    def __init__(self, config: Any):
        self.config = config

    def startService(self) -> None:
        super().startService()
        log_config_warnings(self._log, self.config)


def daemonizing(options: Any) -> bool:
    """Whether twistd runs the tap ``options`` belong to in the background
    (no ``--nodaemon``); ``False`` outside twistd."""
    twistd_options = options.parent
    if twistd_options is None:
        return False
    try:
        return not twistd_options["nodaemon"]
    except KeyError:  # not twistd's ServerOptions
        return False


class TapService(MultiService):
    """The root service of a tap (an `IServiceCollection`).

    A listener that cannot listen has logged why (one critical line) and
    raised `mtop.listening.ListenFailed` from its start, before the reactor
    runs; the process then ends with exit status 1.  In the foreground
    (``--nodaemon``, as under systemd) that is `SystemExit`: twistd prints
    no traceback, so the critical line is the whole story.  A daemonizing
    twistd's parent waits for word from the daemon and learns of a failure
    only from an exception (it prints its first line and exits 1), so there
    the `ListenFailed` goes on as it is."""

    def __init__(self, daemon: bool = False):
        """``daemon``: twistd runs in the background (`daemonizing`)."""
        super().__init__()
        self.daemon = daemon

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except ListenFailed:
            if self.daemon:
                raise
            raise SystemExit(1) from None

    def startService(self) -> None:
        try:
            super().startService()
        except ListenFailed:
            if self.daemon:
                raise
            raise SystemExit(1) from None
