"""``postbote sink --port P --maildir DIR``."""

from __future__ import annotations

import argparse
import signal
import threading
from pathlib import Path
from typing import Any

from worker.cli.output import fail
from worker.logs import configure_logging
from worker.settings import Settings


def register(subparsers: Any) -> None:
    sink = subparsers.add_parser("sink", help="run the embedded SMTP sink (stores every message)")
    sink.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sink.add_argument("--port", type=int, default=2525, help="port (default 2525)")
    sink.add_argument("--maildir", type=Path, required=True, help="directory for the received messages")
    sink.set_defaults(func=run_sink)


def run_sink(args: argparse.Namespace, settings: Settings) -> int:
    from worker.testbed.sink import Sink

    configure_logging(settings.log_format)
    try:
        sink = Sink(args.maildir, host=args.host, port=args.port)
    except OSError as e:
        return fail(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}")
    print(f"SMTP sink on {args.host}:{sink.port}, storing in {args.maildir}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    sink.stop()
    return 0
