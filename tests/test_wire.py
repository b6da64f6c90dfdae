import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtop import wire


def _request(case):
    return wire.AuthRequest(case["username"], case["password"], case["host"], case["port"], case["address_type"])


def test_valid_vectors_parse_and_encode(vectors):
    for case in vectors["auth_valid"]:
        raw = bytes.fromhex(case["hex"])
        parsed = wire.parse_auth(raw)
        assert parsed is not None, case["name"]
        assert parsed.consumed == len(raw)
        assert parsed.request == _request(case), case["name"]
        assert wire.encode_auth(_request(case)) == raw, case["name"]


def test_every_strict_prefix_is_incomplete(vectors):
    for case in vectors["auth_valid"]:
        raw = bytes.fromhex(case["hex"])
        for n in range(len(raw)):
            assert wire.parse_auth(raw[:n]) is None, (case["name"], n)


def test_leftover_bytes_are_reported_not_consumed(vectors):
    raw = bytes.fromhex(vectors["auth_valid"][0]["hex"])
    parsed = wire.parse_auth(raw + b"GET / HTTP/1.1\r\n")
    assert parsed.consumed == len(raw)


@pytest.mark.parametrize(
    "name,error",
    [
        ("bad_version", wire.UnsupportedVersion),
        ("bad_method", wire.UnknownMethod),
        ("empty_username", wire.EmptyField),
        ("empty_domain", wire.EmptyField),
    ],
)
def test_invalid_vectors_raise_one_typed_error(vectors, name, error):
    (case,) = [c for c in vectors["auth_invalid"] if c["name"] == name]
    with pytest.raises(error):
        wire.parse_auth(bytes.fromhex(case["hex"]))


def test_bad_atyp_vector_is_mis_encoded_and_we_follow_the_spec(vectors):
    # The shared vector "bad_atyp" (01 01 | 01 61 | 01 02 | 01 01020304 | 0001)
    # is, byte for byte, a valid message: password "\x02", IPv4 target
    # 1.2.3.4 port 1.  Its ATYP byte is 0x01.  We follow the format the other
    # vectors and the original implementation agree on, and test an unknown
    # address type with the same message carrying ATYP 0x02.
    (case,) = [c for c in vectors["auth_invalid"] if c["name"] == "bad_atyp"]
    parsed = wire.parse_auth(bytes.fromhex(case["hex"]))
    assert parsed.request == wire.AuthRequest("a", "\x02", "1.2.3.4", 1, wire.ATYP_IPV4)
    for atyp in (0x00, 0x02, 0x05, 0xFF):
        with pytest.raises(wire.UnknownAddressType):
            wire.parse_auth(bytes.fromhex("010101610162") + bytes([atyp]) + bytes.fromhex("010203040001"))


def test_bad_version_is_detected_from_the_first_byte():
    with pytest.raises(wire.UnsupportedVersion):
        wire.parse_auth(b"\x05")
    assert wire.UnsupportedVersion.status == wire.STATUS_UNSUPPORTED_VERSION


def test_invalid_utf8_username_is_a_typed_error():
    raw = b"\x01\x01\x01\xff\x01p\x01\x7f\x00\x00\x01\x00\x50"
    with pytest.raises(wire.BadEncoding):
        wire.parse_auth(raw)


def test_reply_vectors(vectors):
    replies = vectors["reply"]
    assert wire.encode_reply(wire.STATUS_SUCCESS).hex() == replies["success"]
    assert wire.encode_reply(wire.STATUS_UNSUPPORTED_VERSION).hex() == replies["unsupported_version"]
    assert wire.encode_reply(wire.STATUS_AUTH_FAILURE).hex() == replies["auth_failure"]
    assert wire.encode_reply(wire.STATUS_CONNECTION_FAILURE).hex() == replies["connection_failure"]
    assert wire.parse_reply(b"\x01") is None
    assert wire.parse_reply(b"\x01\x00") == 0
    with pytest.raises(wire.BadReply):
        wire.parse_reply(b"\x05\x00")


def test_encoder_rejects_what_the_wire_cannot_carry():
    with pytest.raises(ValueError):
        wire.encode_auth(wire.AuthRequest("u" * 256, "p", "example.com", 1))
    with pytest.raises(ValueError):
        wire.encode_auth(wire.AuthRequest("", "p", "example.com", 1))
    with pytest.raises(ValueError):
        wire.encode_auth(wire.AuthRequest("u", "p", "example.com", 70000))


def test_repr_hides_the_password():
    assert "hunter2" not in repr(wire.AuthRequest("u", "hunter2", "h", 1))


text = st.text(min_size=1).filter(lambda s: len(s.encode("utf-8")) <= 255)


@st.composite
def requests(draw):
    kind = draw(st.sampled_from([wire.ATYP_IPV4, wire.ATYP_IPV6, wire.ATYP_DOMAIN]))
    if kind == wire.ATYP_IPV4:
        host = str(draw(st.ip_addresses(v=4)))
    elif kind == wire.ATYP_IPV6:
        host = str(draw(st.ip_addresses(v=6)))
    else:
        host = draw(text)
    password = draw(st.text().filter(lambda s: len(s.encode("utf-8")) <= 255))
    return wire.AuthRequest(draw(text), password, host, draw(st.integers(0, 65535)), kind)


@given(requests(), st.binary(max_size=64))
def test_encode_parse_round_trip(request, tail):
    raw = wire.encode_auth(request)
    assert len(raw) <= wire.MAX_AUTH_LENGTH
    parsed = wire.parse_auth(raw + tail)
    assert parsed == (request, len(raw))


@settings(max_examples=2000)
@given(st.binary(max_size=wire.MAX_AUTH_LENGTH + 8))
def test_any_bytes_are_incomplete_valid_or_a_typed_error(data):
    try:
        result = wire.parse_auth(data)
    except wire.WireError:
        return
    if result is not None:
        assert 0 < result.consumed <= len(data)
        # what parsed re-encodes to the same bytes
        assert wire.encode_auth(result.request) == data[: result.consumed]
    else:
        assert len(data) < wire.MAX_AUTH_LENGTH


def test_without_password_keeps_the_framing_and_drops_the_password():
    request = wire.AuthRequest("alice", "Secret-pw-1", "example.com", 443)
    message = wire.encode_auth(request)
    masked = wire.without_password(message)
    assert len(masked) == len(message) and b"Secret-pw-1" not in masked
    parsed, used = wire.parse_auth(masked + b"tail")
    assert used == len(message)
    assert (parsed.username, parsed.password, parsed.target) == ("alice", "*" * 11, "example.com:443")
    empty = wire.encode_auth(wire.AuthRequest("bob", "", "192.0.2.1", 80, wire.ATYP_IPV4))
    assert wire.without_password(empty) == empty


def test_vectors_agree_with_a_shared_copy_when_one_is_beside_the_checkout(vectors):
    """The suite carries its own vectors; a team checkout may also have the
    shared copy they were taken from, and then the two must agree."""
    import json
    import pathlib

    shared = pathlib.Path(__file__).resolve().parents[2] / "shared" / "vectors" / "mtop-v1.json"
    if shared.exists():
        assert json.loads(shared.read_text()) == vectors
    assert vectors["auth_valid"] and vectors["auth_invalid"]
