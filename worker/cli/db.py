"""``postbote db upgrade``."""

from __future__ import annotations

import argparse
from typing import Any

from worker.cli.output import fail
from worker.db import connect, ensure_database, upgrade
from worker.errors import DatabaseUnavailable
from worker.settings import Settings


def register(subparsers: Any) -> None:
    db = subparsers.add_parser("db", help="database schema")
    commands = db.add_subparsers(dest="db_command", metavar="COMMAND", required=True)
    up = commands.add_parser("upgrade", help="apply the SQL migrations not yet applied (idempotent)")
    up.set_defaults(func=run_upgrade)


def run_upgrade(args: argparse.Namespace, settings: Settings) -> int:
    try:
        if ensure_database(settings.database_url):
            print("created the database")
        with connect(settings.database_url) as conn:
            applied = upgrade(conn)
    except DatabaseUnavailable as e:
        return fail(str(e))
    except RuntimeError as e:
        return fail(str(e))
    if applied:
        for version in applied:
            print(f"applied {version}")
    else:
        print("database is up to date")
    return 0
