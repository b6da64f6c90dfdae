"""climber as ss-local's plugin (SIP003; the environment in `mtop.sip003`):
one port forward from where ss-local expects its plugin (``SS_LOCAL_*``)
through an MTop tunnel to the server (``SS_REMOTE_*``), an mtop started
as ss-server's plugin, whose listener sends every tunnel to ss-server.

Options (``--plugin-opts``): ``user`` and ``password`` (or ``link``, an
mtop:// share link, whose host then replaces ``SS_REMOTE_*``), ``ca``,
``sni``, ``type`` (tls, quic or wss; for wss ``path`` and ``host``, the
Host header), ``insecure`` (a flag), and ``target``
(the host:port the tunnel names; the server's fixed destination ignores
it; default: the server's address).
"""

from __future__ import annotations

import os
from typing import Any

from mtop.config import ConfigError
from mtop.sip003 import OPTIONS_VARIABLE, PluginEnvironment, check_options

OPTIONS = ("user", "password", "link", "ca", "sni", "type", "insecure", "target", "path", "host")


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def climber_data(plugin: PluginEnvironment) -> dict[str, Any]:
    """A climber config (as read from YAML) for the plugin."""
    options = plugin.options
    check_options(options, OPTIONS)
    server: dict[str, Any] = {}
    if options.get("link"):
        if "user" in options or "password" in options:
            raise ConfigError(f"{OPTIONS_VARIABLE}: give link or user and password, not both")
        server["url"] = options["link"]
    else:
        if not options.get("user") or "password" not in options:
            raise ConfigError(f"{OPTIONS_VARIABLE}: user and password (or link) are needed")
        server.update(host=_hostport(*plugin.remote), username=options["user"], password=options["password"])
    for key in ("type", "sni", "path"):
        if options.get(key):
            server[key] = options[key]
    if options.get("host"):
        server["ws_host"] = options["host"]
    if options.get("ca"):
        server["ca"] = os.path.abspath(options["ca"])
    if "insecure" in options:
        server["insecure"] = options["insecure"] in ("", "true", "1", "yes")
    return {
        "servers": [server],
        "forward": [{"listen": _hostport(*plugin.local), "target": options.get("target") or _hostport(*plugin.remote)}],
    }
