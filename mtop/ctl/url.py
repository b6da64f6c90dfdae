"""``mtopctl url``: print the ``mtop://`` share link of a user and a
server, which climber and ``mtopctl check`` read."""

from __future__ import annotations

import argparse

from mtop.ctl.common import CommandError, Commands, add_password_flags, read_password
from mtop.urls import ServerLink, URLError, make_url


def cmd_url(args: argparse.Namespace) -> None:
    """Print the share link; the password goes into it as given."""
    password = read_password(args)
    try:
        print(make_url(ServerLink(args.username, password, args.host, args.port, args.type, args.proto)))
    except URLError as e:
        raise CommandError(str(e)) from None


# Named as it is because argparse names a type function in its
# "invalid <name> value" message.
def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 < port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is outside 1-65535")
    return port


def register(commands: Commands) -> None:
    """Add ``url``."""
    url = commands.add_parser("url", help="print an mtop:// share link")
    url.add_argument("-u", "--username", required=True)
    add_password_flags(url, salt=False)
    url.add_argument("-H", "--host", required=True, help="server host name or address")
    url.add_argument("-P", "--port", type=_port, default=443)
    url.add_argument("-t", "--type", choices=("tls", "quic"), default="tls")
    url.add_argument("-o", "--proto", default="mtop", help="ALPN protocol name")
    url.set_defaults(func=cmd_url)
