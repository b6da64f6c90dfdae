"""Tests for the pure SOCKS5 / RFC 1929 codec in `climber.socks5_codec`."""

import ipaddress
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from climber import socks5_codec as codec

# One valid wire message per parser (with its expected result), used by the
# prefix and leftover tests.
VALID_MESSAGES = [
    (codec.parse_greeting, b"\x05\x02\x00\x02", ((0, 2), 4)),
    (codec.parse_greeting, b"\x05\x01\x00", ((0,), 3)),
    (codec.parse_userpass, b"\x01\x05alice\x06s3cr3t", ("alice", "s3cr3t", 14)),
    (codec.parse_userpass, b"\x01\x01a\x00", ("a", "", 4)),
    (
        codec.parse_request,
        b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50",
        (codec.SocksRequest(codec.CMD_CONNECT, "127.0.0.1", 80, codec.ATYP_IPV4), 10),
    ),
    (
        codec.parse_request,
        b"\x05\x01\x00\x04" + b"\x00" * 15 + b"\x01" + b"\x01\xbb",
        (codec.SocksRequest(codec.CMD_CONNECT, "::1", 443, codec.ATYP_IPV6), 22),
    ),
    (
        codec.parse_request,
        b"\x05\x01\x00\x03\x0bexample.com\x1f\x90",
        (codec.SocksRequest(codec.CMD_CONNECT, "example.com", 8080, codec.ATYP_DOMAIN), 18),
    ),
    (codec.parse_method_choice, b"\x05\x02", 2),
    (codec.parse_reply, b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00", (0, "0.0.0.0", 0, 10)),
    (codec.parse_reply, b"\x05\x04\x00\x03\x01h\x00\x01", (4, "h", 1, 8)),
]
MESSAGE_IDS = [f"{parser.__name__}-{i}" for i, (parser, _, _) in enumerate(VALID_MESSAGES)]


# -- known bytes -------------------------------------------------------------


@pytest.mark.parametrize(("parser", "raw", "expected"), VALID_MESSAGES, ids=MESSAGE_IDS)
def test_valid_message_parses(parser, raw, expected):
    assert parser(raw) == expected


@pytest.mark.parametrize(("parser", "raw", "expected"), VALID_MESSAGES, ids=MESSAGE_IDS)
def test_every_strict_prefix_is_incomplete(parser, raw, expected):
    for n in range(len(raw)):
        assert parser(raw[:n]) is None, n


@pytest.mark.parametrize(("parser", "raw", "expected"), VALID_MESSAGES, ids=MESSAGE_IDS)
def test_leftover_bytes_are_not_consumed(parser, raw, expected):
    assert parser(raw + b"\x05\x01leftover") == expected


def test_encoders_produce_known_bytes():
    assert codec.encode_method_choice(codec.METHOD_USERPASS) == b"\x05\x02"
    assert codec.encode_method_choice(codec.METHOD_NONE_ACCEPTABLE) == b"\x05\xff"
    assert codec.encode_userpass_status(True) == b"\x01\x00"
    assert codec.encode_userpass_status(False) == b"\x01\x01"
    assert codec.encode_reply(codec.REP_SUCCEEDED) == b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    assert codec.encode_greeting([0, 2]) == b"\x05\x02\x00\x02"
    assert codec.encode_userpass("alice", "s3cr3t") == b"\x01\x05alice\x06s3cr3t"
    assert codec.encode_request(1, "example.com", 8080) == b"\x05\x01\x00\x03\x0bexample.com\x1f\x90"
    assert codec.encode_request(1, "::1", 443) == b"\x05\x01\x00\x04" + b"\x00" * 15 + b"\x01\x01\xbb"


def test_largest_messages_have_the_documented_sizes():
    greeting = codec.encode_greeting(range(255))
    userpass = codec.encode_userpass("u" * 255, "p" * 255)
    request = codec.encode_request(codec.CMD_CONNECT, "d" * 255, 65535)
    assert len(greeting) == codec.MAX_GREETING
    assert len(userpass) == codec.MAX_USERPASS
    assert len(request) == codec.MAX_REQUEST
    assert codec.parse_greeting(greeting) == (tuple(range(255)), codec.MAX_GREETING)
    assert codec.parse_userpass(userpass) == ("u" * 255, "p" * 255, codec.MAX_USERPASS)
    assert codec.parse_request(request)[1] == codec.MAX_REQUEST


# -- round trips -------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "atyp", "parsed_host"),
    [
        ("192.0.2.7", codec.ATYP_IPV4, "192.0.2.7"),
        ("::1", codec.ATYP_IPV6, "::1"),
        ("2001:0db8:0000:0000:0000:0000:0000:0001", codec.ATYP_IPV6, "2001:db8::1"),
        ("example.com", codec.ATYP_DOMAIN, "example.com"),
        ("bücher.example", codec.ATYP_DOMAIN, "bücher.example"),
    ],
)
def test_request_and_reply_round_trip_each_address_type(host, atyp, parsed_host):
    raw = codec.encode_request(codec.CMD_CONNECT, host, 1080)
    assert codec.parse_request(raw) == (codec.SocksRequest(codec.CMD_CONNECT, parsed_host, 1080, atyp), len(raw))
    raw = codec.encode_reply(codec.REP_HOST_UNREACHABLE, host, 1080)
    assert raw[3] == atyp
    assert codec.parse_reply(raw) == (codec.REP_HOST_UNREACHABLE, parsed_host, 1080, len(raw))


def test_greeting_userpass_and_method_choice_round_trip():
    assert codec.parse_greeting(codec.encode_greeting([2])) == ((2,), 3)
    assert codec.parse_userpass(codec.encode_userpass("ü", "")) == ("ü", "", 5)
    assert codec.parse_method_choice(codec.encode_method_choice(0)) == 0


@given(st.lists(st.integers(0, 255), min_size=1, max_size=255))
def test_greeting_round_trip_property(methods):
    raw = codec.encode_greeting(methods)
    assert codec.parse_greeting(raw) == (tuple(methods), len(raw))


def _fits(limit_min: int):
    return lambda s: limit_min <= len(s.encode("utf-8")) <= 255


@given(st.text(max_size=255).filter(_fits(1)), st.text(max_size=255).filter(_fits(0)))
def test_userpass_round_trip_property(username, password):
    raw = codec.encode_userpass(username, password)
    assert codec.parse_userpass(raw) == (username, password, len(raw))


_hosts = st.one_of(
    st.ip_addresses().map(str),
    st.text(min_size=1, max_size=255).filter(
        lambda s: _fits(1)(s) and codec.address_type_for(s) == codec.ATYP_DOMAIN
    ),
)


@given(_hosts, st.integers(0, 65535))
def test_request_round_trip_property(host, port):
    raw = codec.encode_request(codec.CMD_CONNECT, host, port)
    atyp = codec.address_type_for(host)
    expected_host = host if atyp == codec.ATYP_DOMAIN else str(ipaddress.ip_address(host))
    expected = codec.SocksRequest(codec.CMD_CONNECT, expected_host, port, atyp)
    assert codec.parse_request(raw) == (expected, len(raw))


@given(st.integers(0, 255), _hosts, st.integers(0, 65535))
def test_reply_round_trip_property(rep, host, port):
    raw = codec.encode_reply(rep, host, port)
    parsed_rep, parsed_host, parsed_port, consumed = codec.parse_reply(raw)
    assert (parsed_rep, parsed_port, consumed) == (rep, port, len(raw))
    assert codec.encode_reply(rep, parsed_host, port) == raw


# -- errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("parser", "raw", "error", "reply"),
    [
        (codec.parse_greeting, b"\x04", codec.BadVersion, None),
        (codec.parse_greeting, b"\x05\x00", codec.MalformedMessage, codec.REP_GENERAL_FAILURE),
        (codec.parse_userpass, b"\x05", codec.BadVersion, None),
        (codec.parse_userpass, b"\x01\x00", codec.MalformedMessage, codec.REP_GENERAL_FAILURE),
        (codec.parse_userpass, b"\x01\x01\xff\x00", codec.MalformedMessage, codec.REP_GENERAL_FAILURE),
        (codec.parse_userpass, b"\x01\x01a\x02\xc3\x28", codec.MalformedMessage, codec.REP_GENERAL_FAILURE),
        (codec.parse_request, b"\x04", codec.BadVersion, None),
        (codec.parse_request, b"\x05\x01\x01", codec.MalformedMessage, codec.REP_GENERAL_FAILURE),
        (codec.parse_request, b"\x05\x01\x00\x03\x00", codec.MalformedMessage, codec.REP_GENERAL_FAILURE),
        (codec.parse_request, b"\x05\x01\x00\x03\x01\x80\x00\x50", codec.MalformedMessage, codec.REP_GENERAL_FAILURE),
        (codec.parse_request, b"\x05\x00", codec.UnsupportedCommand, codec.REP_COMMAND_NOT_SUPPORTED),
        (codec.parse_request, b"\x05\x01\x00\x00", codec.UnsupportedAddressType, codec.REP_ADDRESS_TYPE_NOT_SUPPORTED),
        (codec.parse_method_choice, b"\x01", codec.BadVersion, None),
        (codec.parse_reply, b"\x04", codec.BadVersion, None),
        (codec.parse_reply, b"\x05\x00\x07", codec.MalformedMessage, codec.REP_GENERAL_FAILURE),
        (codec.parse_reply, b"\x05\x00\x00\x09", codec.UnsupportedAddressType, codec.REP_ADDRESS_TYPE_NOT_SUPPORTED),
    ],
)
def test_invalid_input_raises_one_typed_error(parser, raw, error, reply):
    with pytest.raises(error) as info:
        parser(raw)
    assert type(info.value) is error
    assert info.value.reply == reply
    assert isinstance(info.value, codec.SocksError)
    assert str(info.value)


@pytest.mark.parametrize("command", [codec.CMD_BIND, codec.CMD_UDP_ASSOCIATE, 0x00, 0x04, 0xFF])
def test_commands_other_than_connect_are_unsupported(command):
    # Raised as soon as the command byte is there, before the rest arrives.
    with pytest.raises(codec.UnsupportedCommand) as info:
        codec.parse_request(bytes([codec.VERSION, command]))
    assert info.value.reply == codec.REP_COMMAND_NOT_SUPPORTED == 7
    assert info.value.command == command
    # The same for a complete, otherwise valid request.
    with pytest.raises(codec.UnsupportedCommand):
        codec.parse_request(codec.encode_request(command, "192.0.2.1", 53))


def test_unsupported_command_pickles_with_its_command():
    error = pickle.loads(pickle.dumps(codec.UnsupportedCommand(codec.CMD_BIND)))
    assert (type(error), error.command, error.reply) == (codec.UnsupportedCommand, 2, 7)


def test_version_is_checked_before_command():
    with pytest.raises(codec.BadVersion):
        codec.parse_request(b"\x04\x02")


@pytest.mark.parametrize("atyp", [0x02, 0x05])
def test_unknown_address_types_are_unsupported(atyp):
    with pytest.raises(codec.UnsupportedAddressType) as info:
        codec.parse_request(bytes([5, 1, 0, atyp]))
    assert info.value.reply == codec.REP_ADDRESS_TYPE_NOT_SUPPORTED == 8


@pytest.mark.parametrize(
    "call",
    [
        lambda: codec.encode_greeting([]),
        lambda: codec.encode_greeting([0] * 256),
        lambda: codec.encode_greeting([256]),
        lambda: codec.encode_method_choice(-1),
        lambda: codec.encode_userpass("", "x"),
        lambda: codec.encode_userpass("u" * 256, ""),
        lambda: codec.encode_userpass("u", "p" * 256),
        lambda: codec.encode_userpass("\ud800", ""),
        lambda: codec.encode_request(1, "d" * 256, 80),
        lambda: codec.encode_request(1, "", 80),
        lambda: codec.encode_request(1, "example.com", 65536),
        lambda: codec.encode_request(1, "example.com", -1),
        lambda: codec.encode_request(1, "fe80::1%eth0", 80),
        lambda: codec.encode_reply(0x100),
        lambda: codec.encode_reply(0, "0.0.0.0", 70000),
    ],
)
def test_encoders_reject_values_the_format_cannot_carry(call):
    with pytest.raises(ValueError):
        call()


# -- arbitrary bytes ---------------------------------------------------------


# Arbitrary bytes, often behind a plausible header so that parsing gets past
# the version byte and into the length and address fields.
_HEADERS = [b"", b"\x05", b"\x01", b"\x05\x01\x00\x01", b"\x05\x01\x00\x03", b"\x05\x00\x00\x04"]
_wire_bytes = st.builds(lambda header, tail: header + tail, st.sampled_from(_HEADERS), st.binary(max_size=300))


def _outcome(parser, buf):
    try:
        return parser(buf)
    except codec.SocksError as e:
        return type(e)


def _check_any_bytes(parser, buf, extra):
    """``parser(buf)`` is None, a valid result or one SocksError; anything
    else escaping fails the calling test."""
    outcome = _outcome(parser, buf)
    grown = _outcome(parser, buf + extra)
    if isinstance(outcome, type):
        # Once proven invalid, more bytes never make it valid.
        assert grown is outcome
    elif outcome is not None:
        # A complete message stays the same message whatever follows it,
        # and every strict prefix of it is incomplete.
        consumed = 2 if parser is codec.parse_method_choice else outcome[-1]
        assert 0 < consumed <= len(buf)
        assert grown == outcome
        assert all(parser(buf[:n]) is None for n in range(consumed))


# One test per parser rather than @pytest.mark.parametrize: pytest-twisted
# breaks on parametrized @given tests.
@given(_wire_bytes, st.binary(max_size=8))
def test_any_bytes_parse_greeting(buf, extra):
    _check_any_bytes(codec.parse_greeting, buf, extra)


@given(_wire_bytes, st.binary(max_size=8))
def test_any_bytes_parse_userpass(buf, extra):
    _check_any_bytes(codec.parse_userpass, buf, extra)


@given(_wire_bytes, st.binary(max_size=8))
def test_any_bytes_parse_request(buf, extra):
    _check_any_bytes(codec.parse_request, buf, extra)


@given(_wire_bytes, st.binary(max_size=8))
def test_any_bytes_parse_method_choice(buf, extra):
    _check_any_bytes(codec.parse_method_choice, buf, extra)


@given(_wire_bytes, st.binary(max_size=8))
def test_any_bytes_parse_reply(buf, extra):
    _check_any_bytes(codec.parse_reply, buf, extra)


@given(_wire_bytes)
def test_parsed_requests_re_encode_to_the_same_bytes(buf):
    try:
        parsed = codec.parse_request(buf)
    except codec.SocksError:
        return
    if parsed is None:
        return
    request, consumed = parsed
    if request.address_type == codec.ATYP_DOMAIN and codec.address_type_for(request.host) != codec.ATYP_DOMAIN:
        return  # an IP literal sent as a domain name re-encodes as an address
    assert codec.encode_request(request.command, request.host, request.port) == buf[:consumed]
