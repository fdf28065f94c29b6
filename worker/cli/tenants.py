"""``postbote tenants apply FILE``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from worker.cli.output import fail
from worker.db import connect
from worker.errors import ConfigurationError, DatabaseUnavailable
from worker.settings import Settings
from worker.tools.tenant_file import (
    TenantFileRefused,
    TenantPolicy,
    apply_tenants,
    parse_problem,
    read_tenant_file,
)


def register(subparsers: Any) -> None:
    tenants = subparsers.add_parser("tenants", help="tenant settings")
    commands = tenants.add_subparsers(dest="tenants_command", metavar="COMMAND", required=True)
    apply = commands.add_parser(
        "apply", help="load tenants from a YAML or JSON file (upsert in one transaction)"
    )
    apply.add_argument("file", type=Path, help="tenant file (.yaml, .yml or .json)")
    apply.set_defaults(func=run_apply)


def run_apply(args: argparse.Namespace, settings: Settings) -> int:
    try:
        tenant_file = read_tenant_file(args.file)
    except OSError as e:
        return fail(f"cannot read {args.file}: {e.strerror}", code=2)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        return fail(f"{args.file} is not valid YAML/JSON: {parse_problem(e)}", code=2)
    except ValidationError as e:
        lines = [f"{args.file} is not a valid tenant file:"]
        for item in e.errors():
            where = ".".join(str(p) for p in item["loc"])
            lines.append(f"  {where}: {item['msg']}")
        return fail("\n".join(lines), code=2)
    try:
        policy = TenantPolicy.from_settings(settings)
    except ConfigurationError as e:
        return fail(str(e), code=2)
    try:
        with connect(settings.database_url) as conn:
            changes = apply_tenants(conn, tenant_file, policy)
    except TenantFileRefused as e:
        return fail("\n".join([f"{args.file} was not applied:", *(f"  {p}" for p in e.problems)]), code=2)
    except DatabaseUnavailable as e:
        return fail(str(e))
    for change in changes:
        detail = f" ({'; '.join(change.details)})" if change.details else ""
        print(f"tenant {change.tenant}: {change.action}{detail}")
    return 0
