"""A listener with a fixed ``destination`` (mos-tls-tunnel's ``-d``):
every tunnel goes there, whatever the client names, under the user's
policy; the named target is logged."""

from __future__ import annotations

from peers import echo
from test_hardening_e2e import start_server  # noqa: F401 (a fixture)
from test_server_e2e import auth_message, connect


def test_every_tunnel_goes_to_the_listeners_destination(start_server, e2e_setup, make_target):  # noqa: F811
    target = make_target(echo)
    # No acl section: the default ACL refuses loopback targets a client
    # names, not the destination the operator configured.
    server = start_server(f"  destination: 127.0.0.1:{target.port}\n")
    server.wait_for(rf"MTop TLS listening on 127\.0\.0\.1:\d+ \(every tunnel to 127\.0\.0\.1:{target.port}\)", 10)
    for named in (("example.invalid", 443), ("127.0.0.1", 9), ("10.0.0.1", 22)):
        client = connect(server, e2e_setup)
        try:
            client.send_all(auth_message(e2e_setup.alice, None, *named) + b"hello")
            assert client.read_exactly(7) == b"\x01\x00hello"
        finally:
            client.close()
        server.wait_for(
            rf"tunnel \S+: client=\S+ user=alice target={named[0]}:{named[1]} destination=127\.0\.0\.1:{target.port} ", 10
        )
    # The user's policy still applies: a wrong password gets nowhere.
    client = connect(server, e2e_setup)
    try:
        client.send_all(auth_message(e2e_setup.alice, e2e_setup.wrong_password, "example.invalid", 443))
        assert client.read_to_eof()[:2] != b"\x01\x00"
    finally:
        client.close()
    assert target.accepted == 3
    assert "Traceback" not in server.log()
