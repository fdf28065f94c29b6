"""The ``postbote`` command line: ``build_parser()`` and ``main(argv) -> exit code``.

Each command family lives in its own module with a ``register(subparsers)``
function; a registered command sets ``func(args, settings) -> int``.
Exit codes: 0 success, 1 failure, 2 bad input.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from pydantic import ValidationError
from pydantic_settings import SettingsError

from worker.cli.output import fail
from worker.settings import Settings

COMMANDS: dict[str, tuple[str, ...]] = {
    "db": ("db",),
    "tenants": ("tenants",),
    "send": ("send",),
    "run": ("worker", "check"),
    "status": ("status",),
    "control": ("pause", "resume", "cancel", "jobs"),
    "events": ("events",),
    "dlq": ("dlq",),
    "queues": ("queues",),
    "bounces": ("bounces",),
    "suppression": ("suppression",),
    "secrets": ("secrets",),
    "retention": ("retention",),
    "dkim": ("dkim",),
    "testmail": ("test-mail",),
    "sink": ("sink",),
    "demo": ("demo",),
}
"""The command modules of this package and the commands each registers, in the order of ``--help``.
A command imports only its own module: ``postbote send`` loads neither dramatiq nor psycopg."""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or of ``command`` alone."""
    parser = argparse.ArgumentParser(
        prog="postbote",
        description="Send ERP documents by e-mail: RabbitMQ jobs, sender rules, DKIM, series limits.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module, commands in COMMANDS.items():
        if command is None or command in commands:
            importlib.import_module(f"worker.cli.{module}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv and any(argv[0] in names for names in COMMANDS.values()) else None
    args = build_parser(command).parse_args(argv)
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
