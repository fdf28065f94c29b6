"""``postbote pause``, ``resume``, ``cancel`` and ``jobs``: operators in control of what goes out."""

from __future__ import annotations

import argparse
import getpass
import socket
import sys
import time
from datetime import datetime
from typing import Any
from uuid import UUID

from schemas.constants import lane_queues
from schemas.job import DocumentType
from worker.cli.output import fail, print_json
from worker.db import Connection, connect
from worker.errors import BrokerUnavailable, DatabaseUnavailable
from worker.job.directives import (
    CancelCounts,
    Scope,
    active_pauses,
    cancel,
    cancel_counts,
    directive_scope,
    pause,
    resume,
)
from worker.job.parking import waiting_jobs
from worker.runtime.queue_depth import count_ready
from worker.settings import Settings

_DOC_TYPES = [t.value for t in DocumentType]
_WAITING = ("held", "retrying", "scheduled", "sending")
_SETTLE_POLLS = 3
"""Polls in a row with nothing waiting, nothing in flight and no change before ``--wait`` ends."""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "pause", help="hold a tenant's jobs (every document type but receipts, or those named)"
    )
    p.add_argument("--tenant", required=True)
    p.add_argument(
        "--doc-type", action="append", choices=_DOC_TYPES, metavar="TYPE", help="only this type (repeatable)"
    )
    p.add_argument("--reason", help="why, kept with the pause and shown in 'postbote jobs'")
    p.set_defaults(func=run_pause)

    r = subparsers.add_parser(
        "resume", help="lift a pause; held jobs go out in their original order, each once"
    )
    r.add_argument("--tenant", required=True)
    r.add_argument(
        "--doc-type", action="append", choices=_DOC_TYPES, metavar="TYPE", help="only this type (repeatable)"
    )
    r.set_defaults(func=run_resume)

    c = subparsers.add_parser(
        "cancel", help="cancel jobs not sent yet: by id, or by tenant, type and publication time"
    )
    c.add_argument("job_ids", nargs="*", metavar="JOB_ID")
    c.add_argument("--tenant")
    c.add_argument(
        "--doc-type", action="append", choices=_DOC_TYPES, metavar="TYPE", help="only this type (repeatable)"
    )
    c.add_argument(
        "--published-before",
        metavar="TIME",
        help="only jobs published before this ISO 8601 time with offset (default: now)",
    )
    c.add_argument("--reason", help="why, kept in the ledger")
    c.add_argument("--dry-run", action="store_true", help="count what a cancel would do; change nothing")
    c.add_argument(
        "--wait", action="store_true", help="wait until every matching job is decided; print final counts"
    )
    c.add_argument("--json", action="store_true", help="print the counts as JSON")
    c.set_defaults(func=run_cancel)

    j = subparsers.add_parser("jobs", help="jobs not ended yet, and why they wait")
    j.add_argument("--tenant")
    j.add_argument("--status", choices=_WAITING)
    j.add_argument("--doc-type", choices=_DOC_TYPES, metavar="TYPE")
    j.add_argument("--limit", type=int, default=1000)
    j.add_argument("--json", action="store_true")
    j.set_defaults(func=run_jobs)


def _operator() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _known_tenant(conn: Connection, tenant: str) -> bool:
    return conn.execute("SELECT 1 FROM tenants WHERE id = %s", (tenant,)).fetchone() is not None


def run_pause(args: argparse.Namespace, settings: Settings) -> int:
    try:
        with connect(settings.database_url, autocommit=True) as conn:
            if not _known_tenant(conn, args.tenant):
                return fail(f"tenant {args.tenant!r} is unknown (see 'postbote tenants list')", code=2)
            directive = pause(conn, args.tenant, args.doc_type, reason=args.reason, by=_operator())
    except DatabaseUnavailable as e:
        return fail(str(e))
    what = ", ".join(args.doc_type) if args.doc_type else "every document type but receipts"
    print(
        f"paused tenant {args.tenant} ({what}) as directive {directive}: its jobs are held from their next"
        f" step on; 'postbote resume --tenant {args.tenant}' releases them"
    )
    return 0


def run_resume(args: argparse.Namespace, settings: Settings) -> int:
    try:
        with connect(settings.database_url, autocommit=True) as conn:
            if not _known_tenant(conn, args.tenant):
                return fail(f"tenant {args.tenant!r} is unknown (see 'postbote tenants list')", code=2)
            resumed = resume(conn, args.tenant, args.doc_type, by=_operator())
    except DatabaseUnavailable as e:
        return fail(str(e))
    if resumed.lifted == 0:
        print(f"tenant {args.tenant} had no such pause", file=sys.stderr)
    print(f"resumed tenant {args.tenant}: {resumed.released} held jobs released, in their original order")
    for still in resumed.still_paused:
        print(f"still paused: {still}")
    return 0


def _scope(args: argparse.Namespace, conn: Connection) -> Scope | str:
    if args.job_ids and (args.tenant or args.doc_type or args.published_before):
        return "give job ids, or --tenant with --doc-type and --published-before, not both"
    if args.job_ids:
        try:
            return Scope(job_ids=tuple(UUID(j) for j in args.job_ids))
        except ValueError:
            bad = next(j for j in args.job_ids if not _is_uuid(j))
            return f"{bad!r} is not a job id (a UUID)"
    if not args.tenant:
        return "give job ids, or --tenant"
    if not _known_tenant(conn, args.tenant):
        return f"tenant {args.tenant!r} is unknown (see 'postbote tenants list')"
    published_before = None
    if args.published_before:
        try:
            published_before = datetime.fromisoformat(args.published_before)
        except ValueError:
            return f"--published-before {args.published_before!r} is not an ISO 8601 time"
        if published_before.tzinfo is None:
            return f"--published-before {args.published_before!r} needs an offset, e.g. +01:00 or Z"
    return Scope(
        tenant=args.tenant,
        doc_types=tuple(sorted(set(args.doc_type))) if args.doc_type else None,
        published_before=published_before,
    )


def _is_uuid(text: str) -> bool:
    try:
        UUID(text)
    except ValueError:
        return False
    return True


def run_cancel(args: argparse.Namespace, settings: Settings) -> int:
    try:
        with connect(settings.database_url, autocommit=True) as conn:
            scope = _scope(args, conn)
            if isinstance(scope, str):
                return fail(scope, code=2)
            if args.dry_run:
                if scope.job_ids is None and scope.published_before is None:
                    scope = Scope(scope.tenant, scope.doc_types, None, datetime.now().astimezone())
                counts = cancel_counts(conn, scope, directive=None, given_at=None)
                _print_dry_run(counts, args.json)
                return 0
            directive, given_at = cancel(conn, scope, reason=args.reason, by=_operator())
            scope = directive_scope(conn, directive)
            if args.wait:
                counts = _wait(conn, settings, scope, directive, given_at)
            else:
                counts = cancel_counts(conn, scope, directive=directive, given_at=given_at)
    except DatabaseUnavailable as e:
        return fail(str(e))
    except KeyboardInterrupt:
        return fail("stopped waiting; the cancel stays in force ('postbote jobs' shows what waits)", code=130)
    _print_counts(counts, args.json, final=args.wait)
    return 0


def _wait(
    conn: Connection, settings: Settings, scope: Scope, directive: int, given_at: datetime
) -> CancelCounts:
    """Poll until no matching job waits or is in flight, RabbitMQ's work queues hold nothing
    ready, and the counts stay the same for a few polls (a job just taken off the queue reaches
    the ledger within them)."""
    queues = list(lane_queues(settings.queue_prefix))
    last: CancelCounts | None = None
    settled = 0
    while True:
        counts = cancel_counts(conn, scope, directive=directive, given_at=given_at)
        try:
            queued = sum(count_ready(settings.broker_url, queues).values())
        except BrokerUnavailable:
            queued = -1
        quiet = counts.waiting == 0 and counts.in_flight == 0 and queued == 0
        settled = settled + 1 if quiet and counts == last else 0
        if settled >= _SETTLE_POLLS:
            return counts
        if sys.stderr.isatty() or last != counts:
            print(
                f"waiting: {counts.in_flight} in flight, {counts.waiting} not decided yet,"
                f" {'?' if queued < 0 else queued} messages queued; cancelled {counts.cancelled} so far",
                file=sys.stderr,
            )
        last = counts
        time.sleep(0.5)


def _print_counts(counts: CancelCounts, as_json: bool, *, final: bool) -> None:
    if as_json:
        print_json(counts.as_json())
        return
    print(f"cancelled {counts.cancelled}")
    print(f"already sent {counts.already_sent}")
    print(f"in flight then sent {counts.in_flight_sent}")
    if counts.other:
        print(f"ended otherwise {counts.other}")
    if not final:
        print(
            f"{counts.in_flight} held by workers now end at their last check before DATA (cancelled, or"
            " sent if it came first); jobs still queued in RabbitMQ end cancelled when a worker takes them"
            " ('--wait' waits for all of it)"
        )


def _print_dry_run(counts: CancelCounts, as_json: bool) -> None:
    if as_json:
        print_json({"would_cancel": counts.waiting, **counts.as_json()})
        return
    print(f"would cancel {counts.waiting}")
    print(f"already sent {counts.already_sent}")
    print(f"held by workers now {counts.in_flight}")
    print("(and any matching job still queued in RabbitMQ, which the ledger has not seen yet)")


def run_jobs(args: argparse.Namespace, settings: Settings) -> int:
    try:
        with connect(settings.database_url, autocommit=True) as conn:
            rows = waiting_jobs(
                conn, tenant=args.tenant, status=args.status, doc_type=args.doc_type, limit=args.limit
            )
            pauses = active_pauses(conn, args.tenant)
    except DatabaseUnavailable as e:
        return fail(str(e))
    if args.json:
        print_json({"jobs": rows, "pauses": pauses})
        return 0
    for p in pauses:
        what = ", ".join(p["doc_types"]) if p["doc_types"] else "every document type but receipts"
        reason = f": {p['reason']}" if p["reason"] else ""
        print(
            f"PAUSED {p['tenant']} ({what}) since {p['created_at']:%Y-%m-%d %H:%M:%S%z} by {p['created_by']}{reason}"
        )
    if not rows:
        print("no job is waiting")
        return 0
    print(f"{'JOB':36}  {'TENANT':12}  {'DOCUMENT':24}  {'STATUS':9}  {'REASON':16}  NEXT")
    for row in rows:
        due = row["parked_until"] or row["next_attempt_at"]
        document = f"{row['doc_type']} {row['doc_number']}"
        print(
            f"{row['job_id']!s:36}  {row['tenant']:12}  {document[:24]:24}  {row['status']:9}"
            f"  {(row['reason'] or '-')[:16]:16}  {f'{due:%Y-%m-%d %H:%M:%S%z}' if due else '-'}"
        )
    if len(rows) == args.limit:
        print(f"(the first {args.limit}; --limit shows more)")
    return 0
