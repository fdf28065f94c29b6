"""``postbote bounces ingest|fetch``: read bounce reports from a file, a Maildir, standard input (a
local MTA's ``pipe``) or the tenant's IMAP mailbox, and apply the ones that match a job."""

from __future__ import annotations

import argparse
import json
from typing import Any

from worker.bounces import ingest_report
from worker.bounces.imap import MailboxUnavailable, fetch_once
from worker.bounces.intake import read_messages
from worker.cli.output import fail, print_json
from worker.db import connect
from worker.errors import ConfigurationError, DatabaseUnavailable, PostboteError
from worker.settings import Settings


def register(subparsers: Any) -> None:
    bounces = subparsers.add_parser(
        "bounces",
        help="bounce reports: ingest from a file, Maildir or stdin; fetch from the tenant's IMAP mailbox",
        description="Match bounce reports that arrive after the SMTP server accepted a mail to their job and"
        " recipient (docs/bounces.md). Mail that matches nothing is left untouched.",
    )
    commands = bounces.add_subparsers(dest="bounces_command", metavar="COMMAND", required=True)
    ingest = commands.add_parser("ingest", help="read one message, a Maildir or a directory, or - for stdin")
    ingest.add_argument("source", nargs="?", default="-", metavar="FILE|DIR|-")
    ingest.add_argument("--tenant", help="only match jobs of this tenant")
    ingest.add_argument("--json", action="store_true", help="one JSON object per message")
    ingest.set_defaults(func=run_ingest)
    fetch = commands.add_parser("fetch", help="read the tenant's bounces.imap folder once")
    fetch.add_argument("--tenant", required=True)
    fetch.add_argument("--json", action="store_true")
    fetch.set_defaults(func=run_fetch)


def run_ingest(args: argparse.Namespace, settings: Settings) -> int:
    try:
        messages = list(read_messages(args.source))
    except FileNotFoundError:
        return fail(f"{args.source}: no such file or directory", code=2)
    except OSError as e:
        return fail(f"{args.source}: cannot read: {e.strerror}", code=2)
    try:
        with connect(settings.database_url, autocommit=True) as conn:
            for name, data in messages:
                ingested = ingest_report(conn, data, tenant=args.tenant)
                recorded = [
                    {
                        "job_id": str(m.job_id),
                        "tenant": m.tenant,
                        "address": m.address,
                        "class": c.value,
                        "status": m.finding.status,
                        "reply": m.finding.reply,
                        "matched_by": m.matched_by,
                        "outcome": outcome,
                    }
                    for m, c, outcome in ingested.recorded
                ]
                if args.json:
                    print(json.dumps({"message": name, "report": ingested.report, "recorded": recorded}))
                elif not ingested.report:
                    print(f"{name}: no bounce report; left alone")
                elif not recorded:
                    print(f"{name}: a report that matches no job and recipient; left alone")
                else:
                    for r in recorded:
                        print(
                            f"{name}: {r['outcome']}: job {r['job_id']} {r['address']}"
                            f" ({r['class']}, {r['status']}) by {r['matched_by']}"
                        )
    except DatabaseUnavailable as e:
        return fail(str(e))
    return 0


def run_fetch(args: argparse.Namespace, settings: Settings) -> int:
    try:
        with connect(settings.database_url, autocommit=True) as conn:
            done = fetch_once(conn, args.tenant, settings)
    except ConfigurationError as e:
        return fail(str(e), code=2)
    except (MailboxUnavailable, PostboteError) as e:
        return fail(str(e))
    if args.json:
        print_json(done.__dict__)
    else:
        print(
            f"read {done.read} new messages: {done.reports} bounce reports, {done.matched} matched a job,"
            f" {done.recorded} recipients changed"
        )
    return 0
