"""Operator directives: pause, resume and cancel, stored in PostgreSQL.

A directive is a row in ``directives``; the worker reads it when it claims a job and again just
before DATA (``postbote_directive_for``), so a pause or a cancel reaches every worker on every
host at once and survives restarts. A pause holds the tenant's jobs (every document type but
receipts, unless named) until it is lifted. A cancel ends every matching job that waits at
once (``postbote_apply_cancel``); a job a worker holds is ended by that worker's check before
DATA, unless the check ran before the cancel was committed (then it is sent); a job still in
RabbitMQ ends when a worker claims it. Who gave a directive, when and why stays in the table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from worker.db import Connection, translated_errors
from worker.job.parking import release_parked
from worker.vocabulary import Reason


@dataclass(frozen=True)
class Scope:
    """The jobs a directive names: by id, or by tenant (document types, published before)."""

    tenant: str | None = None
    doc_types: tuple[str, ...] | None = None
    job_ids: tuple[UUID, ...] | None = None
    published_before: datetime | None = None

    def where(self, alias: str = "d") -> tuple[str, list[Any]]:
        """SQL matching this scope on a ``deliveries`` row, and its parameters."""
        if self.job_ids is not None:
            return f"{alias}.job_id = ANY(%s)", [list(self.job_ids)]
        clause = f"{alias}.tenant_id = %s"
        params: list[Any] = [self.tenant]
        if self.doc_types is not None:
            clause += f" AND {alias}.doc_type = ANY(%s)"
            params.append(list(self.doc_types))
        if self.published_before is not None:
            clause += f" AND coalesce({alias}.published_at, '-infinity') < %s"
            params.append(self.published_before)
        return clause, params


def pause(
    conn: Connection, tenant: str, doc_types: Sequence[str] | None, *, reason: str | None, by: str
) -> int:
    """Pause ``tenant`` (only ``doc_types`` when named); returns the directive's id. The same
    pause given twice is one directive."""
    types = sorted(set(doc_types)) if doc_types else None
    with translated_errors(), conn.transaction():
        row = conn.execute(
            "SELECT id FROM directives WHERE kind = 'pause' AND lifted_at IS NULL AND tenant_id = %s"
            " AND doc_types IS NOT DISTINCT FROM %s::text[]",
            (tenant, types),
        ).fetchone()
        if row is None:
            row = conn.execute(
                "INSERT INTO directives (kind, tenant_id, doc_types, reason, created_by)"
                " VALUES ('pause', %s, %s, %s, %s) RETURNING id",
                (tenant, types, reason, by),
            ).fetchone()
    assert row is not None
    return int(row["id"])


@dataclass(frozen=True)
class Resumed:
    lifted: int
    """Pause directives lifted."""
    released: int
    """Held jobs made due, in their original order."""
    still_paused: tuple[str, ...]
    """Pauses of the tenant still in force, described."""


def resume(conn: Connection, tenant: str, doc_types: Sequence[str] | None, *, by: str) -> Resumed:
    """Lift the tenant's pauses (without ``doc_types``: all of them; with: the ones naming exactly
    those types, and those types from pauses naming more) and release the held jobs no pause
    covers any more."""
    with translated_errors(), conn.transaction():
        if doc_types:
            lifted = conn.execute(
                "UPDATE directives SET lifted_at = clock_timestamp(), lifted_by = %s"
                " WHERE kind = 'pause' AND lifted_at IS NULL AND tenant_id = %s AND doc_types <@ %s::text[]",
                (by, tenant, sorted(set(doc_types))),
            ).rowcount
        else:
            lifted = conn.execute(
                "UPDATE directives SET lifted_at = clock_timestamp(), lifted_by = %s"
                " WHERE kind = 'pause' AND lifted_at IS NULL AND tenant_id = %s",
                (by, tenant),
            ).rowcount
        released = release_parked(conn, tenant=tenant, reason=Reason.PAUSED, doc_types=doc_types or None)
        remaining = conn.execute(
            "SELECT doc_types FROM directives WHERE kind = 'pause' AND lifted_at IS NULL AND tenant_id = %s"
            " ORDER BY id",
            (tenant,),
        ).fetchall()
    still = tuple(
        ", ".join(r["doc_types"]) if r["doc_types"] else "every document type but receipts" for r in remaining
    )
    return Resumed(lifted, released, still)


def active_pauses(conn: Connection, tenant: str | None = None) -> list[dict[str, Any]]:
    with translated_errors():
        return conn.execute(
            "SELECT id, tenant_id AS tenant, doc_types, reason, created_by, created_at FROM directives"
            " WHERE kind = 'pause' AND lifted_at IS NULL AND (%s::text IS NULL OR tenant_id = %s) ORDER BY id",
            (tenant, tenant),
        ).fetchall()


@dataclass(frozen=True)
class CancelCounts:
    """The jobs a cancel's scope matches, by what became of them."""

    cancelled: int
    already_sent: int
    """Sent (or partial) before the cancel was given."""
    in_flight_sent: int
    """Sent after the cancel was given: their check before DATA came first."""
    in_flight: int
    """Held by a worker now: its check before DATA decides (cancelled, or sent)."""
    waiting: int
    """Waiting (retrying, held, scheduled): a cancel ends them."""
    other: int
    """Ended otherwise (failed, expired, cancelled by another directive)."""

    def as_json(self) -> dict[str, int]:
        return {
            "cancelled": self.cancelled,
            "already_sent": self.already_sent,
            "in_flight_then_sent": self.in_flight_sent,
            "in_flight": self.in_flight,
            "waiting": self.waiting,
            "other": self.other,
        }


def cancel(conn: Connection, scope: Scope, *, reason: str | None, by: str) -> tuple[int, datetime]:
    """Store a cancel directive and end every matching job the ledger knows that waits; the ones
    workers hold end at their check before DATA, those still in RabbitMQ when claimed. Without
    ``published_before``, a tenant-wide cancel covers the jobs published before now. Returns
    the directive's id and when it was given."""
    with translated_errors():
        with conn.transaction():
            row = conn.execute(
                "INSERT INTO directives (kind, tenant_id, doc_types, job_ids, published_before, reason, created_by)"
                " VALUES ('cancel', %s, %s, %s, coalesce(%s, CASE WHEN %s::uuid[] IS NULL"
                " THEN clock_timestamp() END), %s, %s) RETURNING id, created_at",
                (
                    scope.tenant,
                    list(scope.doc_types) if scope.doc_types is not None else None,
                    list(scope.job_ids) if scope.job_ids is not None else None,
                    scope.published_before,
                    list(scope.job_ids) if scope.job_ids is not None else None,
                    reason,
                    by,
                ),
            ).fetchone()
        assert row is not None
        # A second transaction, after the directive is visible to every worker's check.
        with conn.transaction():
            conn.execute("SELECT postbote_apply_cancel(%s)", (row["id"],))
    return int(row["id"]), row["created_at"]


def cancel_counts(
    conn: Connection, scope: Scope, *, directive: int | None, given_at: datetime | None
) -> CancelCounts:
    """Count the jobs of ``scope`` by fate; ``directive`` and ``given_at`` tell this cancel's own
    (``None``: a dry run, counting what a cancel now would do)."""
    clause, params = scope.where()
    with translated_errors():
        row = conn.execute(
            "SELECT"
            " count(*) FILTER (WHERE d.status = 'cancelled' AND d.cancelled_by = %s) AS cancelled,"
            " count(*) FILTER (WHERE d.status IN ('sent', 'partial') AND (%s::timestamptz IS NULL"
            "     OR d.sent_at < %s)) AS already_sent,"
            " count(*) FILTER (WHERE d.status IN ('sent', 'partial') AND d.sent_at >= %s) AS in_flight_sent,"
            " count(*) FILTER (WHERE d.status = 'sending') AS in_flight,"
            " count(*) FILTER (WHERE d.status IN ('retrying', 'held', 'scheduled')) AS waiting,"
            " count(*) FILTER (WHERE d.status IN ('failed', 'expired')"
            "     OR (d.status = 'cancelled' AND d.cancelled_by IS DISTINCT FROM %s)) AS other"
            f" FROM deliveries d WHERE {clause}",
            (directive, given_at, given_at, given_at, directive, *params),
        ).fetchone()
    assert row is not None
    return CancelCounts(**{k: int(v) for k, v in row.items()})


def directive_scope(conn: Connection, directive: int) -> Scope:
    with translated_errors():
        row = conn.execute("SELECT * FROM directives WHERE id = %s", (directive,)).fetchone()
    assert row is not None
    return Scope(
        tenant=row["tenant_id"] if row["job_ids"] is None else None,
        doc_types=tuple(row["doc_types"]) if row["doc_types"] else None,
        job_ids=tuple(row["job_ids"]) if row["job_ids"] else None,
        published_before=row["published_before"],
    )


__all__ = [
    "CancelCounts",
    "Resumed",
    "Scope",
    "active_pauses",
    "cancel",
    "cancel_counts",
    "directive_scope",
    "pause",
    "resume",
]
