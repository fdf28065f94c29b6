"""``postbote events webhooks``: tenants' webhooks with cursor and backlog, their failed deliveries,
and resends of failed deliveries."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import httpx

from worker.cli.output import fail
from worker.db import Connection, connect, translated_errors
from worker.errors import ConfigurationError, DatabaseUnavailable
from worker.logs import printable
from worker.runtime.webhook_post import open_client, post_event, target_signer, targets_of
from worker.settings import Settings

_STATES = """
SELECT c.tenant_id AS tenant, c.url, c.last_event_id, c.attempts, c.failing_since, c.next_attempt_at,
       c.last_error, c.last_delivered_at, t.webhooks,
       (SELECT count(*) FROM webhook_deliveries d
         WHERE d.tenant_id = c.tenant_id AND d.url = c.url AND d.status = 'failed') AS failed
FROM webhook_cursors c JOIN tenants t ON t.id = c.tenant_id
WHERE %(tenant)s::text IS NULL OR c.tenant_id = %(tenant)s
ORDER BY c.tenant_id, c.url
"""
_BACKLOG = (
    "SELECT count(*) AS n FROM events WHERE tenant_id = %(tenant)s AND id > %(last)s"
    " AND (%(types)s::text[] IS NULL OR type = ANY(%(types)s))"
)
_FAILED = """
SELECT id, tenant_id AS tenant, url, event_uuid AS event_id, event_type, job_id, attempts, last_error,
       first_attempt_at, last_attempt_at
FROM webhook_deliveries
WHERE status = 'failed' AND (%(tenant)s::text IS NULL OR tenant_id = %(tenant)s)
ORDER BY id
"""


def register(commands: Any) -> None:
    """Add ``webhooks`` to the subcommands of ``postbote events``."""
    webhooks = commands.add_parser(
        "webhooks",
        help="tenants' webhooks: cursor and backlog, failed deliveries (--failed), resends (--resend)",
        description="Each webhook gets its tenant's delivery events in order; an event it refused for"
        " POSTBOTE_WEBHOOK_RETRY_HOURS is kept as a failed delivery to resend (docs/configuration.md).",
    )
    webhooks.add_argument("--tenant", help="only this tenant's webhooks")
    webhooks.add_argument(
        "--failed", action="store_true", help="list the failed deliveries (events given up) instead"
    )
    webhooks.add_argument(
        "--resend",
        nargs="+",
        type=_delivery_id,
        metavar="ID",
        help="post these failed deliveries (ids from --failed) again, now",
    )
    webhooks.add_argument("--json", action="store_true", help="JSON instead of a table")
    webhooks.set_defaults(func=run_webhooks)


def run_webhooks(args: argparse.Namespace, settings: Settings) -> int:
    if args.failed and args.resend:
        return fail("give --failed or --resend, not both", code=2)
    try:
        with connect(
            settings.database_url, autocommit=True, statement_timeout_ms=settings.statement_timeout_ms
        ) as conn:
            if args.resend:
                return _resend(conn, settings, args.resend, tenant=args.tenant, as_json=args.json)
            if args.failed:
                return _show_failed(conn, args.tenant, as_json=args.json)
            return _show_webhooks(conn, args.tenant, as_json=args.json)
    except DatabaseUnavailable as e:
        return fail(str(e))


def webhook_states(conn: Connection, tenant: str | None) -> list[dict[str, Any]]:
    """Every webhook (of ``tenant``) with its cursor, backlog (events not yet handed to it) and
    number of failed deliveries."""
    states = []
    with translated_errors():
        for row in conn.execute(_STATES, {"tenant": tenant}).fetchall():
            target = targets_of(row["tenant"], row.pop("webhooks")).get(row["url"])
            types = target.events if target else None
            backlog = conn.execute(
                _BACKLOG, {"tenant": row["tenant"], "last": row["last_event_id"], "types": types}
            ).fetchone()
            states.append({**row, "events": types, "backlog": int(backlog["n"]) if backlog else 0})
    return states


def failed_deliveries(conn: Connection, tenant: str | None) -> list[dict[str, Any]]:
    """The failed deliveries (of ``tenant``) not resent yet, oldest first."""
    with translated_errors():
        return conn.execute(_FAILED, {"tenant": tenant}).fetchall()


def _show_webhooks(conn: Connection, tenant: str | None, *, as_json: bool) -> int:
    states = webhook_states(conn, tenant)
    if as_json:
        print(json.dumps([_plain(s) for s in states], indent=2))
        return 0
    if not states:
        print("no webhook is configured" + (f" for tenant {printable(tenant)}" if tenant else ""))
        return 0
    now = datetime.now(UTC)
    rows = [
        (
            s["tenant"],
            s["url"],
            ",".join(s["events"]) if s["events"] else "all",
            str(s["last_event_id"]),
            str(s["backlog"]),
            str(s["failed"]),
            _state(s, now),
        )
        for s in states
    ]
    _table(("TENANT", "URL", "EVENTS", "CURSOR", "BACKLOG", "FAILED", "STATE"), rows)
    return 0


def _state(state: dict[str, Any], now: datetime) -> str:
    if not state["attempts"]:
        return "ok" if not state["backlog"] else "sending"
    due = state["next_attempt_at"]
    wait = f", next in {_duration((due - now).total_seconds())}" if due and due > now else ""
    return f"retrying (try {state['attempts'] + 1}{wait}): {state['last_error'] or '?'}"


def _show_failed(conn: Connection, tenant: str | None, *, as_json: bool) -> int:
    failed = failed_deliveries(conn, tenant)
    if as_json:
        print(json.dumps([_plain(f) for f in failed], indent=2))
        return 0
    if not failed:
        print("no failed webhook delivery")
        return 0
    rows = [
        (
            str(f["id"]),
            f["tenant"],
            f["url"],
            f"{f['event_type']} {f['event_id']}",
            str(f["attempts"]),
            f["last_attempt_at"].astimezone().isoformat(timespec="seconds"),
            f["last_error"] or "-",
        )
        for f in failed
    ]
    _table(("ID", "TENANT", "URL", "EVENT", "TRIES", "LAST TRY", "LAST ERROR"), rows)
    print(f"\n{len(failed)} failed delivery(ies); 'postbote events webhooks --resend ID…' posts them again")
    return 0


def _resend(
    conn: Connection, settings: Settings, ids: list[int], *, tenant: str | None, as_json: bool
) -> int:
    """Post each failed delivery again with its original ``webhook-id``; a 2xx marks it resent."""
    results: list[dict[str, Any]] = []
    with open_client(settings) as client:
        for delivery_id in dict.fromkeys(ids):
            outcome, detail = _resend_one(conn, client, delivery_id, tenant, settings.secrets_dir)
            results.append({"id": delivery_id, "outcome": outcome, "detail": detail})
    if as_json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(
                printable(
                    f"{r['id']}: {r['outcome'].replace('_', ' ')}"
                    + (f" - {r['detail']}" if r["detail"] else "")
                )
            )
    return 1 if any(r["outcome"] not in ("resent", "already_resent") for r in results) else 0


def _resend_one(
    conn: Connection, client: httpx.Client, delivery_id: int, tenant: str | None, secrets_dir: str | None
) -> tuple[str, str]:
    with translated_errors():
        row = conn.execute(
            "SELECT d.tenant_id, d.url, d.event_uuid, d.payload, d.status, d.resent_at, t.webhooks"
            " FROM webhook_deliveries d LEFT JOIN tenants t ON t.id = d.tenant_id WHERE d.id = %s",
            (delivery_id,),
        ).fetchone()
    if row is None or (tenant is not None and row["tenant_id"] != tenant):
        return "not_found", ""
    if row["status"] == "resent":
        return "already_resent", f"at {row['resent_at'].astimezone().isoformat(timespec='seconds')}"
    target = targets_of(row["tenant_id"], row["webhooks"] or []).get(row["url"])
    if target is None:
        return "not_resendable", f"tenant {row['tenant_id']} no longer has the webhook {row['url']}"
    try:
        signer = target_signer(target, secrets_dir)
    except ConfigurationError as e:
        return "failed", str(e)
    error = post_event(client, target.url, signer, str(row["event_uuid"]), row["payload"].encode())
    with translated_errors():
        if error is None:
            conn.execute(
                "UPDATE webhook_deliveries SET status = 'resent', resent_at = now(), last_attempt_at = now()"
                " WHERE id = %s",
                (delivery_id,),
            )
            return "resent", ""
        conn.execute(
            "UPDATE webhook_deliveries SET attempts = attempts + 1, last_error = %s, last_attempt_at = now()"
            " WHERE id = %s",
            (error[:500], delivery_id),
        )
    return "failed", error


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v.isoformat() if isinstance(v, datetime) else str(v) if k in ("event_id", "job_id") else v
        for k, v in row.items()
    }


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _table(header: tuple[str, ...], rows: Sequence[tuple[object, ...]]) -> None:
    # URLs, errors and tenant ids are escaped: a receiver's answer cannot drive the terminal.
    cells = [header, *(tuple(printable(c) for c in row) for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _delivery_id(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a delivery id (a number from --failed)") from None
    if number < 1:
        raise argparse.ArgumentTypeError("a delivery id is a positive number")
    return number


__all__ = ["failed_deliveries", "register", "run_webhooks", "webhook_states"]
