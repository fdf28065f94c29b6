"""``postbote secrets keygen`` and ``postbote secrets rotate``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from worker.cli.output import fail
from worker.db import connect
from worker.errors import ConfigurationError, DatabaseUnavailable
from worker.runtime.secrets_box import generate_key, load_key_ring
from worker.settings import Settings
from worker.tools.secrets import rotate_secrets


def register(subparsers: Any) -> None:
    secrets = subparsers.add_parser("secrets", help="the key that seals tenant secrets in the database")
    commands = secrets.add_subparsers(dest="secrets_command", metavar="COMMAND", required=True)
    keygen = commands.add_parser(
        "keygen", help="make a new sealing key: print it, or put it first in a key file (mode 0600)"
    )
    keygen.add_argument(
        "--file", type=Path, help="key file to create, or to add the key to as the new sealing key"
    )
    keygen.set_defaults(func=run_keygen)
    rotate = commands.add_parser(
        "rotate", help="seal every stored tenant secret with the first key of POSTBOTE_SECRETS_KEY_FILE"
    )
    rotate.add_argument("--dry-run", action="store_true", help="only count what would be sealed anew")
    rotate.set_defaults(func=run_rotate)


def run_keygen(args: argparse.Namespace, settings: Settings) -> int:
    key = generate_key()
    if args.file is None:
        print(key)
        return 0
    path: Path = args.file
    try:
        old = path.read_text(encoding="utf-8") if path.exists() else ""
        fd = os.open(path.with_name(path.name + ".new"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"{key}\n{old}")
        os.replace(path.with_name(path.name + ".new"), path)
    except OSError as e:
        return fail(f"cannot write {path}: {e.strerror}")
    print(f"{path}: new sealing key first; copy the file to every host, then run 'postbote secrets rotate'")
    return 0


def run_rotate(args: argparse.Namespace, settings: Settings) -> int:
    if settings.secrets_key_file is None:
        return fail("POSTBOTE_SECRETS_KEY_FILE is not set: nothing to seal with", code=2)
    try:
        ring = load_key_ring(settings.secrets_key_file)
        assert ring is not None
        with connect(settings.database_url) as conn:
            rotation = rotate_secrets(conn, ring, dry_run=args.dry_run)
    except ConfigurationError as e:
        return fail(str(e), code=2)
    except DatabaseUnavailable as e:
        return fail(str(e))
    verb = "would seal" if args.dry_run else "sealed"
    print(f"{verb} {rotation.secrets} secret(s) of {rotation.tenants} tenant(s) with key {ring.current_id}")
    return 0


__all__ = ["register"]
