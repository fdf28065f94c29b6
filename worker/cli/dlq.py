"""``postbote dlq list|show|replay|purge``: the dead-letter queue for operators."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any

from worker.cli.output import fail, print_json
from worker.db import Connection, connect
from worker.errors import DatabaseUnavailable
from worker.logs import printable
from worker.settings import Settings
from worker.tools.dlq import (
    Filters,
    count_dead,
    describe,
    get_dead,
    list_dead,
    parse_duration,
    purge,
    replay,
)


def register(subparsers: Any) -> None:
    dlq = subparsers.add_parser(
        "dlq",
        help="dead-letter queue: list, show, replay, purge",
        description="Dead jobs stay in PostgreSQL until purged, each with its final reason.",
    )
    commands = dlq.add_subparsers(dest="dlq_command", metavar="COMMAND", required=True)

    listing = commands.add_parser("list", help="dead jobs, oldest first")
    _add_filters(listing)
    listing.add_argument("--limit", type=int, default=None, help="show at most this many")
    listing.add_argument("--json", action="store_true", help="one JSON array instead of a table")
    listing.set_defaults(func=run_list)

    show = commands.add_parser("show", help="everything about one dead job (secrets masked)")
    show.add_argument("id", help="the job id (or message id) from 'dlq list'")
    show.set_defaults(func=run_show)

    again = commands.add_parser("replay", help="put dead jobs back on their work queue, attempts reset")
    again.add_argument("ids", nargs="*", metavar="ID", help="job ids from 'dlq list'")
    again.add_argument("--all", action="store_true", help="every dead job matching the filters")
    _add_filters(again)
    again.add_argument("--dry-run", action="store_true", help="say what would be replayed, change nothing")
    again.set_defaults(func=run_replay)

    wipe = commands.add_parser("purge", help="delete dead jobs for good (asks first)")
    wipe.add_argument("ids", nargs="*", metavar="ID", help="only these (default: all matching the filters)")
    _add_filters(wipe)
    wipe.add_argument("--yes", action="store_true", help="do not ask (needed when not on a terminal)")
    wipe.set_defaults(func=run_purge)


def _add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tenant", help="only this tenant's jobs")
    parser.add_argument("--reason", help="only jobs that died for this reason (e.g. smtp_temporary)")
    parser.add_argument("--older-than", metavar="DUR", help="only jobs dead longer than DUR (30m, 2h, 7d)")


def _filters(args: argparse.Namespace, *, ids: list[str] | None = None) -> Filters:
    older = parse_duration(args.older_than) if args.older_than else None
    return Filters(tenant=args.tenant, reason=args.reason, older_than_ms=older, ids=tuple(ids or ()))


def run_list(args: argparse.Namespace, settings: Settings) -> int:
    try:
        filters = _filters(args)
    except ValueError as e:
        return fail(str(e), code=2)
    try:
        with _connect(settings) as conn:
            entries = list_dead(conn, filters, limit=args.limit)
    except DatabaseUnavailable as e:
        return fail(str(e))
    if args.json:
        print(json.dumps([e.summary() for e in entries], indent=2))
        return 0
    if not entries:
        print("the dead-letter queue is empty" if filters == Filters() else "no dead job matches")
        return 0
    now = datetime.now(UTC)
    # Ids, tenants and document numbers come from publishers: escaped, they cannot drive the terminal.
    rows: list[tuple[str, ...]] = [
        tuple(
            printable(cell)
            for cell in (e.id, e.tenant or "-", e.document, e.reason, str(e.attempts), _age(now, e.dead_at))
        )
        for e in entries
    ]
    _table(("ID", "TENANT", "DOCUMENT", "REASON", "ATTEMPTS", "DEAD FOR"), rows)
    print(f"\n{len(entries)} dead job(s); 'postbote dlq show ID' for details")
    return 0


def run_show(args: argparse.Namespace, settings: Settings) -> int:
    try:
        with _connect(settings) as conn:
            entry = get_dead(conn, args.id)
    except DatabaseUnavailable as e:
        return fail(str(e))
    if entry is None:
        return fail(f"no dead job {args.id!r}")
    print_json(describe(entry))
    return 0


def run_replay(args: argparse.Namespace, settings: Settings) -> int:
    selecting = args.all or args.reason or args.tenant or args.older_than
    if bool(args.ids) == bool(selecting):
        return fail("give job ids, or --all / --reason R / --tenant T (not both)", code=2)
    try:
        filters = _filters(args)
    except ValueError as e:
        return fail(str(e), code=2)
    try:
        with _connect(settings, autocommit=True) as conn:
            ids = args.ids or [e.id for e in list_dead(conn, filters)]
            results = replay(conn, ids, broker_url=settings.broker_url, dry_run=args.dry_run)
    except DatabaseUnavailable as e:
        return fail(str(e))
    for result in results:
        detail = f" - {result.detail}" if result.detail else ""
        print(printable(f"{result.id}: {result.outcome.replace('_', ' ')}{detail}"))
    if not results:
        print("nothing to replay")
    bad = [r for r in results if r.outcome in ("not_found", "not_replayable", "failed")]
    return 1 if bad else 0


def run_purge(args: argparse.Namespace, settings: Settings) -> int:
    try:
        filters = _filters(args, ids=args.ids)
    except ValueError as e:
        return fail(str(e), code=2)
    try:
        with _connect(settings, autocommit=True) as conn:
            count = count_dead(conn, filters)
            if count == 0:
                print("nothing to purge")
                return 0
            if not args.yes and not _confirmed(count):
                return fail("not purged" if sys.stdin.isatty() else "refusing to purge without --yes", code=2)
            purged = purge(conn, filters)
    except DatabaseUnavailable as e:
        return fail(str(e))
    print(f"purged {purged} dead job(s)")
    return 0


def _connect(settings: Settings, *, autocommit: bool = False) -> Connection:
    return connect(
        settings.database_url, autocommit=autocommit, statement_timeout_ms=settings.statement_timeout_ms
    )


def _confirmed(count: int) -> bool:
    if not sys.stdin.isatty():
        return False
    answer = input(f"Delete {count} dead job(s) for good? The ledger keeps their history. [y/N] ")
    return answer.strip().lower() in ("y", "yes")


def _age(now: datetime, then: datetime | None) -> str:
    if then is None:
        return "-"
    seconds = int((now - then).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
