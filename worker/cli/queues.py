"""``postbote queues migrate --to classic|quorum [--dry-run] [--quiet-seconds S] [--json]``."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any

import pika.exceptions

from producer.queues import QUEUE_TYPES
from worker.cli.output import fail, print_json
from worker.settings import Settings
from worker.tools.queues import MIGRATING_SUFFIX, QUIET_S, MigrationRefused, migrate_queues


def register(subparsers: Any) -> None:
    queues = subparsers.add_parser("queues", help="the RabbitMQ queues of both lanes")
    commands = queues.add_subparsers(dest="queues_command", metavar="COMMAND", required=True)
    migrate = commands.add_parser(
        "migrate",
        help="change the type of every queue (work, .DQ, .XQ) in place without losing a message; "
        "stop the workers and the publishers first",
    )
    migrate.add_argument("--to", required=True, choices=QUEUE_TYPES, help="the queue type to migrate to")
    migrate.add_argument("--dry-run", action="store_true", help="say what would be done, change nothing")
    migrate.add_argument(
        "--quiet-seconds",
        type=_seconds,
        default=QUIET_S,
        metavar="S",
        help=f"refuse if a message arrives in a queue to migrate within S seconds (default {QUIET_S:g})",
    )
    migrate.add_argument("--json", action="store_true", help="print the report as JSON")
    migrate.set_defaults(func=run_migrate)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 600:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds between 0 and 600")
    return value


def run_migrate(args: argparse.Namespace, settings: Settings) -> int:
    try:
        reports = migrate_queues(
            settings.broker_url,
            settings.queue_prefix,
            args.to,
            dry_run=args.dry_run,
            quiet_s=args.quiet_seconds,
            progress=None if args.json else print,
        )
    except MigrationRefused as e:
        return fail(str(e))
    except (pika.exceptions.AMQPError, OSError) as e:
        return fail(
            f"RabbitMQ unreachable or the connection failed ({type(e).__name__}: {e}); no message is lost:"
            f" any a queue's migration had moved wait in <queue>{MIGRATING_SUFFIX}, and running the migration"
            " again moves them back"
        )
    if args.json:
        print_json({"dry_run": args.dry_run, "to": args.to, "queues": [asdict(r) for r in reports]})
    elif args.dry_run:
        for report in reports:
            print(report.line())
        print("dry run: nothing was changed")
    if not args.dry_run and args.to != settings.queue_type and not args.json:
        print(
            f"now set POSTBOTE_QUEUE_TYPE={args.to} for the workers and every producer before starting them"
        )
    return 0
