"""``mtopctl``: users, the database, share links and certificates.

Reads the same config file as the server (``-c``, default
``$MTOP_CONFIG`` or ``/etc/mtop/mtop.yaml``).  Flag letters follow the
original tool.  Every error is one line on stderr and exit status 1.

One module per command, named as the command (``mtopctl user`` is
`mtop.ctl.user`); each has ``register(commands)``, which adds its parser
and sets ``func`` to the handler that gets the parsed arguments.  What
they share is in `mtop.ctl.common`.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib import metadata
from typing import Sequence

import mtop

from mtop.ctl import admin, cert, check, db, url, user
from mtop.ctl.common import DEFAULT_CONFIG, CommandError
from mtop.database import DatabaseError
from mtop.redact import redact

# The argument types, importable from here as when mtopctl was one module
# (the parser tests call them directly).
from mtop.ctl.url import _port
from mtop.ctl.user import _count, _date, _size

__all__ = ["CommandError", "build_parser", "main", "version", "_count", "_date", "_port", "_size"]

# In the order ``mtopctl --help`` lists them.
_COMMANDS = (db, user, url, check, cert, admin)

#: The distribution's name in setup.cfg (``[metadata] name``).
DISTRIBUTION = "mtop"


def version() -> str:
    """MTop's version as installed (the package metadata); a checkout run
    without being installed has none, and says what its source says."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return mtop.__version__


def build_parser() -> argparse.ArgumentParser:
    """mtopctl's whole command line: ``-c`` and each command's parser."""
    parser = argparse.ArgumentParser(prog="mtopctl", description="Manage MTop users, database, links and certificates.")
    parser.add_argument(
        "-c", "--config", default=os.environ.get("MTOP_CONFIG", DEFAULT_CONFIG), help="path of mtop.yaml"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in _COMMANDS:
        command.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one mtopctl command; the exit status: 0, 1 after an error
    printed as one line, 130 after Ctrl-C (argparse exits 2 itself)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (CommandError, DatabaseError) as e:
        print(f"mtopctl: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a DB-API error from one of the drivers
        if type(e).__module__.split(".")[0] not in ("sqlite3", "psycopg2", "pymysql"):
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"mtopctl: error: database: {redact(message)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
