"""The config reload (what SIGHUP runs) on the service tree `makeService`
builds, without starting it: the same settings reach the same consumers as
at start, and what needs a restart is judged against what runs."""

import pytest
from twisted.internet.testing import MemoryReactorClock
from zope.interface.verify import verifyObject

from mtop import tap
from mtop.auth import Authenticator
from mtop.certs import init_certs
from mtop.clientlist import ClientListWatcher
from mtop.config import load_config
from mtop.dialer import Dialer
from mtop.interfaces import ISettingsConsumer
from mtop.listeners import QUIC_LONGEST_IDLE, TLSListener, quic_idle_timeout
from mtop.logs import LEVELS, _predicate, set_level
from mtop.reload import ConfigReloader
from mtop.server import TunnelFactory
from mtop.settings import LogLevel, restart_needed, runtime_settings

BASE = """
server:
  listen: "127.0.0.1:0"
  crt: {crt}
  key: {key}
  handshake_timeout: 3
acl:
  allow: ["127.0.0.0/8"]
db:
  dsn: {db}
"""


@pytest.fixture
def tree(tmp_path):
    paths = init_certs(str(tmp_path / "certs"), ["localhost"], ["127.0.0.1"])
    config = tmp_path / "mtop.yaml"
    text = BASE.format(crt=paths.server_crt, key=paths.server_key, db=tmp_path / "mtop.db")
    config.write_text(text)
    (tmp_path / "mtop.db").touch()  # the tap refuses a missing SQLite database
    options = tap.Options()
    options.parseOptions(["--config", str(config)])
    root = tap.makeService(options, MemoryReactorClock())
    (reloader,) = [s for s in root if isinstance(s, ConfigReloader)]
    yield config, text, reloader
    set_level("info")  # what makeService set (a reload may have changed it)


def consumer(reloader, kind):
    (found,) = [c for c in reloader.consumers if isinstance(c, kind)]
    return found


def messages(events):
    from twisted.logger import formatEvent

    return [formatEvent(e) for e in events]


def test_every_consumer_provides_the_interface(tree):
    _, _, reloader = tree
    kinds = {type(c) for c in reloader.consumers}
    assert {LogLevel, Authenticator, Dialer, TunnelFactory, ClientListWatcher, TLSListener} <= kinds
    assert isinstance(reloader.consumers[0], LogLevel)  # first: the others log under the new level
    for item in reloader.consumers:
        assert verifyObject(ISettingsConsumer, item)


def test_start_up_delivers_the_settings_the_config_gives(tree):
    config, _, reloader = tree
    factory = consumer(reloader, TunnelFactory)
    settings = runtime_settings(load_config(str(config)))
    assert factory.settings == settings.tunnel and factory.settings.handshake_timeout == 3
    assert factory.limits.settings == settings.limits
    assert factory.throttle.settings == settings.throttle
    assert factory.login_gate.limit == settings.throttle.max_in_flight
    assert factory.dialer.acl.refusal("127.0.0.1", 80) is None
    assert factory.dialer.connect_timeout == settings.connect_timeout
    auth = consumer(reloader, Authenticator)
    assert (auth.cache_ttl, auth.query_timeout, auth.outage_grace) == (5.0, 5.0, 600.0)


def test_reload_applies_acl_limits_throttle_and_timeouts(tree, events):
    config, text, reloader = tree
    factory = consumer(reloader, TunnelFactory)
    assert factory.dialer.acl.refusal("127.0.0.1", 80) is None
    config.write_text(
        text.replace('allow: ["127.0.0.0/8"]', 'deny_ports: [25]')
        .replace("handshake_timeout: 3", "handshake_timeout: 7\n  fallback: 127.0.0.1:8080\n  connect_timeout: 4")
        .replace("  dsn:", "  cache_ttl: 9\n  query_timeout: 2\n  outage_grace: 30\n  dsn:")
        + "limits: {max_per_client: 5}\nauth_throttle: {max_failures: 2, max_in_flight: 3}\nlog: {level: debug}\n"
    )
    auth = consumer(reloader, Authenticator)
    from mtop.auth import _Verified

    now = auth.clock.seconds()
    auth._cache["someone"] = _Verified(b"t", now, now + 5, now + 600, None, b"s")
    auth._cache["long-ago"] = _Verified(b"t", now - 100, now + 5, now + 600, None, b"s")
    assert reloader.reload()
    assert factory.dialer.acl.refusal("127.0.0.1", 80) is not None
    assert factory.dialer.acl.refusal("1.1.1.1", 25) is not None
    assert factory.dialer.connect_timeout == 4
    assert factory.limits.settings.max_per_client == 5
    assert factory.throttle.settings.max_failures == 2
    assert factory.login_gate.limit == 3
    assert factory.settings.handshake_timeout == 7 and factory.settings.fallback == ("127.0.0.1", 8080)
    assert (auth.cache_ttl, auth.query_timeout, auth.outage_grace) == (9, 2, 30)
    # Kept within the new bounds (30 s of grace), each to be read again.
    assert list(auth._cache) == ["someone"] and auth._cache["someone"].fresh_until <= now
    assert auth._cache["someone"].stale_until == now + 30
    assert _predicate.logLevelForNamespace(None) == LEVELS["debug"]
    assert any(m.startswith("config reloaded from ") for m in messages(events))


def test_reload_replaces_the_client_lists(tree, tmp_path):
    config, text, reloader = tree
    factory = consumer(reloader, TunnelFactory)
    watcher = consumer(reloader, ClientListWatcher)
    assert not factory.client_lists.refused("192.0.2.7")
    listed = tmp_path / "deny.txt"
    listed.write_text("192.0.2.0/24\n")
    config.write_text(text + f"clients:\n  deny: [{listed}]\n")
    assert reloader.reload()
    assert factory.client_lists.refused("192.0.2.7")
    assert watcher.lists is factory.client_lists and list(watcher.paths) == [str(listed)]


def test_reload_of_a_broken_file_changes_nothing(tree, events):
    config, text, reloader = tree
    factory = consumer(reloader, TunnelFactory)
    before = (factory.settings, factory.dialer.acl, reloader.config)
    config.write_text(text.replace("handshake_timeout: 3", "handshake_timeout: never"))
    assert not reloader.reload()
    assert (factory.settings, factory.dialer.acl, reloader.config) == before
    config.write_text(text.replace("crt: ", "crt: /nonexistent"))
    assert not reloader.reload()
    rejected = [m for m in messages(events) if m.startswith("config reload rejected")]
    assert len(rejected) == 2 and "server.handshake_timeout" in rejected[0] and "/nonexistent" in rejected[1]


def test_listener_and_database_changes_need_a_restart(tree, events):
    config, text, reloader = tree
    config.write_text(text.replace('"127.0.0.1:0"', '"127.0.0.1:9"').replace("mtop.db", "other.db"))
    assert reloader.reload()
    (warning,) = [m for m in messages(events) if "need a restart" in m]
    assert "listeners and db" in warning


def test_a_changed_log_format_needs_a_restart(tree, events):
    """twistd's log observer is chosen at start: the reload says so rather
    than "config reloaded" alone."""
    config, text, reloader = tree
    config.write_text(text + "log:\n  format: json\n")
    assert reloader.reload()
    (warning,) = [m for m in messages(events) if "need a restart" in m]
    assert warning.endswith("but changes to log.format need a restart")


def test_restart_is_judged_against_what_runs(tree, events):
    """A refused change, then the file restored: the second reload applies
    cleanly (it compares with the running config, not the last file)."""
    config, text, reloader = tree
    reloader.startService()  # as under twistd (the SIGHUP handler is its own)
    try:
        config.write_text(text.replace('"127.0.0.1:0"', '"127.0.0.1:9"'))
        assert reloader.reload()
        (warning,) = [m for m in messages(events) if "need a restart" in m]
        assert warning.endswith("but changes to listeners need a restart")
        events.clear()
        config.write_text(text)
        assert reloader.reload()
        assert not [m for m in messages(events) if "need a restart" in m]
        assert any(m.startswith("config reloaded from ") for m in messages(events))
    finally:
        reloader.stopService()


def test_a_reload_that_needs_a_restart_still_renews_the_certificate(tree, tmp_path, events):
    config, text, reloader = tree
    listener = consumer(reloader, TLSListener)
    before = listener.current_security()
    renewed = init_certs(str(tmp_path / "renewed"), ["localhost"], ["127.0.0.1"])
    changed = text.replace('"127.0.0.1:0"', '"127.0.0.1:9"').replace("mtop.db", "other.db")
    crt, key = (line.split(": ", 1)[1] for line in text.splitlines() if line.strip().startswith(("crt:", "key:")))
    config.write_text(changed.replace(crt, renewed.server_crt).replace(key, renewed.server_key))
    assert reloader.reload()
    assert any("need a restart" in m for m in messages(events))
    assert listener.current_security() is not before


def test_restart_needed_names_each_part(tmp_path):
    from mtop.config import load_config_data

    base = {"server": {"listen": ":8443", "crt": "a", "key": "b"}}
    running = load_config_data(base, str(tmp_path / "m.yaml"), check_files=False)
    assert restart_needed(running, running) == []
    other = {
        "server": {"listen": ":8444", "crt": "c", "key": "d", "workers": 2, "handshake_timeout": 1},
        "db": {"dsn": "x.db"},
        "metrics": {"listen": "127.0.0.1:9100"},
    }
    new = load_config_data(other, str(tmp_path / "m.yaml"), check_files=False)
    assert restart_needed(running, new) == ["listeners", "db", "metrics", "workers"]
    # Certificates and timeouts are reloaded, not restarted for.
    same_shape = load_config_data(
        {"server": {"listen": ":8443", "crt": "c", "key": "d", "handshake_timeout": 1}}, str(tmp_path / "m.yaml"), check_files=False
    )
    assert restart_needed(running, same_shape) == []


def test_quic_idle_timeout_is_derived_from_the_tunnels_one(tmp_path):
    from mtop.config import load_config_data

    def server(**keys):
        return load_config_data({"server": {"crt": "a", "key": "b", **keys}}, str(tmp_path / "m.yaml"), check_files=False).server

    assert quic_idle_timeout(server()) == 300
    assert quic_idle_timeout(server(idle_timeout="90s")) == 90
    assert quic_idle_timeout(server(idle_timeout=0)) == QUIC_LONGEST_IDLE


def test_a_running_listener_finds_its_new_certificate():
    from mtop.config import ListenAddress, ListenerConfig
    from mtop.listeners import PreparedListener
    from mtop.settings import RuntimeSettings

    def listener(kind, port):
        return ListenerConfig(kind, ListenAddress("127.0.0.1", port), "c", "k", "mtop")

    def settings(*prepared):
        return RuntimeSettings(
            tunnel=None, connect_timeout=0, acl=None, limits=None, throttle=None, auth=None,
            log_level="info", clients=None, client_lists=None,
            listeners=tuple(PreparedListener(item, name) for item, name in prepared),
        )

    new = settings((listener("quic", 9443), "quic"), (listener("tls", 8443), "tls"))
    # Same type and address, wherever it is now.
    assert new.listener_security(listener("tls", 8443), 0) == "tls"
    assert new.listener_security(listener("quic", 9443), 1) == "quic"
    # Moved (needs a restart): the same type at the same place.
    assert new.listener_security(listener("tls", 7443), 1) == "tls"
    # Never another type's.
    assert new.listener_security(listener("tls", 7443), 0) is None
    assert settings().listener_security(listener("tls", 8443), 0) is None
