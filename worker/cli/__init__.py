"""The ``postbote`` command line: ``build_parser()`` and ``main(argv) -> exit code``.

Each command family lives in its own module with a ``register(subparsers)``
function; a registered command sets ``func(args, settings) -> int``.
Exit codes: 0 success, 1 failure, 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pydantic import ValidationError
from pydantic_settings import SettingsError

from worker.cli import (
    bounces,
    control,
    db,
    demo,
    dkim,
    dlq,
    events,
    queues,
    retention,
    run,
    secrets,
    send,
    sink,
    status,
    suppression,
    tenants,
    testmail,
)
from worker.cli.output import fail
from worker.settings import Settings

COMMANDS = (
    db,
    tenants,
    send,
    run,
    status,
    control,
    events,
    dlq,
    queues,
    bounces,
    suppression,
    secrets,
    retention,
    dkim,
    testmail,
    sink,
    demo,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="postbote",
        description="Send ERP documents by e-mail: RabbitMQ jobs, sender rules, DKIM, series limits.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as e:
        # Names and problems only: pydantic's own text repeats the values, URLs with passwords included.
        problems = [f"POSTBOTE_{'_'.join(map(str, x['loc'])).upper() or '*'}: {x['msg']}" for x in e.errors()]
        return fail("invalid POSTBOTE_* environment:\n  " + "\n  ".join(problems), code=2)
    except SettingsError as e:
        return fail(f"invalid POSTBOTE_* environment: {str(e).splitlines()[0]}", code=2)
    try:
        code: int = args.func(args, settings)
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
