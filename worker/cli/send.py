"""``postbote send [FILE|-]``: validate, publish, print one job id per line."""

from __future__ import annotations

import argparse
import gc
import sys
from typing import Any

from producer import InvalidLine, PublishError, publish, read_jobs
from schemas.job import Job
from worker.cli.output import fail
from worker.settings import Settings


def register(subparsers: Any) -> None:
    send = subparsers.add_parser(
        "send",
        help="validate and publish jobs (one JSON object, or JSON lines)",
        description="Validates every job first; publishes nothing if any line is invalid (exit 2). "
        "Prints one job id per line once the broker confirmed each job.",
    )
    send.add_argument("file", nargs="?", default="-", help="file with the job(s); '-' or absent: stdin")
    send.set_defaults(func=run_send)


def run_send(args: argparse.Namespace, settings: Settings) -> int:
    # The jobs read are many objects, kept until published, that form no reference cycles:
    # the collector would only walk them again and again (a tenth of the reading time).
    gc.disable()
    try:
        jobs, errors = _read(args.file, settings.max_job_bytes)
    except OSError as e:
        return fail(f"cannot read {args.file}: {e.strerror}", code=2)
    except UnicodeDecodeError:
        return fail(f"{args.file} is not UTF-8 text", code=2)
    finally:
        gc.enable()
    if errors:
        for error in errors[:20]:
            print(f"postbote: invalid job: {error}", file=sys.stderr)
        if len(errors) > 20:
            print(f"postbote: … and {len(errors) - 20} more errors", file=sys.stderr)
        return fail("nothing was published", code=2)
    try:
        ids = publish(
            jobs,
            broker_url=settings.broker_url,
            queue_prefix=settings.queue_prefix,
            queue_type=settings.queue_type,
        )
    except PublishError as e:
        for job_id in e.confirmed:
            print(job_id)
        return fail(f"{e}; {len(e.confirmed)} job(s) confirmed (printed above), the rest were not")
    for job_id in ids:
        print(job_id)
    return 0


def _read(file: str, max_job_bytes: int) -> tuple[list[Job], list[InvalidLine]]:
    if file == "-":
        return read_jobs(sys.stdin, max_job_bytes=max_job_bytes)
    with open(file, encoding="utf-8") as f:
        return read_jobs(f, max_job_bytes=max_job_bytes)
