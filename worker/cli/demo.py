"""``postbote demo``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from worker.settings import Settings


def register(subparsers: Any) -> None:
    demo = subparsers.add_parser(
        "demo",
        help="two demo tenants, a realistic batch of documents, workers and the sink; prints a summary",
    )
    demo.add_argument("--count", type=int, default=240, help="documents to send (default 240)")
    demo.add_argument("--processes", type=int, default=2, help="worker processes (default 2)")
    demo.add_argument("--threads", type=int, default=4, help="threads per process (default 4)")
    demo.add_argument("--workdir", type=Path, default=Path("var/demo"), help="where mail and logs go")
    demo.set_defaults(func=run)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from worker.tools.demo import run_demo

    return run_demo(
        settings, count=args.count, processes=args.processes, threads=args.threads, workdir=args.workdir
    )
