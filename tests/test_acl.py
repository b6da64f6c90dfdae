"""The destination ACL (pure) and the dialer applying it to resolved
addresses (real reactor, real resolver, loopback listeners)."""

import ipaddress

import pytest
import pytest_twisted
import yaml
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

from helpers import LOOPBACK_ACL
from mtop.acl import ACLError, DestinationACL, embedded_ipv4, parse_network, parse_port_range
from mtop.config import ConfigError, load_config_data
from mtop.dialer import DestinationRefused, Dialer

DEFAULT = DestinationACL()


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1", "127.255.0.9", "10.1.2.3", "172.16.0.1", "172.31.255.255", "192.168.1.1",
        "169.254.169.254", "100.64.0.1", "100.127.255.255", "0.0.0.0", "224.0.0.251", "239.1.1.1",
        "255.255.255.255", "::1", "::", "fe80::1", "fe80::1%eth0", "fc00::1", "fd12:3456::1", "ff02::1",
        "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::127.0.0.1", "::169.254.169.254",
        "64:ff9b::7f00:1", "2002:7f00:1::1", "2002:c0a8:101::1",
    ],
)
def test_default_refuses_local_and_private(host):
    assert DEFAULT.refusal(host, 443) is not None


@pytest.mark.parametrize("host", ["1.1.1.1", "8.8.8.8", "100.63.255.255", "100.128.0.0", "172.32.0.1", "2606:4700::1111", "2a00:1450::1"])
def test_default_allows_public(host):
    assert DEFAULT.refusal(host, 443) is None


def test_names_are_left_to_the_resolved_addresses():
    assert DEFAULT.refusal("localhost", 80) is None


def test_allow_overrides_defaults_and_mapped_forms_follow():
    acl = DestinationACL(allow=(parse_network("127.0.0.0/8"),))
    assert acl.refusal("127.0.0.1", 80) is None
    assert acl.refusal("::ffff:127.0.0.1", 80) is None
    assert acl.refusal("::1", 80) is not None  # only what was allowed
    assert acl.refusal("10.0.0.1", 80) is not None


def test_most_specific_entry_wins_and_deny_wins_ties():
    acl = DestinationACL(
        allow=(parse_network("10.0.0.0/8"), parse_network("10.9.9.9/32")),
        deny=(parse_network("10.9.0.0/16"), parse_network("10.9.9.9/32")),
    )
    assert acl.refusal("10.1.1.1", 80) is None
    assert "denied by the ACL" in acl.refusal("10.9.1.1", 80)
    assert acl.refusal("10.9.9.9", 80) is not None
    # deny beats a mapped form of an allowed address too
    assert acl.refusal("::ffff:10.9.1.1", 80) is not None


def test_deny_applies_to_public_addresses():
    acl = DestinationACL(deny=(parse_network("203.0.113.0/24"), parse_network("8.8.8.0/24")))
    assert acl.refusal("8.8.8.8", 53) is not None
    assert acl.refusal("::ffff:8.8.8.8", 53) is not None
    assert acl.refusal("8.8.4.4", 53) is None


def test_own_addresses_are_refused_unless_allowed():
    acl = DestinationACL().with_own(["198.51.100.7", "2001:db8::7", "not-an-address"])
    public_own = DestinationACL().with_own(["93.184.216.34"])
    assert "own address" in public_own.refusal("93.184.216.34", 443)
    assert public_own.refusal("93.184.216.35", 443) is None
    assert acl.refusal("198.51.100.7", 443) is not None
    allowed = DestinationACL(allow=(parse_network("93.184.216.34"),)).with_own(["93.184.216.34"])
    assert allowed.refusal("93.184.216.34", 443) is None


def test_ports():
    acl = DestinationACL(allow_ports=((80, 80), (443, 443), (8000, 8999)), deny_ports=((8080, 8080),))
    assert acl.port_refusal(80) is None and acl.port_refusal(8500) is None
    assert acl.port_refusal(25) == "port 25 is not allowed"
    assert acl.port_refusal(8080) == "port 8080 is denied"
    assert DestinationACL(deny_ports=((25, 25),)).refusal("1.1.1.1", 25) == "port 25 is denied"


@pytest.mark.parametrize("value,expected", [(443, (443, 443)), ("8000-8999", (8000, 8999)), (" 22 ", (22, 22))])
def test_port_ranges(value, expected):
    assert parse_port_range(value) == expected


@pytest.mark.parametrize("value", [0, 65536, "9-1", "a-b", "1-", True, None, 1.5])
def test_bad_port_ranges(value):
    with pytest.raises(ACLError):
        parse_port_range(value)


def test_config_keys():
    config = load_config_data(
        yaml.safe_load(
            "acl: {allow: ['127.0.0.0/8', '::1'], deny: ['127.0.0.2/32'], allow_ports: [80, '8000-8100'], deny_ports: 8080}"
        ),
        check_files=False,
    )
    acl = config.acl
    assert acl.refusal("127.0.0.1", 80) is None
    assert acl.refusal("127.0.0.2", 80) is not None
    assert acl.refusal("127.0.0.1", 8080) is not None
    assert acl.refusal("127.0.0.1", 22) is not None


@pytest.mark.parametrize(
    "text,message",
    [
        ("acl: {allow: ['10.0.0.0/33']}", "acl.allow: '10.0.0.0/33' is not a network"),
        ("acl: {deny: [nonsense]}", "acl.deny: 'nonsense' is not a network"),
        ("acl: {allow_ports: ['99999']}", "acl.allow_ports: '99999' is not a port"),
        ("acl: [1]", "acl: expected a mapping"),
    ],
)
def test_config_errors_name_the_key(text, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config_data(yaml.safe_load(text), check_files=False)


_ipv4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)


@given(_ipv4)
def test_every_ipv6_form_of_a_refused_ipv4_is_refused(address):
    v4_refused = DEFAULT.address_refusal(address) is not None
    packed = address.packed
    forms = [
        ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + packed),  # mapped
        ipaddress.IPv6Address(bytes.fromhex("0064ff9b") + b"\0" * 8 + packed),  # NAT64
        ipaddress.IPv6Address(b"\x20\x02" + packed + b"\0" * 10),  # 6to4
    ]
    if int(address) > 1:
        forms.append(ipaddress.IPv6Address(b"\0" * 12 + packed))  # compatible
    for form in forms:
        assert embedded_ipv4(form) == address
        if v4_refused:
            assert DEFAULT.address_refusal(form) is not None, form


@given(st.text(max_size=60), st.integers(0, 70000))
def test_refusal_never_raises(host, port):
    result = DEFAULT.refusal(host, port)
    assert result is None or isinstance(result, str)


class _Hello(Protocol):
    def connectionMade(self):
        self.transport.write(b"hi")
        self.transport.loseConnection()


@pytest.fixture
def listener():
    port = reactor.listenTCP(0, Factory.forProtocol(_Hello), interface="127.0.0.1")
    yield port.getHost().port
    port.stopListening()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::ffff:127.0.0.1"])
@pytest_twisted.ensureDeferred
async def test_dialer_refuses_loopback_by_default_also_by_name(listener, host):
    with pytest.raises(DestinationRefused) as info:
        await Dialer(reactor, 5).connect(host, listener, Factory.forProtocol(Protocol))
    assert "loopback" in str(info.value)


@pytest_twisted.ensureDeferred
async def test_dialer_connects_to_allowed_resolved_addresses(listener):
    protocol = await Dialer(reactor, 5, LOOPBACK_ACL).connect("localhost", listener, Factory.forProtocol(Protocol))
    assert protocol.transport.getPeer().host in ("127.0.0.1", "::1")
    protocol.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_dialer_refuses_a_port_before_resolving(listener):
    acl = DestinationACL(allow=LOOPBACK_ACL.allow, allow_ports=((1, 1),))
    with pytest.raises(DestinationRefused, match=f"port {listener} is not allowed"):
        await Dialer(reactor, 5, acl).connect("no-such-name.invalid", listener, Factory.forProtocol(Protocol))
