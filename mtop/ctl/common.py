"""What the ``mtopctl`` commands share: the config file's database
settings, the password flags and their input, and the one error type
``mtopctl`` prints as one line with exit status 1."""

from __future__ import annotations

import argparse
import getpass
import sys

from mtop.config import ConfigError, load_config
from mtop.database import DBSettings

DEFAULT_CONFIG = "/etc/mtop/mtop.yaml"

#: What ``ArgumentParser.add_subparsers`` returns, which each command module
#: adds its parser to; argparse has no public name for it.
Commands = argparse._SubParsersAction


class CommandError(Exception):
    """An error to print as one line."""


def db_settings(args: argparse.Namespace) -> DBSettings:
    """The database named by the config file ``-c``, which need not have
    its certificate files yet (``mtopctl cert init`` may come later)."""
    try:
        db = load_config(args.config, check_files=False).db
    except ConfigError as e:
        raise CommandError(f"{args.config}: {e}") from None
    return DBSettings(db.driverName, db.dsn)


def read_password(args: argparse.Namespace) -> str:
    """The password from ``-p``, standard input or a prompt (asked twice),
    checked against what the MTop protocol can carry."""
    if args.password is not None:
        password = args.password
    elif args.password_stdin or not sys.stdin.isatty():
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise CommandError("the two passwords differ")
    if not password:
        raise CommandError("the password must not be empty")
    if len(password.encode("utf-8")) > 255:
        raise CommandError("the password is longer than 255 bytes, which the MTop protocol cannot carry")
    return password


def add_password_flags(parser: argparse.ArgumentParser, salt: bool = True) -> None:
    """The flags `read_password` reads, and with ``salt`` those of how the
    password is stored."""
    parser.add_argument("-p", "--password", help="password (prompted for, or read from stdin, when left out)")
    parser.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    if salt:
        parser.add_argument("-s", "--salt", help="value for the salt column (random when left out)")
        parser.add_argument(
            "--legacy",
            action="store_true",
            help="store the original implementation's SHA-256 hash, for a database shared with original servers",
        )
