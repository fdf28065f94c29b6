"""``postbote status JOB_ID`` and ``postbote status --document TYPE NUMBER [--tenant T]``."""

from __future__ import annotations

import argparse
from typing import Any
from uuid import UUID

from schemas.job import DocumentType
from worker.cli.output import fail, print_json
from worker.db import Connection, connect
from worker.errors import DatabaseUnavailable
from worker.job.ledger import delivery_record, document_records
from worker.settings import Settings
from worker.tools.dlq import get_dead


def register(subparsers: Any) -> None:
    status = subparsers.add_parser(
        "status",
        help="a job's delivery record (JSON): recipients with role, state and reply, attempt history",
    )
    status.add_argument("job_id", nargs="?", help="the job id printed by 'postbote send'")
    status.add_argument(
        "--document",
        nargs=2,
        metavar=("TYPE", "NUMBER"),
        help="every job for one business document instead, newest first (a JSON list)",
    )
    status.add_argument("--tenant", help="with --document: only this tenant's jobs")
    status.set_defaults(func=run_status)


def run_status(args: argparse.Namespace, settings: Settings) -> int:
    if (args.job_id is None) == (args.document is None):
        return fail("give either a job id or --document TYPE NUMBER", code=2)
    if args.tenant is not None and args.document is None:
        return fail("--tenant goes with --document", code=2)
    try:
        with connect(settings.database_url) as conn:
            if args.document is not None:
                return _document(conn, args.document[0], args.document[1], args.tenant)
            return _job(conn, args.job_id)
    except DatabaseUnavailable as e:
        return fail(str(e))


def _job(conn: Connection, text: str) -> int:
    try:
        job_id = UUID(text)
    except ValueError:
        return fail(f"{text!r} is not a job id (a UUID)", code=2)
    record = delivery_record(conn, job_id)
    if record is not None:
        print_json(record)
        return 0
    dead = get_dead(conn, str(job_id))
    if dead is not None:
        return fail(
            f"no delivery record for job {job_id}: it was dead-lettered before any send ({dead.reason}:"
            f" {dead.detail}); see 'postbote dlq show {job_id}'"
        )
    return fail(
        f"no delivery record for job {job_id}: no worker has seen it yet (it may still be queued),"
        " or the id is unknown"
    )


def _document(conn: Connection, doc_type: str, number: str, tenant: str | None) -> int:
    known = [t.value for t in DocumentType]
    if doc_type not in known:
        return fail(f"{doc_type!r} is not a document type (one of {', '.join(known)})", code=2)
    records = document_records(conn, doc_type, number, tenant=tenant)
    if not records:
        where = f" of tenant {tenant!r}" if tenant else ""
        return fail(
            f"no job for {doc_type} {number}{where} is in the ledger: no worker has seen one yet"
            " (it may still be queued), or it was never sent"
        )
    print_json(records)
    return 0
