"""``postbote test-mail --tenant T --to ADDR [--from ADDR] [--json]``."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Any

from pydantic import ValidationError

from worker.cli.output import fail, print_json
from worker.db import connect
from worker.errors import ConfigurationError, DatabaseUnavailable, UnknownTenant
from worker.job.accounts import Account, SecretAccess, load_account
from worker.job.smtp.oauth import TokenHelpers
from worker.settings import Settings
from worker.tools.testmail import Outcome, check_address, default_sender, send_test_mail

_DESCRIPTION = """\
Send one test mail through the tenant's SMTP account now, not through RabbitMQ,
DKIM-signed when the tenant has dkim settings, and print what the server said:
TLS version, AUTH mechanism, reply, Message-ID. On failure it prints hints
that match the failure. Passwords and tokens are never printed.

The sender is the SMTP user, as the settings page advises. --from picks
another one; a test mail has no sending user, so it is accepted when the
tenant may use it at all: the SMTP user, an employee's own address, or an
address granted to an employee or a group. The archive address gets no copy.

Exit status: 0 sent, 1 not sent, 2 bad input (unknown tenant, invalid address).
"""


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``test-mail`` to the ``postbote`` parser."""
    parser = subparsers.add_parser(
        "test-mail",
        help="send one test mail through a tenant's SMTP account and explain the outcome",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--tenant", required=True, help="tenant id")
    parser.add_argument("--to", required=True, metavar="ADDR", help="recipient")
    parser.add_argument(
        "--from",
        dest="sender",
        metavar="ADDR",
        help="sender (default: the SMTP user); must be permitted in the tenant, see above",
    )
    parser.add_argument("--json", action="store_true", help="print the outcome as JSON")
    parser.set_defaults(func=run_test_mail)


def run_test_mail(args: argparse.Namespace, settings: Settings) -> int:
    """Send the test mail; exit 0 sent, 1 not sent, 2 bad input."""
    try:
        to = check_address(args.to)
    except ValueError as e:
        return fail(f"--to: {e}", code=2)
    try:
        sender = check_address(args.sender) if args.sender is not None else None
    except ValueError as e:
        return fail(f"--from: {e}", code=2)
    try:
        account = _load(settings, args.tenant)
    except UnknownTenant:
        return fail(f"no tenant {args.tenant!r}; tenants come from 'postbote tenants apply FILE'", code=2)
    except (DatabaseUnavailable, ConfigurationError) as e:
        return fail(str(e))
    try:
        sender = sender or default_sender(account)
    except ConfigurationError as e:
        return fail(str(e), code=2)
    outcome = send_test_mail(
        account,
        sender=sender,
        to=to,
        timeout_ms=settings.smtp_timeout_ms,
        token_helpers=TokenHelpers(settings.token_helpers, settings.token_helper_timeout_ms / 1000),
    )
    if args.json:
        print_json(_as_json(outcome))
    else:
        _print(outcome)
    if outcome.sent:
        return 0
    return fail(f"test mail not sent ({outcome.reason})")


def _load(settings: Settings, tenant_id: str) -> Account:
    try:
        with connect(settings.database_url) as conn:
            return load_account(conn, tenant_id, SecretAccess.from_settings(settings))
    except ValidationError as e:
        # Locations and messages only: pydantic's full text would echo the input, password included.
        problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise ConfigurationError(f"tenant {tenant_id!r} has invalid settings: {problems}") from None


def _as_json(outcome: Outcome) -> dict[str, Any]:
    data = asdict(outcome)
    data["dkim_signed"] = bool(outcome.dkim)
    return data


def _print(outcome: Outcome) -> None:
    rows = [
        ("server", f"{outcome.server} (security: {outcome.security})"),
        ("from", outcome.sender),
        ("to", outcome.recipient),
    ]
    if outcome.sent:
        rows += [
            ("TLS", outcome.tls_version or "none"),
            ("auth", f"{outcome.auth_method} as {outcome.smtp_user}" if outcome.auth_method else "none"),
            ("reply", outcome.reply or ""),
            ("DSN", "offered (bounces.dsn can ask for reports)" if outcome.dsn else "not offered"),
        ]
    if outcome.message_id:
        rows.append(("Message-ID", outcome.message_id))
    rows.append(("DKIM", f"signed ({', '.join(outcome.dkim)})" if outcome.dkim else "not signed"))
    if not outcome.sent:
        rows.append(("error", f"{outcome.reason}: {outcome.error}"))
    print(f"test mail for tenant {outcome.tenant}")
    for label, value in rows:
        print(f"  {label:<11} {value}")
    print("result: SENT" if outcome.sent else "result: NOT SENT")
    if outcome.hints:
        print("notes:" if outcome.sent else "hints:")
        for hint in outcome.hints:
            print(f"  - {hint}")


__all__ = ["register", "run_test_mail"]
