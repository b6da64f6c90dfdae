"""climber.yaml loading: the original's keys, our additions, and errors that
name the key."""

import pathlib

import pytest
import yaml
from twisted.python import usage

from climber.config import ConfigError, ListenAddress, load_climber_config, load_climber_data
from climber.tap import Options
from mtop.urls import ServerLink, make_url

ORIGINAL = """
log:
  level: info
http:
  listen: ":8080"
socks5:
  listen: ":1080"
  timeout: 10s
servers:
  - host: "example.com:443"
    type: tls
    username: test111
    password: "123456"
    ca: ""
    proto: mtop
    enabled: true
  - host: "backup.example.com:8443"
    type: tls
    username: test111
    password: "123456"
    enabled: false
"""


def load(text, path=None):
    return load_climber_data(yaml.safe_load(text), path)


def test_an_original_climber_yaml_loads_unchanged():
    config = load(ORIGINAL)
    assert config.warnings == ()
    # ":port" means loopback for a local proxy.
    assert config.socks5.listen == ListenAddress("127.0.0.1", 1080)
    assert config.http.listen == ListenAddress("127.0.0.1", 8080)
    assert config.socks5.timeout == 10.0
    assert config.strategy == "random"
    first, second = config.servers
    assert (first.host, first.port, first.username, first.password) == ("example.com", 443, "test111", "123456")
    assert first.proto == "mtop" and first.ca == "" and not first.insecure and not first.pipelining
    assert not second.enabled
    assert config.usable_servers == (first,)


def test_the_shipped_example_is_valid():
    path = pathlib.Path(__file__).resolve().parents[1] / "etc" / "climber" / "climber.yaml"
    config = load_climber_config(str(path))
    assert config.socks5 and config.http and config.usable_servers


def test_password_is_not_in_repr():
    config = load(ORIGINAL)
    assert "123456" not in repr(config)


def test_urls_share_parser_with_mtopctl(tmp_path):
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    link = make_url(ServerLink("a@b", "p:w/d", "2001:db8::1", 8443, "tls", "mtop-x"))
    config = load(
        f"""
socks5: {{}}
servers:
  - urls: ["{link}", "mtop://bob:pw@h.example:443/tls"]
    ca: ca.crt
    sni: front.example
""",
        str(tmp_path / "climber.yaml"),
    )
    first, second = config.servers
    assert (first.username, first.password, first.host, first.port, first.proto) == (
        "a@b", "p:w/d", "2001:db8::1", 8443, "mtop-x")
    assert first.ca == str(ca) and second.ca == str(ca)
    assert first.sni == second.sni == "front.example"
    assert second.proto == "mtop"


def test_forward_and_strategy():
    config = load(ORIGINAL + """
strategy: fastest
forward:
  - listen: ":2222"
    target: "git.example.com:22"
""")
    assert config.strategy == "fastest"
    (forward,) = config.forwards
    assert (forward.listen, forward.host, forward.port) == (ListenAddress("127.0.0.1", 2222), "git.example.com", 22)


def test_host_without_port_defaults_to_443():
    config = load("socks5: {}\nservers: [{host: example.com, username: u, password: p}]")
    assert config.servers[0].port == 443


def test_quic_servers_are_used_with_a_stream_cap():
    config = load(ORIGINAL.replace("type: tls\n    username: test111\n    password: \"123456\"\n    ca", "type: quic\n    max_streams: 7\n    username: test111\n    password: \"123456\"\n    ca", 1)
                  .replace("enabled: false", "enabled: true"))
    assert [(s.type, s.max_streams) for s in config.usable_servers] == [("quic", 7), ("tls", 100)]
    assert not any("quic" in w for w in config.warnings)


def test_max_streams_must_be_a_count():
    with pytest.raises(ConfigError, match=r"servers\[0\]\.max_streams: 0 is not a number of streams"):
        load("socks5: {}\nservers: [{host: 'a:1', username: u, password: p, type: quic, max_streams: 0}]")


def test_open_listener_without_auth_warns():
    config = load(ORIGINAL.replace('listen: ":1080"', 'listen: "0.0.0.0:1080"'))
    assert any("socks5.listen" in w and "anyone" in w for w in config.warnings)


@pytest.mark.parametrize(
    "text,message",
    [
        ("socks5: {}\nservers: []", "no enabled server"),
        ("servers: [{host: 'a:1', username: u, password: p}]", "nothing to listen on"),
        ("socks5: {}\nservers: [{host: 'a:1', password: p}]", "servers[0].username"),
        ("socks5: {}\nservers: [{username: u, password: p}]", "servers[0]: a server needs host"),
        ("socks5: {}\nservers: [{host: 'a:99999', username: u, password: p}]", "servers[0].host"),
        ("socks5: {}\nservers: [{url: 'http://x', username: u}]", "servers[0]"),
        ("socks5: {}\nservers: [{url: 'mtop://u:p@h:1/tls'}]\nstrategy: best", "strategy: 'best'"),
        ("socks5: {listen: nowhere}\nservers: [{url: 'mtop://u:p@h:1/tls'}]", "socks5.listen"),
        ("socks5: {username: u}\nservers: [{url: 'mtop://u:p@h:1/tls'}]", "socks5: set both"),
        ("socks5: {listen: ':1'}\nhttp: {listen: ':1'}\nservers: [{url: 'mtop://u:p@h:1/tls'}]", "already used"),
        ("socks5: {}\nservers: [{url: 'mtop://u:p@h:1/tls', ca: /nonexistent/ca.pem}]", "servers[0].ca"),
        ("socks5: {}\nforward: [{listen: ':2'}]\nservers: [{url: 'mtop://u:p@h:1/tls'}]", "forward[0]"),
    ],
)
def test_errors_name_the_key(text, message):
    with pytest.raises(ConfigError) as info:
        load(text)
    assert message in str(info.value)


def test_unknown_keys_warn():
    config = load(ORIGINAL + "colour: blue\n")
    assert config.warnings == ("unknown key colour ignored",)


def parse_options(*argv):
    options = Options()
    options.parseOptions(list(argv))
    return options.config_data


def test_command_line_without_a_file():
    config = parse_options("--server", "mtop://u:p@127.0.0.1:4433/tls?proto=mtop", "--insecure")
    assert config.socks5.listen == ListenAddress("127.0.0.1", 1080)
    assert config.http.listen == ListenAddress("127.0.0.1", 8080)
    (server,) = config.servers
    assert server.insecure and server.port == 4433


def test_command_line_listeners_and_forwards():
    config = parse_options(
        "--server", "mtop://u:p@127.0.0.1:4433/tls", "--server", "mtop://v:q@127.0.0.2:4433/tls",
        "--socks5", "127.0.0.1:1999", "--forward", "127.0.0.1:2222=example.com:22", "--strategy", "round_robin",
    )
    assert len(config.servers) == 2
    assert config.socks5.listen.port == 1999 and config.http is None
    assert config.forwards[0].host == "example.com"
    assert config.strategy == "round_robin"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--server", "mtop://nope"], "no port"),
        (["--server", "mtop://u:p@h:1/tls", "--forward", "2222"], "LISTEN=TARGET"),
        (["--config", "/nonexistent/climber.yaml"], "cannot read config file"),
    ],
)
def test_command_line_errors_are_usage_errors(argv, message):
    with pytest.raises(usage.UsageError) as info:
        parse_options(*argv)
    assert message in str(info.value)


# ---------------------------------------------------------------------------
# Issue 17: bare ports, near-miss keys, links kept out of ps.

LINK = "mtop://alice:Secret-pw-5b1e@127.0.0.1:4433/tls?proto=mtop"


@pytest.mark.parametrize(
    "text,key",
    [
        ("socks5: {listen: 1080}", "socks5.listen"),
        ("http: {listen: '8080'}", "http.listen"),
        ("socks5: {}\nforward: [{listen: 2222, target: 'h:22'}]", "forward[0].listen"),
    ],
)
def test_a_bare_port_is_an_error_with_both_spellings(text, key):
    with pytest.raises(ConfigError) as info:
        load(text + "\nservers: [{url: 'mtop://u:p@h:1/tls'}]")
    message = str(info.value)
    port = message.split()[1]
    assert message.startswith(f"{key}: {port} is a port without an address")
    # ':port' is loopback in climber, so "all interfaces" is spelled 0.0.0.0.
    assert f"'0.0.0.0:{port}' to listen on all interfaces or '127.0.0.1:{port}' for this machine only" in message


def test_a_bare_metrics_port_is_an_error():
    with pytest.raises(ConfigError, match=r"metrics.listen: 9100 .*':9100' to listen on all interfaces"):
        load(ORIGINAL + "metrics: {listen: 9100}\n")


@pytest.mark.parametrize(
    "text,message",
    [
        (ORIGINAL + "socks: {listen: ':1'}\n", "socks: unknown key; did you mean socks5?"),
        (ORIGINAL + "https: {}\n", "https: unknown key; did you mean http?"),
        (ORIGINAL.replace("timeout: 10s", "timout: 10s"), "socks5.timout: unknown key; did you mean socks5.timeout?"),
        (ORIGINAL.replace("    enabled: false", "    Enabled: false"), "did you mean servers[1].enabled?"),
        (ORIGINAL.replace("servers:", "server:"), "server: unknown key; did you mean servers?"),
    ],
)
def test_a_key_one_edit_from_a_known_one_is_an_error(text, message):
    with pytest.raises(ConfigError) as info:
        load(text)
    assert message in str(info.value)


def test_the_originals_listener_keys_load_without_a_warning():
    text = ORIGINAL.replace('  listen: ":8080"', '  listen: ":8080"\n  timeout: 5s\n  username: u\n  password: p')
    text = text.replace("  timeout: 10s", "  timeout: 10s\n  username: u\n  password: p")
    assert load(text).warnings == ()


def test_links_from_a_file(tmp_path, monkeypatch):
    monkeypatch.delenv("CLIMBER_SERVERS", raising=False)
    links = tmp_path / "links"
    links.write_text(f"# my servers\n\n  {LINK}#home  \n# {LINK}\nmtop://bob:pw@127.0.0.2:443/tls\n")
    options = Options()
    options.parseOptions(["--server-file", str(links), "--insecure"])
    servers = options.config_data.servers
    assert [(s.host, s.username, s.password) for s in servers] == [
        ("127.0.0.1", "alice", "Secret-pw-5b1e"),
        ("127.0.0.2", "bob", "pw"),
    ]
    assert all(s.insecure for s in servers)
    assert options.config_data.socks5 and options.config_data.http
    assert not [w for w in options.config_data.warnings if "ps" in w]


def test_links_from_the_environment(monkeypatch):
    monkeypatch.setenv("CLIMBER_SERVERS", f"{LINK}\n  mtop://bob:pw@127.0.0.2:443/tls ")
    config = parse_options("--insecure")
    assert [s.username for s in config.servers] == ["alice", "bob"]
    assert config.warnings == ()


def test_a_password_on_the_command_line_warns_once(monkeypatch):
    monkeypatch.delenv("CLIMBER_SERVERS", raising=False)
    config = parse_options("--server", LINK, "--server", "mtop://bob:pw@127.0.0.2:443/tls", "--insecure")
    (warning,) = config.warnings
    assert "shown to every local user by ps" in warning and "--server-file" in warning
    assert "Secret-pw-5b1e" not in warning


def test_the_help_says_server_shows_the_password():
    help_text = str(Options())
    assert "ps" in help_text and "--server-file" in help_text and "CLIMBER_SERVERS" in help_text


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "--server-file: cannot read"),
        ("# nothing here\n", "holds no mtop:// link"),
        ("mtop://nope\n", "no port"),
    ],
)
def test_a_bad_server_file_is_a_usage_error(tmp_path, monkeypatch, content, message):
    monkeypatch.delenv("CLIMBER_SERVERS", raising=False)
    path = tmp_path / "links"
    if content is not None:
        path.write_text(content)
    with pytest.raises(usage.UsageError) as info:
        parse_options("--server-file", str(path))
    assert message in str(info.value)


def test_wss_servers():
    config = load(
        "socks5:\n  listen: 127.0.0.1:1080\nservers:\n"
        "  - host: cdn.example.com:443\n    type: wss\n    username: u\n    password: p\n"
        "    path: /t\n    sni: front.example.com\n    ping_interval: 20\n"
        "  - url: 'mtop://u:p@cdn.example.com:8443/wss?path=/x&host=origin.example.com'\n"
        "    prewarm: 0\n"
    )
    first, second = config.servers
    # Prewarmed as TLS servers are (through the upgrade), unless told not to.
    assert (first.type, first.path, first.ws_host, first.ping_interval, first.prewarm) == ("wss", "/t", None, 20.0, 2)
    assert second.prewarm == 0
    assert first.host_header == "front.example.com"
    assert (second.path, second.ws_host, second.host_header) == ("/x", "origin.example.com", "origin.example.com")
    plain = load("socks5:\n  listen: 127.0.0.1:1080\nservers:\n  - host: 203.0.113.5:8443\n    type: wss\n    username: u\n    password: p\n")
    assert (plain.servers[0].path, plain.servers[0].host_header) == ("/", "203.0.113.5:8443")


@pytest.mark.parametrize(
    "entry, message",
    [
        ("type: quic\n    prewarm: 2", r"prewarm: server cdn.example.com:443 is QUIC"),
        ("type: tls\n    path: /t", r"path: server cdn.example.com:443 is tls; only type: wss"),
        ("type: wss\n    path: t", r"path: 't' is not a request path"),
    ],
)
def test_wss_errors_name_the_key(entry, message):
    with pytest.raises(ConfigError, match=message):
        load(f"servers:\n  - host: cdn.example.com:443\n    username: u\n    password: p\n    {entry}\n")
