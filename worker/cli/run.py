"""``postbote worker`` and ``postbote check``."""

from __future__ import annotations

import argparse
import os
from typing import Any

from worker.cli.output import fail
from worker.db import connect
from worker.errors import DatabaseUnavailable
from worker.logs import configure_logging
from worker.runtime.probes import check_broker, check_database
from worker.settings import Settings
from worker.tools.secrets import database_role, unsealed_secrets


def register(subparsers: Any) -> None:
    worker = subparsers.add_parser("worker", help="run the workers and their metrics endpoint")
    worker.add_argument("--processes", type=_positive, default=2, help="worker processes (default 2)")
    worker.add_argument("--threads", type=_positive, default=8, help="bulk threads per process (default 8)")
    worker.add_argument(
        "--receipt-threads", type=_positive, default=2, help="receipt-lane threads per process (default 2)"
    )
    worker.add_argument(
        "--pin-cpus",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run each worker process on one CPU of its own, round robin (Linux). Default: on when "
        "the processes are at least as many as the CPUs postbote may use, off otherwise",
    )
    worker.set_defaults(func=run_worker)
    check = subparsers.add_parser("check", help="exit 0 when broker and database are reachable")
    check.set_defaults(func=run_check)


def run_worker(args: argparse.Namespace, settings: Settings) -> int:
    from worker.runtime.supervisor import supervise

    configure_logging(settings.log_format)
    can_pin = hasattr(os, "sched_setaffinity")
    if args.pin_cpus and not can_pin:
        return fail("--pin-cpus needs an operating system that can pin processes to CPUs (Linux)", code=2)
    pin_cpus = args.pin_cpus if args.pin_cpus is not None else can_pin and fills_cpus(args.processes)
    return supervise(
        settings,
        processes=args.processes,
        threads=args.threads,
        receipt_threads=args.receipt_threads,
        pin_cpus=pin_cpus,
    )


def fills_cpus(processes: int) -> bool:
    """Whether ``processes`` worker processes use every CPU this process may run on. Then pinning
    each to one CPU of its own keeps a process's threads, and the interpreter lock they hand
    each other, on one core's caches, and leaves no CPU idle; with fewer processes than CPUs,
    pinning could crowd them onto CPUs other programs use."""
    return processes >= len(os.sched_getaffinity(0))


def run_check(args: argparse.Namespace, settings: Settings) -> int:
    problems = [p for p in (check_broker(settings.broker_url), check_database(settings.database_url)) if p]
    for problem in problems:
        fail(problem)
    if not problems:
        print("broker and database reachable")
        _report_role(settings)
    return 1 if problems else 0


def _report_role(settings: Settings) -> None:
    """Which database role this runs as, and tenant secrets still stored in plain text."""
    try:
        with connect(settings.database_url) as conn:
            print(database_role(conn).describe())
            unsealed = unsealed_secrets(conn)
    except DatabaseUnavailable as e:
        fail(f"cannot read the database role: {e}")
        return
    if unsealed:
        print(f"warning: {unsealed} tenant secret(s) stored in plain text; run 'postbote secrets rotate'")


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number
