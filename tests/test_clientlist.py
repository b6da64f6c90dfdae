"""Client address allow and block lists (`mtop.clientlist`) and their
``clients:`` configuration."""

import ipaddress
import os
import pathlib

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.application.service import IService
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from mtop.clientlist import (
    ClientListError,
    ClientLists,
    ClientListWatcher,
    load_client_lists,
    parse_network,
)
from mtop.config import ClientsConfig, ConfigError, load_config_data

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "etc" / "mtop" / "mtop.yaml"


# Semantics


def test_no_entries_refuses_nothing():
    lists = ClientLists()
    assert lists.empty
    assert not lists.refused("203.0.113.5")
    assert not lists.refused("2001:db8::1")
    assert lists.refusal("203.0.113.5") is None


def test_deny_only_refuses_the_denied_and_admits_the_rest():
    lists = ClientLists(deny=["203.0.113.0/24", "2001:db8::/32"])
    assert lists.refused("203.0.113.77")
    assert lists.refused("2001:db8:ffff::1")
    assert not lists.refused("203.0.114.1")
    assert not lists.refused("2001:db9::1")
    assert lists.refusal("203.0.113.77") == "203.0.113.77 is in the denied client network 203.0.113.0/24"


def test_allow_only_refuses_what_it_does_not_name_in_either_family():
    lists = ClientLists(allow=["198.51.100.0/24"])
    assert not lists.refused("198.51.100.9")
    assert lists.refused("198.51.101.9")
    assert lists.refused("2001:db8::1")  # no IPv6 network allowed
    assert lists.refusal("198.51.101.9") == "198.51.101.9 is not in an allowed client network"
    assert not ClientLists(allow=["198.51.100.0/24", "::/0"]).refused("2001:db8::1")


def test_the_most_specific_entry_wins():
    lists = ClientLists(allow=["10.1.2.0/24", "10.1.2.3"], deny=["10.0.0.0/8", "10.1.2.0/28"])
    assert lists.refused("10.9.9.9")  # only the /8 matches
    assert not lists.refused("10.1.2.200")  # the allowed /24 inside the denied /8
    assert lists.refused("10.1.2.4")  # the denied /28 inside the allowed /24
    assert not lists.refused("10.1.2.3")  # the allowed /32 inside the denied /28
    assert lists.refused("11.0.0.1")  # an allow list names nothing here


def test_deny_wins_a_tie():
    lists = ClientLists(allow=["192.0.2.0/24", "2001:db8::/48"], deny=["192.0.2.0/24", "2001:db8::/48"])
    assert lists.refused("192.0.2.1")
    assert lists.refused("2001:db8::1")
    assert (lists.allow_count, lists.deny_count) == (0, 2)


def test_host_bits_of_an_entry_are_dropped():
    lists = ClientLists(deny=["192.0.2.77/24"])
    assert lists.refused("192.0.2.1")


def test_ipv6_networks():
    lists = ClientLists(deny=["2001:db8::/32"], allow=["2001:db8:1::/48"])
    assert lists.refused("2001:db8:2::1")
    assert not lists.refused("2001:db8:1::1")
    assert lists.refused("2001:db9::1")  # an allow list names nothing here
    assert lists.refusal("2001:db8:2::1") == "2001:db8:2::1 is in the denied client network 2001:db8::/32"


def test_ipv4_mapped_clients_and_entries_are_judged_as_ipv4():
    lists = ClientLists(deny=["203.0.113.0/24", "::ffff:198.51.100.0/120"])
    assert lists.refused("::ffff:203.0.113.5")
    assert lists.refused("198.51.100.9")
    assert lists.refused("::ffff:198.51.100.9")
    assert not lists.refused("::ffff:203.0.114.5")
    assert lists.refusal("::ffff:203.0.113.5") == "::ffff:203.0.113.5 is in the denied client network 203.0.113.0/24"


def test_a_zone_index_is_ignored():
    lists = ClientLists(deny=["fe80::/10"])
    assert lists.refused("fe80::1%eth0")
    assert lists.refusal("fe80::1%eth0") == "fe80::1%eth0 is in the denied client network fe80::/10"


@pytest.mark.parametrize("host", ["/run/mtop.sock", "", "localhost", "1.2.3", "[::1]", "::g", b"1.2.3.4", None, "1.2.3.4\0"])
def test_what_is_not_an_ip_address_is_never_refused(host):
    lists = ClientLists(allow=["192.0.2.0/24"], deny=["0.0.0.0/0", "::/0"])
    assert not lists.refused(host)
    assert lists.refusal(host) is None


def test_the_whole_address_space():
    lists = ClientLists(deny=["0.0.0.0/0", "::/0"], allow=["0.0.0.0/32", "255.255.255.255", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"])
    assert not lists.refused("0.0.0.0")
    assert lists.refused("0.0.0.1")
    assert lists.refused("255.255.255.254")
    assert not lists.refused("255.255.255.255")
    assert lists.refused("::")
    assert not lists.refused("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")


def test_lists_cannot_be_changed():
    lists = ClientLists(deny=["192.0.2.0/24"])
    with pytest.raises(AttributeError):
        lists.deny_count = 0


@pytest.mark.parametrize("text", ["192.0.2.0/33", "2001:db8::/129", "192.0.2.0/-1", "192.0.2", "fe80::1%eth0", "x", ""])
def test_bad_networks_are_errors(text):
    assert parse_network(text) is None
    with pytest.raises(ClientListError, match="is not a network; use CIDR like"):
        ClientLists(deny=[text])


def test_netmask_forms_are_networks():
    assert parse_network("192.0.2.0/255.255.255.0") == parse_network("192.0.2.0/24")
    assert parse_network(" 192.0.2.1 ") == (32, int(ipaddress.IPv4Address("192.0.2.1")), 32)


# The fast lookup against a scan of every entry

_v4_networks = st.builds(
    lambda value, prefix: ipaddress.IPv4Network((value, prefix), strict=False),
    # a few shared values make nested and equal networks common
    st.integers(0, 2**32 - 1) | st.sampled_from([0, 0x0A010203, 0x0A01FFFF, 0xC0000280, 2**32 - 1]),
    st.integers(0, 32),
)
_v6_networks = st.builds(
    lambda value, prefix: ipaddress.IPv6Network((value, prefix), strict=False),
    st.integers(0, 2**128 - 1)
    | st.sampled_from([0, 0x20010DB8 << 96 | 1, 0x20010DB8 << 96 | 0xFFFF << 64, 2**128 - 1])
    | st.sampled_from([0, 0x0A010203, 0xC0000280]).map(lambda v: 0xFFFF << 32 | v),  # IPv4-mapped
    st.integers(0, 128),
)
_networks = st.lists(st.one_of(_v4_networks, _v6_networks), max_size=12)


def _as_ipv4(address):
    return address.ipv4_mapped if address.version == 6 and address.ipv4_mapped is not None else address


def _as_ipv4_network(net):
    if net.version == 6 and net.prefixlen >= 96 and net.network_address.ipv4_mapped is not None:
        return ipaddress.IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
    return net


def naive_refused(allow, deny, host):
    """The definition: the longest matching network decides, deny wins a
    tie; no match: refused if there is an allow list."""
    address = _as_ipv4(ipaddress.ip_address(host))
    best = None
    for nets, denied in ((allow, False), (deny, True)):
        for net in map(_as_ipv4_network, nets):
            if net.version == address.version and address in net:
                candidate = (net.prefixlen, denied)
                best = candidate if best is None or candidate > best else best
    return best[1] if best is not None else bool(allow)


@st.composite
def _addresses_near(draw, networks):
    """Addresses inside, at the edges of, and next to the networks, and
    random ones."""
    if networks and draw(st.booleans()):
        net = draw(st.sampled_from(networks))
        value = draw(
            st.sampled_from(
                [int(net.network_address), int(net.broadcast_address), int(net.network_address) - 1, int(net.broadcast_address) + 1]
            )
            | st.integers(int(net.network_address), int(net.broadcast_address))
        )
        top = 2**net.max_prefixlen - 1
        value = min(max(value, 0), top)
        return str(ipaddress.ip_address(value) if net.version == 6 else ipaddress.IPv4Address(value))
    if draw(st.booleans()):
        return str(ipaddress.IPv4Address(draw(st.integers(0, 2**32 - 1))))
    return str(ipaddress.IPv6Address(draw(st.integers(0, 2**128 - 1))))


@settings(max_examples=300, deadline=None)
@given(st.data(), _networks, _networks)
def test_lookup_agrees_with_a_scan_of_every_entry(data, allow, deny):
    lists = ClientLists(allow=[str(n) for n in allow], deny=[str(n) for n in deny])
    for _ in range(20):
        host = data.draw(_addresses_near(allow + deny))
        expected = naive_refused(allow, deny, host)
        assert lists.refused(host) is expected, host
        assert (lists.refusal(host) is not None) is expected
        mapped = _as_ipv4(ipaddress.ip_address(host))
        if mapped.version == 4:  # the same client as ::ffff:a.b.c.d
            assert lists.refused(f"::ffff:{mapped}") is expected


# List files


def test_list_files_skip_comments_and_blank_lines(tmp_path):
    drop = tmp_path / "drop.txt"
    drop.write_text(
        "; Spamhaus DROP List 2024/01/01\n"
        "; Last-Modified: Mon, 01 Jan 2024 00:00:00 GMT\n"
        "1.10.16.0/20 ; SBL256894\n"
        "\n"
        "   \n"
        "# FireHOL style\n"
        "203.0.113.7   # one scanner\n"
        "2001:db8:bad::/48\n"
        "\t198.51.100.0/24\t;tab\r\n"
    )
    lists = load_client_lists(deny=[str(drop)])
    assert lists.deny_count == 4
    for host in ("1.10.20.1", "203.0.113.7", "2001:db8:bad::1", "198.51.100.3"):
        assert lists.refused(host)
    assert not lists.refused("203.0.113.8")
    assert [path for path, _ in lists.files] == [str(drop)]


def test_an_allow_list_file_without_networks_admits_nobody(tmp_path):
    office = tmp_path / "office.txt"
    office.write_text("# nothing yet\n")
    lists = load_client_lists(allow=[str(office)])
    assert not lists.empty and lists.allow_count == 0
    assert lists.refused("198.51.100.1") and lists.refused("2001:db8::1")
    assert load_client_lists(deny=[str(office)]).empty


def test_a_bad_line_names_the_file_and_line(tmp_path):
    drop = tmp_path / "drop.txt"
    drop.write_text("192.0.2.0/24\n# fine\n10.0.0.0/33 ; SBL1\n")
    with pytest.raises(ClientListError) as e:
        load_client_lists(deny=[str(drop)])
    assert str(e.value) == (
        f"{drop}:3: '10.0.0.0/33' is not a network or address; "
        "use CIDR like '192.0.2.0/24' or '2001:db8::/32', or one address"
    )


def test_a_missing_file_is_an_error(tmp_path):
    with pytest.raises(ClientListError, match=r"'.*nope\.txt' is neither a network nor a readable list file \(No such file"):
        load_client_lists(deny=[str(tmp_path / "nope.txt")])


def test_a_directory_is_not_a_list_file(tmp_path):
    with pytest.raises(ClientListError, match="is neither a network nor a readable list file"):
        load_client_lists(allow=[str(tmp_path)])


def test_relative_paths_are_relative_to_the_base(tmp_path):
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "office.txt").write_text("198.51.100.0/24\n")
    lists = load_client_lists(allow=["lists/office.txt", "192.0.2.1"], base=str(tmp_path))
    assert not lists.refused("198.51.100.1")
    assert not lists.refused("192.0.2.1")
    assert lists.refused("192.0.2.2")
    assert lists.files[0][0] == str(tmp_path / "lists" / "office.txt")


def test_a_large_list_loads_quickly(tmp_path):
    import random
    import time

    rng = random.Random(7)
    drop = tmp_path / "big.txt"
    lines = [f"{ipaddress.IPv4Address(rng.getrandbits(32) & ~0xFF)}/24 ; SBL{i}" for i in range(100_000)]
    drop.write_text("\n".join(lines) + "\n")
    started = time.perf_counter()
    lists = load_client_lists(deny=[str(drop)])
    # generous: the benchmark measures it (about 0.2 s); this only catches a scan per line
    assert time.perf_counter() - started < 5
    assert lists.refused(lines[1234].split("/")[0])


# The watcher


@pytest.fixture
def watched(tmp_path):
    """A watcher of one deny list file, on a Clock; yields (watcher, clock,
    file, handed-over lists)."""
    drop = tmp_path / "drop.txt"
    drop.write_text("203.0.113.0/24\n")
    clients = ClientsConfig(deny=(str(drop), "192.0.2.1"))
    handed = []
    clock = Clock()
    watcher = ClientListWatcher(clients, ClientLists.from_config(clients), handed.append, clock, interval=5)
    watcher.startService()
    yield watcher, clock, drop, handed
    watcher.stopService()


def _messages(events, level_name):
    from twisted.logger import formatEvent

    return [formatEvent(e) for e in events if e.get("log_level") is not None and e["log_level"].name == level_name and "client lists" in formatEvent(e)]


def test_watcher_is_a_service(watched):
    verifyObject(IService, watched[0])


def test_a_changed_file_is_reloaded_and_handed_over(watched, events):
    watcher, clock, drop, handed = watched
    clock.advance(5)
    assert handed == []  # nothing changed
    drop.write_text("203.0.113.0/24\n198.51.100.0/24\n")
    os.utime(drop, ns=(10**18, 10**18))  # a new mtime whatever the file system's granularity
    clock.advance(4)
    assert handed == []
    clock.advance(1)
    assert len(handed) == 1
    lists = handed[0]
    assert lists.refused("198.51.100.1") and lists.refused("192.0.2.1") and lists.refused("203.0.113.1")
    assert watcher.lists is lists
    assert _messages(events, "info") == [f"client lists loaded: 0 networks allowed, 3 denied, from {drop}"]
    clock.advance(5)
    assert len(handed) == 1  # and not again


def test_a_replaced_file_is_reloaded(watched, tmp_path):
    watcher, clock, drop, handed = watched
    new = tmp_path / "drop.txt.new"
    new.write_text("203.0.113.0/24\n")  # the same text, a new inode
    os.replace(new, drop)
    clock.advance(5)
    assert len(handed) == 1


def test_a_broken_edit_keeps_the_running_lists_and_logs_once(watched, events):
    watcher, clock, drop, handed = watched
    running = watcher.lists
    drop.write_text("203.0.113.0/24\nnot an address\n")
    os.utime(drop, ns=(10**18, 10**18))
    clock.advance(5)
    clock.advance(5)
    assert handed == [] and watcher.lists is running
    errors = _messages(events, "error")
    assert errors == [
        f"client lists not reloaded, the running lists stay: {drop}:2: 'not an address' is not a network or address; "
        "use CIDR like '192.0.2.0/24' or '2001:db8::/32', or one address"
    ]
    drop.write_text("198.51.100.0/24\n")  # fixed
    os.utime(drop, ns=(2 * 10**18, 2 * 10**18))
    clock.advance(5)
    assert len(handed) == 1 and handed[0].refused("198.51.100.1") and not handed[0].refused("203.0.113.1")


def test_a_deleted_file_keeps_the_running_lists(watched, events):
    watcher, clock, drop, handed = watched
    drop.unlink()
    clock.advance(5)
    assert handed == [] and watcher.lists.refused("203.0.113.1")
    assert len(_messages(events, "error")) == 1
    drop.write_text("198.51.100.0/24\n")
    clock.advance(5)
    assert len(handed) == 1


def test_a_failing_callback_does_not_stop_the_watcher(tmp_path, events):
    drop = tmp_path / "drop.txt"
    drop.write_text("203.0.113.0/24\n")
    clients = ClientsConfig(deny=(str(drop),))
    calls = []

    def on_change(lists):
        calls.append(lists)
        raise RuntimeError("boom")

    clock = Clock()
    watcher = ClientListWatcher(clients, ClientLists.from_config(clients), on_change, clock)
    watcher.startService()
    for mtime in (10**18, 2 * 10**18):
        os.utime(drop, ns=(mtime, mtime))
        clock.advance(5)
    watcher.stopService()
    assert len(calls) == 2
    assert clock.getDelayedCalls() == []


def test_without_list_files_the_watcher_reads_nothing(events):
    clients = ClientsConfig(deny=("192.0.2.0/24",))
    clock = Clock()
    watcher = ClientListWatcher(clients, ClientLists.from_config(clients), pytest.fail, clock)
    watcher.startService()
    clock.advance(60)
    assert not watcher.check()
    watcher.stopService()
    assert _messages(events, "info") == ["client lists loaded: 0 networks allowed, 1 denied, from the config file"]


# Configuration


def _config(tmp_path, clients):
    (tmp_path / "server.crt").write_text("x")
    (tmp_path / "server.key").write_text("x")
    data = {"server": {"crt": "server.crt", "key": "server.key"}, "clients": clients}
    return load_config_data(data, str(tmp_path / "mtop.yaml"))


def test_config_default_has_no_lists(tmp_path):
    config = _config(tmp_path, None)
    assert config.clients == ClientsConfig()
    assert ClientLists.from_config(config.clients).empty


def test_config_keeps_entries_as_written_with_absolute_paths(tmp_path):
    (tmp_path / "drop.txt").write_text("203.0.113.0/24 ; SBL1\n")
    config = _config(tmp_path, {"allow": ["198.51.100.0/24", "::/0"], "deny": ["drop.txt", "192.0.2.7"]})
    assert config.clients == ClientsConfig(allow=("198.51.100.0/24", "::/0"), deny=(str(tmp_path / "drop.txt"), "192.0.2.7"))
    assert config.warnings == ()
    lists = ClientLists.from_config(config.clients)
    assert lists.refused("203.0.113.9") and lists.refused("192.0.2.7") and lists.refused("192.0.2.8")
    assert not lists.refused("198.51.100.1") and not lists.refused("2001:db8::1")


def test_config_a_bad_entry_names_its_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^clients\.allow\[2\]: '10\.0\.0\.0/33' is not a network; use CIDR"):
        _config(tmp_path, {"allow": ["192.0.2.0/24", "::/0", "10.0.0.0/33"]})


def test_config_a_missing_file_names_its_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^clients\.deny\[0\]: '.*/missing\.txt' is neither a network nor a readable list file"):
        _config(tmp_path, {"deny": ["missing.txt"]})


def test_config_a_bad_file_line_names_the_file_and_line(tmp_path):
    (tmp_path / "drop.txt").write_text("192.0.2.0/24\n\nbad\n")
    with pytest.raises(ConfigError, match=rf"^clients\.deny\[0\]: {tmp_path}/drop\.txt:3: 'bad' is not a network or address"):
        _config(tmp_path, {"deny": ["drop.txt"]})


@pytest.mark.parametrize("value", [{"a": 1}, [["192.0.2.0/24"]], [True]])
def test_config_entries_must_be_strings(tmp_path, value):
    with pytest.raises(ConfigError, match=r"^clients\.deny"):
        _config(tmp_path, {"deny": value})


def test_config_unknown_keys_are_warned(tmp_path):
    config = _config(tmp_path, {"block": ["192.0.2.0/24"]})
    assert config.warnings == ("unknown key clients.block ignored",)


def test_config_a_single_entry_is_a_list_of_one(tmp_path):
    assert _config(tmp_path, {"deny": "192.0.2.0/24"}).clients.deny == ("192.0.2.0/24",)


def test_the_example_config_commented_section_loads(tmp_path):
    """The commented example in etc/mtop/mtop.yaml, uncommented, is valid."""
    text = EXAMPLE.read_text()
    start = text.index("# clients:")
    block = []
    for line in text[start:].splitlines():
        if not line.startswith("#"):
            break
        block.append(line[2:])
    section = yaml.safe_load("\n".join(block))["clients"]
    assert section == {"allow": [], "deny": []}
    assert _config(tmp_path, section).clients == ClientsConfig()
