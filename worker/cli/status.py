"""``postbote status JOB_ID``."""

from __future__ import annotations

import argparse
from typing import Any
from uuid import UUID

from worker.cli.output import fail, print_json
from worker.db import connect
from worker.errors import DatabaseUnavailable
from worker.ledger import delivery_record
from worker.settings import Settings


def register(subparsers: Any) -> None:
    status = subparsers.add_parser("status", help="a job's delivery record (JSON)")
    status.add_argument("job_id", help="the job id printed by 'postbote send'")
    status.set_defaults(func=run_status)


def run_status(args: argparse.Namespace, settings: Settings) -> int:
    try:
        job_id = UUID(args.job_id)
    except ValueError:
        return fail(f"{args.job_id!r} is not a job id (a UUID)", code=2)
    try:
        with connect(settings.database_url) as conn:
            record = delivery_record(conn, job_id)
    except DatabaseUnavailable as e:
        return fail(str(e))
    if record is None:
        return fail(f"no delivery record for job {job_id}: not yet picked up by a worker, or unknown")
    print_json(record)
    return 0
