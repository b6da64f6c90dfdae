"""``mtopctl url``: print the ``mtop://`` share link of a user and a
server, which climber and ``mtopctl check`` read, and on request its QR
code (drawn in the terminal, or written as PNG or SVG) for a phone."""

from __future__ import annotations

import argparse
import os
import sys

from mtop.ctl.common import CommandError, Commands, add_password_flags, read_password
from mtop.urls import ServerLink, URLError, make_url


#: Image formats ``--qr-file`` writes, by file name ending.
QR_FILE_FORMATS = (".png", ".svg")
#: Pixels per QR module in a PNG, and SVG units per module.
QR_FILE_SCALE = 8


def qr_code(link: str):  # -> segno.QRCode (segno is imported when asked for)
    """The QR code of a share link: a full QR code (phone cameras do not
    read Micro QR), error correction M at least (segno raises it when the
    size allows), so a slightly damaged or glared code still reads."""
    import segno

    return segno.make_qr(link, error="m", boost_error=True)


def cmd_url(args: argparse.Namespace) -> None:
    """Print the share link (the password goes into it as given) and, with
    ``--qr`` / ``--qr-file``, its QR code."""
    if args.qr_file is not None and os.path.splitext(args.qr_file)[1].lower() not in QR_FILE_FORMATS:
        raise CommandError(f"--qr-file {args.qr_file}: the name must end in {' or '.join(QR_FILE_FORMATS)}")
    password = read_password(args)
    try:
        if args.type != "wss" and (args.path or args.ws_host):
            raise CommandError("--path and --ws-host are for -t wss links (WebSocket)")
        link = make_url(
            ServerLink(
                args.username, password, args.host, args.port, args.type, args.proto,
                path=args.path or "/", ws_host=args.ws_host, sni=args.sni,
            )
        )
    except URLError as e:
        raise CommandError(str(e)) from None
    print(link)
    if not (args.qr or args.qr_file):
        return
    code = qr_code(link)
    if args.qr:
        # Half blocks: two rows of modules per line, so the code stays square
        # and fits an 80x24 terminal for usual links.  Dark modules are
        # blanks and light ones blocks, as on a terminal with a dark background.
        sys.stdout.flush()
        code.terminal(out=sys.stdout, compact=True)
    if args.qr_file:
        try:
            # The link holds the password: the image is as secret, so it is
            # made readable by its owner only.
            fd = os.open(args.qr_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                code.save(out, kind=os.path.splitext(args.qr_file)[1].lower()[1:], scale=QR_FILE_SCALE)
        except OSError as e:
            raise CommandError(f"--qr-file {args.qr_file}: {e.strerror or e}") from None


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
    url.add_argument("-t", "--type", choices=("tls", "quic", "wss"), default="tls")
    url.add_argument("-o", "--proto", default="mtop", help="ALPN protocol name (tls, quic)")
    url.add_argument("--path", help="wss: the WebSocket listener's path (default /)")
    url.add_argument("--ws-host", help="wss: the Host header, when not the host (a CDN's origin name)")
    url.add_argument("--sni", help="the TLS server name, when not the host")
    url.add_argument(
        "--qr", action="store_true", help="also draw the link's QR code in the terminal (for a dark background)"
    )
    url.add_argument(
        "--qr-file", metavar="FILE", help="also write the link's QR code to FILE.png or FILE.svg (mode 0600: it holds the password)"
    )
    url.set_defaults(func=cmd_url)
