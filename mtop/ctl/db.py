"""``mtopctl db``: create the ``mtop_user`` table, or add the policy
columns an older or original one lacks."""

from __future__ import annotations

import argparse
import sys

from mtop import fileperms
from mtop.ctl.common import CommandError, Commands, db_settings
from mtop.database import connect
from mtop.dsn import describe_dsn


def cmd_db_init(args: argparse.Namespace) -> None:
    """Create mtop_user (or complete it) with the policy columns."""
    settings = db_settings(args)
    db = connect(settings, create=True)
    try:
        added = db.upgrade()
    finally:
        db.close()
    where = settings.dsn if settings.driver == "sqlite" else describe_dsn(settings.driver, settings.dsn)
    print(f"database ready: {where}" + (f" (added {', '.join(added)})" if added else ""))
    # A database made before init created it 0600 (or by another tool).
    for warning in fileperms.database_warnings(settings.driver, settings.dsn):
        print(f"warning: {warning}", file=sys.stderr)


def cmd_db_upgrade(args: argparse.Namespace) -> None:
    """Add what an older or original mtop_user lacks; changes nothing else."""
    settings = db_settings(args)
    db = connect(settings)
    try:
        if not db.columns():
            raise CommandError("there is no mtop_user table; create it with 'mtopctl db init'")
        added = db.upgrade()
        created = db.created_tables
    finally:
        db.close()
    said = [f"added columns: {', '.join(added)}"] if added else []
    said += [f"created tables: {', '.join(created)}"] if created else []
    print("; ".join(said) if said else "already up to date")


def register(commands: Commands) -> None:
    """Add ``db init`` and ``db upgrade``."""
    db = commands.add_parser("db", help="database management").add_subparsers(dest="db_command", required=True)
    db.add_parser("init", help="create the mtop_user table (with the policy columns)").set_defaults(func=cmd_db_init)
    db.add_parser(
        "upgrade", help="add the policy columns an existing (original) mtop_user lacks; idempotent, safe live"
    ).set_defaults(func=cmd_db_upgrade)
