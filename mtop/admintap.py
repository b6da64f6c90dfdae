"""``twistd mtop-admin``: the admin API alone, on the database of an
``mtop.yaml`` (``admin.listen`` must be set): one API for every server
sharing that database, run where the servers' tunnels are not."""

from __future__ import annotations

import os
from typing import Any

from twisted.application.service import MultiService

from mtop.config import Config, ConfigError, load_config
from mtop.logs import use_log_format
from mtop.startup import ConfigUsageError, TapOptions
from mtop.tls import TLSConfigError

DEFAULT_CONFIG = "/etc/mtop/mtop.yaml"


class Options(TapOptions):
    tapname = "mtop-admin"
    synopsis = "[--config FILE] [--version]"
    longdesc = "Serve the MTop admin API (users over HTTP and JSON) on the database of mtop.yaml."
    optParameters = [["config", "c", os.environ.get("MTOP_CONFIG", DEFAULT_CONFIG), "Path of mtop.yaml."]]

    config_data: Config

    def postOptions(self) -> None:
        path = self["config"]
        try:
            config = load_config(path, check_files=False)
            if config.admin.listen is None:
                raise ConfigError("admin.listen is not set: where should the admin API listen? (e.g. 127.0.0.1:8444)")
            load_config(path, check_files=config.admin.tls)  # the admin certificate, when TLS
            if config.admin.tls:
                from mtop.tls import server_context

                server_context(config.admin.crt, config.admin.key, "http/1.1", config.server.tls_min_version)
        except (ConfigError, TLSConfigError) as e:
            raise ConfigUsageError(f"{path}: {e}") from None
        self.config_data = config
        use_log_format(config.log.format, self.parent)


def makeService(options: Options, reactor: Any = None) -> MultiService:
    if reactor is None:
        from twisted.internet import reactor
    from mtop.adminapi import admin_service
    from mtop.logs import set_level
    from mtop.startup import TapService, daemonizing

    root = TapService(daemon=daemonizing(options))
    root.stop_signals = True
    set_level(options.config_data.log.level)
    admin_service(reactor, options.config_data).setServiceParent(root)
    return root
