import pytest
from hypothesis import given
from hypothesis import strategies as st

from mtop.urls import ServerLink, URLError, make_url, parse_url


def test_share_url_vectors(vectors):
    for case in vectors["share_url"]["cases"]:
        link = ServerLink(case["username"], case["password"], case["host"], case["port"], case["type"], case["proto"])
        assert make_url(link) == case["url"]
        assert parse_url(case["url"]) == link


@pytest.mark.parametrize(
    "bad",
    [
        "http://u:p@h:1/tls",
        "mtop://u:p@h/tls",
        "mtop://h:443/tls",
        "mtop://u:p@h:443/udp",
        "mtop://u:p@h:99999/tls",
        "mtop://u:p@[::1:443/tls",
        "mtop://u:p@h:abc/tls",
    ],
)
def test_bad_links_are_url_errors(bad):
    with pytest.raises(URLError):
        parse_url(bad)


def test_repr_hides_password():
    assert "s3cret" not in repr(ServerLink("u", "s3cret", "h", 1))


@given(st.text())
def test_any_text_parses_or_is_a_url_error(text):
    try:
        parse_url(text)
    except URLError:
        pass


# Links carry what the MTop auth message carries: 1-255 and 0-255 UTF-8 bytes.
_credential = st.text(min_size=1, max_size=60).filter(lambda t: len(t.encode()) <= 255)


@given(
    _credential,
    _credential,
    st.sampled_from(["example.com", "127.0.0.1", "2001:db8::1"]),
    st.integers(1, 65535),
    st.sampled_from(["tls", "quic"]),
)
def test_round_trip(user, password, host, port, kind):
    link = ServerLink(user, password, host, port, kind)
    assert parse_url(make_url(link)) == link


def test_wss_links_carry_path_host_and_sni():
    link = ServerLink("alice", "p w", "cdn.example.com", 443, "wss", path="/t/x", ws_host="origin.example.com", sni="front.example.com")
    url = make_url(link)
    assert url == "mtop://alice:p%20w@cdn.example.com:443/wss?path=/t/x&host=origin.example.com&sni=front.example.com"
    assert parse_url(url) == link
    # Defaults are left out; a TLS link is as the original writes it.
    assert make_url(ServerLink("a", "b", "h", 443, "wss")) == "mtop://a:b@h:443/wss"
    assert make_url(ServerLink("a", "b", "h", 443)) == "mtop://a:b@h:443/tls?proto=mtop"
    assert "secret" not in repr(ServerLink("a", "secret", "h", 443, "wss", path="/p"))


def test_a_wss_link_with_a_bad_path_is_refused():
    with pytest.raises(URLError, match="is not a request path"):
        parse_url("mtop://a:b@h:443/wss?path=nope")
    with pytest.raises(URLError, match="is not a request path"):
        make_url(ServerLink("a", "b", "h", 443, "wss", path="/a b"))
