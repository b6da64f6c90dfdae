"""The config reload (what SIGHUP runs) on the service tree `makeService`
builds, without starting it."""

import pytest

from mtop import tap
from mtop.certs import init_certs
from mtop.reload import ConfigReloader

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
    options = tap.Options()
    options.parseOptions(["--config", str(config)])
    root = tap.makeService(options)
    (reloader,) = [s for s in root if isinstance(s, ConfigReloader)]
    return config, text, reloader


def messages(events):
    from twisted.logger import formatEvent

    return [formatEvent(e) for e in events]


def test_reload_applies_acl_limits_throttle_and_timeouts(tree, events):
    config, text, reloader = tree
    factory = reloader.factory
    assert factory.dialer.acl.refusal("127.0.0.1", 80) is None
    config.write_text(
        text.replace('allow: ["127.0.0.0/8"]', 'deny_ports: [25]')
        .replace("handshake_timeout: 3", "handshake_timeout: 7\n  fallback: 127.0.0.1:8080")
        + "limits: {max_per_client: 5}\nauth_throttle: {max_failures: 2}\n"
    )
    assert reloader.reload()
    assert factory.dialer.acl.refusal("127.0.0.1", 80) is not None
    assert factory.dialer.acl.refusal("1.1.1.1", 25) is not None
    assert factory.limits.settings.max_per_client == 5
    assert factory.throttle.settings.max_failures == 2
    assert factory.settings.handshake_timeout == 7 and factory.settings.fallback == ("127.0.0.1", 8080)
    assert any(m.startswith("config reloaded from ") for m in messages(events))


def test_reload_of_a_broken_file_changes_nothing(tree, events):
    config, text, reloader = tree
    before = (reloader.factory.settings, reloader.factory.dialer.acl, reloader.config)
    config.write_text(text.replace("handshake_timeout: 3", "handshake_timeout: never"))
    assert not reloader.reload()
    assert (reloader.factory.settings, reloader.factory.dialer.acl, reloader.config) == before
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
