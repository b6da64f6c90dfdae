"""What both taps (``twistd mtop``, ``twistd climber``) do at start-up.

`TapService` is the root service each ``makeService`` returns: it decides
what a listener that cannot listen means for the process (the process
ends, exit status 1; `daemonizing` says how to tell twistd).  `StartupNotes` logs a config's warnings once the log
is set up; `log_config_warnings` is what it (and the server's reload) logs.
`TapOptions` is the base of both taps' options: ``--version``
(`version_line`) and a `ConfigUsageError` as one line on stderr, exit
status 1, without twistd's usage text.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import maybeDeferred
from twisted.python import usage

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
    """Logs the config's warnings once the log is set up (an `IService`).

    Its ``makeService`` adds it first, and it logs in
    ``privilegedStartService``, so the warnings come before any listener
    binds (listeners bind in theirs)."""

    _log = logger()

    def __init__(self, config: Any):
        self.config = config
        self._logged = False

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._log_once()

    def startService(self) -> None:
        super().startService()
        self._log_once()  # started without privilegedStartService (tests)

    def _log_once(self) -> None:
        if not self._logged:
            self._logged = True
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


def _take_stop_signals(log: Any) -> None:
    import signal

    from twisted.internet import reactor

    stopping = []

    def stop(signum: int) -> None:
        if stopping:
            log.info("stop signal repeated: already stopping")
            return
        stopping.append(signum)
        log.info("received {signal}, shutting down", signal=signal.Signals(signum).name)
        reactor.stop()

    def handler(signum: int, frame: Any) -> None:
        reactor.callFromThread(stop, signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        try:
            signal.signal(signum, handler)
        except (ValueError, OSError):  # not the main thread
            pass


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

    _log = logger()

    def __init__(self, daemon: bool = False):
        """``daemon``: twistd runs in the background (`daemonizing`)."""
        super().__init__()
        self.daemon = daemon
        #: Run before any service stops, and waited for (`mtop.drain.Drain`).
        self.drain: Any = None
        #: Take SIGTERM and SIGINT from twistd when started (set by the
        #: taps): the first stops the reactor, a repeated one is noted,
        #: where twistd's would try to stop the stopping reactor, with a
        #: traceback (shadowsocks sends its plugins two; so does a process
        #: group's stop).  A drain takes them over while it runs.
        self.stop_signals = False

    def stopService(self) -> Any:
        if self.drain is None or not self.running:
            return super().stopService()
        d = maybeDeferred(self.drain)
        d.addErrback(lambda failure: self._log.failure("drain failed", failure))
        d.addCallback(lambda _: MultiService.stopService(self))
        return d

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
        if self.stop_signals:
            from twisted.internet import reactor

            # After the reactor has installed its own (twistd starts the
            # services before it runs).
            reactor.callWhenRunning(_take_stop_signals, self._log)


class ConfigUsageError(usage.UsageError):
    """A usage error that is one sentence about a value (the config, a
    link, an option's value): under twistd it is printed alone, without
    twistd's usage text (`TapOptions`)."""


def version_line(name: str) -> str:
    """``mtop 0.1.0 (Twisted 24.7.0, Python 3.11.2)`` for the program ``name``."""
    import platform

    import twisted

    from mtop import __version__

    return f"{name} {__version__} (Twisted {twisted.__version__}, Python {platform.python_version()})"


class TapOptions(usage.Options):
    """What the options of both taps share: ``--version``, and errors of
    values (`ConfigUsageError`) as one line on stderr and exit status 1
    under twistd, instead of twistd's usage text with the line last.
    Outside twistd (no parent options) they are raised as they are."""

    #: The plugin's name, as in ``twistd mtop``.
    tapname = ""

    def opt_version(self) -> None:
        """Print the version and exit."""
        print(version_line(self.tapname))
        raise SystemExit(0)

    def parseOptions(self, options: Any = None) -> None:
        try:
            super().parseOptions(options)
        except ConfigUsageError as e:
            if self.parent is None:
                raise
            print(f"twistd {self.tapname}: {e}", file=sys.stderr)
            raise SystemExit(1) from None
