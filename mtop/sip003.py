"""Running as a shadowsocks plugin (SIP003).

ss-server and ss-local start a plugin with ``sh -c "exec PLUGIN"`` and
these environment variables:

``SS_REMOTE_HOST``, ``SS_REMOTE_PORT``
    the server's public address (ss-server's ``-s``/``-p``; ss-local's
    server);
``SS_LOCAL_HOST``, ``SS_LOCAL_PORT``
    on the server, where ss-server itself listens (on loopback); on the
    client, where the plugin listens for ss-local;
``SS_PLUGIN_OPTIONS``
    ``--plugin-opts``: ``key=value;key2=value2``, with ``\\`` escaping
    ``;``, ``=`` and ``\\`` in keys and values (a key alone is a flag).

``twistd mtop`` started that way serves one listener on the public address
whose every tunnel goes to ss-server (a fixed destination): users,
policy and everything else come from its ``mtop.yaml`` (option ``config``).
``twistd climber`` started that way forwards what ss-local sends through
an MTop tunnel to the server (`climber.sip003`).  ``mtop-ss-plugin`` and
``climber-ss-plugin`` are the commands to give ``--plugin``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, replace
from typing import Mapping

from mtop.config import Config, ConfigError, ListenAddress, ListenerConfig, as_ws_path, parse_listen, require_readable

VARIABLES = ("SS_REMOTE_HOST", "SS_REMOTE_PORT", "SS_LOCAL_HOST", "SS_LOCAL_PORT")
OPTIONS_VARIABLE = "SS_PLUGIN_OPTIONS"
#: The server plugin's options.
#: Transports the plugins carry tunnels over.
PLUGIN_TYPES = ("tls", "quic", "wss")
SERVER_OPTIONS = ("config", "type", "crt", "key", "path")


@dataclass(frozen=True)
class PluginEnvironment:
    """What shadowsocks handed the plugin."""

    remote: tuple[str, int]
    local: tuple[str, int]
    options: dict[str, str]


def parse_options(text: str) -> dict[str, str]:
    """``key=value;key2`` (SIP003's escaping) as a dict; a key alone maps
    to ``""``."""
    options: dict[str, str] = {}
    key: list[str] = []
    value: list[str] | None = None
    escaped = False

    def end() -> None:
        name = "".join(key).strip()
        if name:
            options[name] = "".join(value).strip() if value is not None else ""
        elif value is not None:
            raise ConfigError(f"{OPTIONS_VARIABLE}: an option without a name: {text!r}")

    for char in text:
        target = key if value is None else value
        if escaped:
            target.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ";":
            end()
            key, value = [], None
        elif char == "=" and value is None:
            value = []
        else:
            target.append(char)
    if escaped:
        raise ConfigError(f"{OPTIONS_VARIABLE}: ends in a lone backslash")
    end()
    return options


def _address(environ: Mapping[str, str], host: str, port: str) -> tuple[str, int]:
    text = environ.get(host, "").strip()
    number = environ.get(port, "").strip()
    if not text or not number.isdigit() or not 0 < int(number) < 65536:
        raise ConfigError(f"{host}/{port}: {text!r}/{number!r} is not an address and a port")
    if "," in text:
        raise ConfigError(f"{host}: {text!r}: one address only")
    return text, int(number)


def from_environment(environ: Mapping[str, str] | None = None) -> PluginEnvironment | None:
    """The SIP003 environment, ``None`` if this process was not started as a
    plugin; `ConfigError` if it is incomplete or malformed."""
    environ = os.environ if environ is None else environ
    if not any(name in environ for name in VARIABLES):
        return None
    return PluginEnvironment(
        remote=_address(environ, "SS_REMOTE_HOST", "SS_REMOTE_PORT"),
        local=_address(environ, "SS_LOCAL_HOST", "SS_LOCAL_PORT"),
        options=parse_options(environ.get(OPTIONS_VARIABLE, "")),
    )


def check_options(options: Mapping[str, str], known: tuple[str, ...]) -> None:
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"{OPTIONS_VARIABLE}: unknown option {unknown[0]!r} (known: {', '.join(known)})")


def _listen(host: str, port: int) -> ListenAddress:
    return parse_listen(f"[{host}]:{port}" if ":" in host else f"{host}:{port}", "SS_REMOTE_HOST")


def server_config(plugin: PluginEnvironment, config: Config, check_files: bool = True) -> Config:
    """``config`` serving one listener on the public address, every tunnel
    to ss-server (options: ``type`` tls, quic or wss, ``crt``, ``key``,
    ``path`` for wss)."""
    options = plugin.options
    check_options(options, SERVER_OPTIONS)
    base = config.listeners[0]
    kind = options.get("type", base.type if base.type in PLUGIN_TYPES else "tls") or "tls"
    if kind not in PLUGIN_TYPES:
        raise ConfigError(f"{OPTIONS_VARIABLE}: type={kind!r} is not tls, quic or wss")
    path = options.get("path") or base.path
    if kind != "wss" and "path" in options:
        raise ConfigError(f"{OPTIONS_VARIABLE}: path is for type=wss")
    path = as_ws_path(f"{OPTIONS_VARIABLE} path", path)
    crt = options.get("crt") or base.crt
    key = options.get("key") or base.key
    if check_files:
        require_readable(f"{OPTIONS_VARIABLE} crt", crt)
        require_readable(f"{OPTIONS_VARIABLE} key", key)
    listener = ListenerConfig(
        kind, _listen(*plugin.remote), crt, key, base.proto, destination=plugin.local,
        tcp_fast_open=base.tcp_fast_open if kind != "quic" else 0, path=path,
    )
    return replace(config, listeners=(listener,))


def config_path(plugin: PluginEnvironment, default: str) -> str:
    """The ``mtop.yaml`` the server plugin runs on (option ``config``)."""
    return plugin.options.get("config") or default


def _exec_twistd(tap: str) -> None:
    """Become ``twistd --nodaemon --pidfile= TAP`` (with this interpreter)."""
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    argv = [twistd] if os.path.exists(twistd) else [
        sys.executable, "-c", "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"
    ]
    argv += ["--nodaemon", "--pidfile=", tap]
    os.execv(argv[0], argv)


def _plugin_main(name: str, runner: str, tap: str) -> None:
    """Check the plugin's environment (a clear message and exit status 2
    when it is missing or wrong), then become ``twistd TAP``, which reads
    it again and serves."""
    try:
        plugin = from_environment()
    except ConfigError as e:
        sys.stderr.write(f"{name}: {e}\n")
        raise SystemExit(2) from None
    if plugin is None:
        sys.stderr.write(f"{name}: run by {runner} --plugin {name} (no SS_REMOTE_HOST in the environment)\n")
        raise SystemExit(2)
    _exec_twistd(tap)


def server_main() -> None:
    """``mtop-ss-plugin``: ss-server's ``--plugin``."""
    _plugin_main("mtop-ss-plugin", "ss-server", "mtop")


def climber_main() -> None:
    """``climber-ss-plugin``: ss-local's ``--plugin``."""
    _plugin_main("climber-ss-plugin", "ss-local", "climber")
