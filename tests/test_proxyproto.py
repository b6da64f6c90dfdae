"""The PROXY protocol header parser (pure) and its listener layer."""

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from mtop.proxyproto import V2_SIGNATURE, ProxyHeaderError, ProxyHeaderFactory, ProxyInfo, parse_header
from mtop.stats import Counters

V1 = b"PROXY TCP4 198.51.100.7 192.0.2.1 50123 443\r\n"
V1_6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 50123 443\r\n"


def v2(command=1, family=0x11, body=None, tlvs=b""):
    if body is None:
        body = bytes([198, 51, 100, 7, 192, 0, 2, 1]) + struct.pack("!HH", 50123, 443)
    body += tlvs
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


V2 = v2()
V2_6 = v2(family=0x21, body=bytes.fromhex("20010db8" + "0" * 22 + "07") + bytes.fromhex("20010db8" + "0" * 22 + "01") + struct.pack("!HH", 50123, 443))


@pytest.mark.parametrize(
    "header,source",
    [
        (V1, ("198.51.100.7", 50123)),
        (V1_6, ("2001:db8::7", 50123)),
        (V2, ("198.51.100.7", 50123)),
        (V2_6, ("2001:db8::7", 50123)),
        (v2(tlvs=b"\x05\x00\x04abcd"), ("198.51.100.7", 50123)),
        (b"PROXY UNKNOWN\r\n", None),
        (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", None),
        (v2(command=0, family=0, body=b""), None),
        (v2(family=0x31, body=b"\0" * 216), None),
    ],
)
def test_valid_headers_and_the_rest_is_left(header, source):
    info, used = parse_header(header + b"\x16\x03\x01")
    assert used == len(header)
    assert info.source == source
    # every strict prefix needs more
    for cut in range(len(header)):
        assert parse_header(header[:cut]) is None, cut


@pytest.mark.parametrize(
    "data",
    [
        b"\x16\x03\x01\x02\x00",  # a TLS ClientHello without the header
        b"GET / HTTP/1.1\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",  # no CR
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
        b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
        b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY " + b"A" * 120,
        V2_SIGNATURE + b"\x11\x11\x00\x0c" + b"\0" * 12,  # version 1 in a v2 header
        V2_SIGNATURE + b"\x22\x11\x00\x0c" + b"\0" * 12,  # command 2
        V2_SIGNATURE + b"\x21\x11\x00\x04" + b"\0" * 4,  # IPv4 truncated
        V2_SIGNATURE + b"\x21\x11\xff\xff",  # too long
        V2_SIGNATURE + b"\x21\x41\x00\x00",  # family 4
    ],
)
def test_invalid_headers(data):
    with pytest.raises(ProxyHeaderError):
        parse_header(data)


@given(st.binary(max_size=300))
def test_any_bytes_need_more_parse_or_raise_the_typed_error(data):
    try:
        result = parse_header(data)
    except ProxyHeaderError:
        return
    if result is not None:
        info, used = result
        assert isinstance(info, ProxyInfo) and 0 < used <= len(data)


@given(st.sampled_from([V1, V1_6, V2, V2_6]), st.binary(max_size=20), st.integers(0, 60))
def test_split_anywhere_gives_the_same_result(header, rest, cut):
    data = header + rest
    cut = min(cut, len(data))
    layer, upper, tcp = _layer()
    layer.dataReceived(data[:cut])
    layer.dataReceived(data[cut:])
    assert upper.received == rest
    assert layer.getPeer().host in ("198.51.100.7", "2001:db8::7") and layer.getPeer().port == 50123


class _Upper(Protocol):
    def __init__(self):
        self.received = b""

    def dataReceived(self, data):
        self.received += data


def _layer(clock=None, upper_factory=None):
    upper = _Upper()
    built = []

    class F(Factory):
        def buildProtocol(self, addr):
            built.append(addr)
            return upper if upper_factory is None else upper_factory(addr)

    factory = ProxyHeaderFactory(F(), clock or Clock(), 5, Counters())
    layer = factory.buildProtocol(None)
    tcp = StringTransport()
    layer.makeConnection(tcp)
    layer.built = built
    return layer, upper, tcp


def test_upper_protocol_is_built_for_the_proxied_address_and_writes_go_straight_through():
    layer, upper, tcp = _layer()
    layer.dataReceived(V2 + b"hello")
    assert layer.built[0].host == "198.51.100.7"
    assert upper.transport is layer and upper.received == b"hello"
    upper.transport.write(b"answer")
    assert tcp.value() == b"answer"
    assert layer.getHost().host == "192.0.2.1"


def test_bad_header_or_silence_closes():
    layer, upper, tcp = _layer()
    layer.dataReceived(b"\x16\x03\x01\x00\x10hello")
    assert tcp.disconnecting and layer.upper is None
    clock = Clock()
    layer, upper, tcp = _layer(clock)
    layer.dataReceived(b"PROXY TCP4 1.2")
    clock.advance(5.1)
    assert tcp.disconnecting and layer.upper is None


def test_refused_by_the_upper_factory_closes():
    layer, upper, tcp = _layer(upper_factory=lambda addr: None)
    layer.dataReceived(V1)
    assert tcp.disconnecting
