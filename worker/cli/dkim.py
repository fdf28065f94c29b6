"""``postbote dkim keygen`` and ``postbote dkim check``."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import psycopg
from pydantic import ValidationError

from schemas.tenant import Dkim
from worker.cli.output import fail, print_json
from worker.errors import ConfigurationError, DatabaseUnavailable, UnknownTenant
from worker.job.accounts import SecretAccess
from worker.settings import Settings
from worker.tools.dkim_keys import (
    DEFAULT_RSA_BITS,
    CheckResult,
    check_dkim,
    dns_record,
    generate_private_key,
    key_file_name,
    private_key_pem,
    write_private_key,
)

_SELECTOR = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})+$")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``dkim`` command family to the ``postbote`` parser."""
    parser = subparsers.add_parser("dkim", help="DKIM keys: generate, check against DNS")
    commands = parser.add_subparsers(dest="dkim_command", metavar="COMMAND", required=True)

    keygen = commands.add_parser(
        "keygen", help="write a new private key and print the DNS TXT record to publish"
    )
    keygen.add_argument("--domain", required=True, help="signing domain (d=), e.g. acme.example")
    keygen.add_argument("--selector", required=True, help="selector (s=), e.g. s2026")
    keygen.add_argument("--algorithm", choices=("rsa", "ed25519"), default="rsa")
    keygen.add_argument("--bits", type=int, default=None, help=f"RSA key size (default {DEFAULT_RSA_BITS})")
    keygen.add_argument("--out", type=Path, default=Path("."), help="directory for the key file (default .)")
    keygen.add_argument("--json", action="store_true", help="print the result as JSON")
    keygen.set_defaults(func=keygen_command)

    check = commands.add_parser("check", help="compare the tenant's DKIM keys with what DNS publishes")
    check.add_argument("--tenant", required=True, help="tenant id")
    check.add_argument("--json", action="store_true", help="print the result as JSON")
    check.set_defaults(func=check_command)


def keygen_command(args: argparse.Namespace, settings: Settings) -> int:
    """Generate a key pair, write the private key (mode 0600), print the DNS record."""
    if not _DOMAIN.match(args.domain):
        return fail(f"--domain {args.domain!r} is not a domain name", code=2)
    if not _SELECTOR.match(args.selector):
        return fail(f"--selector {args.selector!r}: use letters, digits, '.', '_' or '-'", code=2)
    if args.algorithm == "ed25519" and args.bits is not None:
        return fail("--bits applies to RSA keys only", code=2)
    if not args.out.is_dir():
        return fail(f"--out {args.out}: no such directory", code=2)
    try:
        key = generate_private_key(args.algorithm, args.bits or DEFAULT_RSA_BITS)
    except ValueError as e:
        return fail(f"--bits: {e}", code=2)
    path = args.out / key_file_name(args.domain, args.selector)
    try:
        write_private_key(path, private_key_pem(key))
    except FileExistsError:
        return fail(f"{path} exists; not overwriting a key (pick a new selector for a new key)", code=2)
    except OSError as e:
        return fail(f"cannot write {path}: {e.strerror}")
    record = dns_record(args.domain, args.selector, key)
    if args.json:
        print_json(
            {
                "private_key_file": str(path),
                "name": record.name,
                "value": record.value,
                "strings": record.strings,
            }
        )
        return 0
    print(f"wrote {path} (mode 0600); keep it secret, point the tenant's dkim.private_key_file at it")
    print(f"\npublish this TXT record at {record.name}:\n\n{record.zone_line()}\n")
    print(f"(web DNS forms take the value unquoted, in one piece:)\n{record.value}")
    return 0


def check_command(args: argparse.Namespace, settings: Settings) -> int:
    """Check every DKIM key of the tenant against DNS; exit 0 only when all match."""
    try:
        config = load_tenant_dkim(settings, args.tenant)
    except UnknownTenant as e:
        return fail(str(e), code=2)
    except (DatabaseUnavailable, ConfigurationError) as e:
        return fail(str(e))
    if config is None:
        return fail(f"tenant {args.tenant!r} has no dkim settings")
    try:
        results = check_dkim(config)
    except ConfigurationError as e:
        return fail(str(e))
    _print_results(results, as_json=args.json)
    return 0 if all(r.ok for r in results) else 1


def _print_results(results: list[CheckResult], *, as_json: bool) -> None:
    if as_json:
        print_json(
            [{"role": r.role, "name": r.name, "status": str(r.status), "detail": r.detail} for r in results]
        )
        return
    for r in results:
        print(f"{r.role:<5} {r.name}: {r.status.upper()} - {r.detail}")


def load_tenant_dkim(settings: Settings, tenant_id: str) -> Dkim | None:
    """The tenant's ``dkim`` settings from ``tenants(id, dkim jsonb)``; None when the tenant has none.

    This is the dkim commands' only database access.

    Raises:
      UnknownTenant: no tenant ``tenant_id``.
      DatabaseUnavailable: the database cannot be reached or queried.
      ConfigurationError: the stored settings do not validate.
    """
    try:
        with psycopg.connect(settings.database_url, connect_timeout=10) as conn:
            row = conn.execute("SELECT dkim FROM tenants WHERE id = %s", (tenant_id,)).fetchone()
    except psycopg.Error as e:
        raise DatabaseUnavailable(f"cannot read tenant {tenant_id!r}: {e}") from e
    if row is None:
        raise UnknownTenant(f"no tenant {tenant_id!r}")
    if row[0] is None:
        return None
    try:
        return Dkim.model_validate(
            SecretAccess.from_settings(settings).open(row[0], tenant=tenant_id, column="dkim")
        )
    except ValidationError as e:
        # Only locations and messages: pydantic's full text would echo the input, private key included.
        problems = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'dkim'}: {x['msg']}" for x in e.errors())
        raise ConfigurationError(f"tenant {tenant_id!r} has invalid dkim settings: {problems}") from None


__all__ = ["check_command", "keygen_command", "load_tenant_dkim", "register"]
