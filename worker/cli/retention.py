"""``postbote retention run [--dry-run]``."""

from __future__ import annotations

import argparse
from typing import Any

from worker.cli.output import fail
from worker.db import connect
from worker.errors import DatabaseUnavailable
from worker.runtime.retention import run_retention
from worker.settings import Settings


def register(subparsers: Any) -> None:
    retention = subparsers.add_parser("retention", help="remove the personal data of long-ended jobs")
    commands = retention.add_subparsers(dest="retention_command", metavar="COMMAND", required=True)
    run = commands.add_parser(
        "run",
        help="remove addresses, bodies and attachments older than POSTBOTE_RETENTION_DAYS"
        " (dead letters: POSTBOTE_DEAD_LETTER_RETENTION_DAYS); the worker does this every hour",
    )
    run.add_argument("--dry-run", action="store_true", help="only count what would be removed")
    run.set_defaults(func=run_retention_command)


def run_retention_command(args: argparse.Namespace, settings: Settings) -> int:
    try:
        with connect(settings.database_url, autocommit=True) as conn:
            report = run_retention(conn, settings, dry_run=args.dry_run)
    except DatabaseUnavailable as e:
        return fail(str(e))
    if report.skipped:
        return fail("another retention run is under way; nothing done")
    verb = "would remove" if args.dry_run else "removed"
    print(
        f"retention: jobs ended more than {settings.retention_days} days ago,"
        f" dead letters older than {settings.dead_letter_retention_days} days (0: kept)"
    )
    for table, count in report.counts.items():
        print(f"  {table}: {verb} personal data of {count} row(s)")
    return 0


__all__ = ["register"]
