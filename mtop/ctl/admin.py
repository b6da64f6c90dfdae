"""``mtopctl admin``: the admin API's accounts (add, del, list, passwd) and
bearer tokens for scripts (token, shown once)."""

from __future__ import annotations

import argparse

from mtop.admins import Admins
from mtop.ctl.common import CommandError, Commands, add_password_flags, db_settings, read_password
from mtop.database import DatabaseError, connect
from mtop.users import UserError


class _Admins:
    """``with _Admins(args) as admins``: `Admins` on the config's database,
    closed at the end; its `UserError` become `CommandError`."""

    def __init__(self, args: argparse.Namespace):
        self.args = args

    def __enter__(self) -> Admins:
        db = connect(db_settings(self.args))
        try:
            db.execute("SELECT 1 FROM mtop_admin WHERE 1 = 0").fetchall()
            db.commit()
        except db.Error:
            db.close()
            raise DatabaseError("there is no mtop_admin table; run 'mtopctl db upgrade' first") from None
        self.admins = Admins(db)
        return self.admins

    def __exit__(self, kind, error, traceback) -> None:
        self.admins.db.close()
        if isinstance(error, UserError):
            raise CommandError(error.message) from None


def cmd_admin_add(args: argparse.Namespace) -> None:
    password = read_password(args)
    with _Admins(args) as admins:
        admins.add(args.name, password)
    print(f"admin {args.name} added")


def cmd_admin_passwd(args: argparse.Namespace) -> None:
    password = read_password(args)
    with _Admins(args) as admins:
        admins.set_password(args.name, password)
    print(f"password of admin {args.name} changed")


def cmd_admin_del(args: argparse.Namespace) -> None:
    with _Admins(args) as admins:
        admins.delete(args.name)
    print(f"admin {args.name} deleted (and their tokens)")


def cmd_admin_list(args: argparse.Namespace) -> None:
    with _Admins(args) as admins:
        rows = admins.list()
    print(f"{'NAME':<32} {'CREATED':<20} TOKENS")
    for name, created, tokens in rows:
        print(f"{name:<32} {created:<20} {tokens}")


def cmd_admin_token(args: argparse.Namespace) -> None:
    with _Admins(args) as admins:
        if args.revoke:
            count = admins.revoke_tokens(args.name)
            print(f"{count} token(s) of admin {args.name} revoked")
            return
        token = admins.new_token(args.name, args.label or "")
    # The token alone on standard output, for scripts; shown this once.
    print(token)


def register(commands: Commands) -> None:
    """Add ``admin add``, ``del``, ``list``, ``passwd`` and ``token``."""
    admin = commands.add_parser("admin", help="admin API accounts and tokens").add_subparsers(
        dest="admin_command", required=True
    )
    add = admin.add_parser("add", help="add an admin (the API and panel log in with it)")
    add.add_argument("-n", "--name", required=True)
    add_password_flags(add, salt=False)
    add.set_defaults(func=cmd_admin_add)
    passwd = admin.add_parser("passwd", help="change an admin's password")
    passwd.add_argument("-n", "--name", required=True)
    add_password_flags(passwd, salt=False)
    passwd.set_defaults(func=cmd_admin_passwd)
    delete = admin.add_parser("del", help="delete an admin and their tokens")
    delete.add_argument("-n", "--name", required=True)
    delete.set_defaults(func=cmd_admin_del)
    admin.add_parser("list", help="list admins").set_defaults(func=cmd_admin_list)
    token = admin.add_parser("token", help="print a new bearer token for scripts (shown once), or --revoke them all")
    token.add_argument("-n", "--name", required=True)
    token.add_argument("--label", help="what the token is for (shown in no log)")
    token.add_argument("--revoke", action="store_true", help="delete every token of this admin")
    token.set_defaults(func=cmd_admin_token)
