"""``postbote suppression list|add|remove|import|export|release --tenant T``: the addresses a
tenant does not send to, and the jobs held because of them (docs/bounces.md)."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from pydantic import TypeAdapter, ValidationError

from schemas.fields import Address
from worker.cli.output import fail
from worker.db import Connection, connect
from worker.errors import DatabaseUnavailable
from worker.settings import Settings
from worker.tools.dlq import parse_duration
from worker.tools.suppressions import (
    ImportLine,
    add_entries,
    export_csv,
    list_entries,
    parse_import,
    release_held,
    remove_entries,
)

_ADDRESS: TypeAdapter[str] = TypeAdapter(Address)


def register(subparsers: Any) -> None:
    suppression = subparsers.add_parser(
        "suppression",
        help="the tenant's suppression list: list, add, remove, import, export; release held jobs",
        description="Addresses the tenant does not send to (hard bounces, 5.1.x refusals, manual, imported)."
        " A job to one is held (or sent, by the tenant's suppression policy); removing the entry sends it.",
    )
    commands = suppression.add_subparsers(dest="suppression_command", metavar="COMMAND", required=True)

    listing = commands.add_parser("list", help="the entries, newest first")
    listing.add_argument("--expired", action="store_true", help="also entries that have expired")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=run_list)

    add = commands.add_parser("add", help="suppress addresses (source manual)")
    add.add_argument("addresses", nargs="+", metavar="ADDRESS")
    add.add_argument(
        "--for", dest="duration", metavar="DURATION", help="expire after 30d, 12h …; default never"
    )
    add.add_argument("--note", help="why (shown by list)")
    add.set_defaults(func=run_add)

    remove = commands.add_parser("remove", help="remove entries and send the jobs they held, once")
    remove.add_argument("addresses", nargs="+", metavar="ADDRESS")
    remove.set_defaults(func=run_remove)

    imported = commands.add_parser("import", help="add entries from a file (source import)")
    imported.add_argument("file", metavar="FILE|-", help="addresses one per line, or the CSV export writes")
    imported.set_defaults(func=run_import)

    export = commands.add_parser("export", help="the entries as CSV on standard output")
    export.add_argument("--expired", action="store_true", help="also entries that have expired")
    export.set_defaults(func=run_export)

    release = commands.add_parser("release", help="send held jobs despite their entries (the entries stay)")
    release.add_argument("addresses", nargs="*", metavar="ADDRESS", help="jobs held for these addresses")
    release.add_argument("--job", action="append", default=[], metavar="ID", help="this held job")
    release.add_argument("--all", action="store_true", help="every job the tenant's list holds")
    release.set_defaults(func=run_release)

    for command in (listing, add, remove, imported, export, release):
        command.add_argument("--tenant", required=True)


def run_list(args: argparse.Namespace, settings: Settings) -> int:
    with _db(settings) as conn:
        entries = list_entries(conn, args.tenant, expired=args.expired)
    if args.json:
        print(json.dumps(entries, indent=2, default=str))
        return 0
    if not entries:
        print(f"no suppressed addresses for tenant {args.tenant}")
    for e in entries:
        until = e["expires_at"].isoformat(timespec="seconds") if e["expires_at"] else "until removed"
        why = ", ".join(str(p) for p in (e["class"], e["reply"]) if p)
        held = f", holds {e['held_jobs']} jobs" if e["held_jobs"] else ""
        print(f"{e['address']}  {e['source']}  {until}{held}" + (f"  {why}" if why else ""))
    return 0


def run_add(args: argparse.Namespace, settings: Settings) -> int:
    expires_at = None
    if args.duration:
        try:
            expires_at = datetime.now(UTC) + timedelta(milliseconds=parse_duration(args.duration))
        except ValueError as e:
            return fail(f"--for: {e}", code=2)
    lines = []
    for raw in args.addresses:
        try:
            lines.append(ImportLine(_ADDRESS.validate_python(raw), expires_at, args.note))
        except ValidationError:
            return fail(f"{raw!r} is not an e-mail address", code=2)
    with _db(settings) as conn:
        added = add_entries(conn, args.tenant, lines)
    print(f"suppressed {added} addresses for tenant {args.tenant}")
    return 0


def run_remove(args: argparse.Namespace, settings: Settings) -> int:
    with _db(settings) as conn:
        removed, released = remove_entries(conn, args.tenant, args.addresses)
    print(f"removed {removed} entries; released {released} held jobs")
    return 0 if removed else 1


def run_import(args: argparse.Namespace, settings: Settings) -> int:
    try:
        text = sys.stdin.read() if args.file == "-" else open(args.file, encoding="utf-8").read()  # noqa: SIM115
    except OSError as e:
        return fail(f"{args.file}: cannot read: {e.strerror}", code=2)
    try:
        lines = parse_import(text)
    except ValueError as e:
        return fail(f"{args.file}: {e}; nothing imported", code=2)
    with _db(settings) as conn:
        added = add_entries(conn, args.tenant, lines, source="import")
    print(f"imported {added} addresses for tenant {args.tenant}")
    return 0


def run_export(args: argparse.Namespace, settings: Settings) -> int:
    with _db(settings) as conn:
        sys.stdout.write(export_csv(list_entries(conn, args.tenant, expired=args.expired)))
    return 0


def run_release(args: argparse.Namespace, settings: Settings) -> int:
    if not (args.addresses or args.job or args.all):
        return fail("name addresses, --job ID or --all", code=2)
    try:
        jobs = [UUID(j) for j in args.job]
    except ValueError:
        return fail(f"--job: {args.job!r} holds something that is not a job id", code=2)
    with _db(settings) as conn:
        released = release_held(conn, args.tenant, addresses=args.addresses, job_ids=jobs)
    print(f"released {released} held jobs")
    return 0


def _db(settings: Settings) -> Connection:
    try:
        return connect(settings.database_url, autocommit=True)
    except DatabaseUnavailable as e:
        fail(str(e))
        raise SystemExit(1) from None
