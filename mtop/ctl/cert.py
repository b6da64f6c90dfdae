"""``mtopctl cert init``: make a CA and a server certificate it signed, and
print the config lines that use them."""

from __future__ import annotations

import argparse
import os
import sys

from mtop.ctl.common import CommandError, Commands


def cmd_cert_init(args: argparse.Namespace) -> None:
    """Write the CA and server files and say what each is for."""
    # Imported here: cryptography is slow to load and only this command needs it.
    from mtop.certs import init_certs

    try:
        paths = init_certs(args.dir, args.host, args.ip, force=args.force, key_group=args.group)
    except (FileExistsError, ValueError) as e:
        raise CommandError(str(e)) from None
    except PermissionError as e:
        raise CommandError(f"{e.filename}: {e.strerror}") from None
    print(f"CA certificate:     {paths.ca_crt}  (give this to clients)")
    print(f"CA key:             {paths.ca_key}  (keep it secret; signs further server certificates)")
    print(f"server certificate: {paths.server_crt}  (chain: server, then CA)")
    key_note = f"  (readable by group {args.group})" if args.group else ""
    print(f"server key:         {paths.server_key}{key_note}")
    print()
    print("mtop.yaml:")
    print("  server:")
    print(f"    crt: {os.path.abspath(paths.server_crt)}")
    print(f"    key: {os.path.abspath(paths.server_key)}")
    print("climber.yaml (each server entry, with ca.crt copied to the client):")
    print("  servers:")
    print(f"    - host: \"{_host_for_link(args)}:443\"")
    print(f"      ca: {os.path.abspath(paths.ca_crt)}")
    if args.group is None and _runs_as_mtop_user():
        print(
            f"note: the server runs as user mtop and cannot read {paths.server_key}: "
            "use --group mtop (or: chgrp mtop KEY && chmod 640 KEY)",
            file=sys.stderr,
        )


def _host_for_link(args: argparse.Namespace) -> str:
    name = (list(args.host) + list(args.ip))[0]
    return f"[{name}]" if ":" in name else name


def _runs_as_mtop_user() -> bool:
    """Whether this is root on a machine where the server runs as ``mtop``
    (the Debian package)."""
    if os.geteuid() != 0:
        return False
    import pwd

    try:
        pwd.getpwnam("mtop")
    except KeyError:
        return False
    return True


def register(commands: Commands) -> None:
    """Add ``cert init``."""
    cert = commands.add_parser("cert", help="certificates").add_subparsers(dest="cert_command", required=True)
    init = cert.add_parser("init", help="make a CA and an ECDSA P-256 server certificate")
    init.add_argument("--host", action="append", default=[], required=True, help="server name (repeatable)")
    init.add_argument("--ip", action="append", default=[], help="server IP address (repeatable)")
    init.add_argument("--dir", default=".", help="where to write the files (default: current directory)")
    init.add_argument("--force", action="store_true", help="replace an existing server certificate")
    init.add_argument(
        "--group", help="make the server key readable by this group (0640), e.g. mtop for the Debian package's server"
    )
    init.set_defaults(func=cmd_cert_init)
