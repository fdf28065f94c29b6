"""The tenant's suppression list for operators: list, add, remove, import, export, and releasing
the jobs it holds.

Removing an entry releases the held jobs that named it, unless another entry still holds them;
releasing sends held jobs despite their entries. Either way the parked job is republished
(``worker.job.parking.release_parked``) and the ledger's claim sends it once.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from pydantic import TypeAdapter, ValidationError

from schemas.fields import Address
from worker.db import Connection, translated_errors
from worker.job.parking import release_parked
from worker.vocabulary import Reason

EXPORT_COLUMNS = ("address", "source", "class", "reply", "job_id", "created_at", "expires_at")
_ADDRESS: TypeAdapter[str] = TypeAdapter(Address)


@dataclass(frozen=True)
class ImportLine:
    address: str
    expires_at: datetime | None = None
    reply: str | None = None


def list_entries(conn: Connection, tenant: str, *, expired: bool = False) -> list[dict[str, Any]]:
    """The tenant's entries, newest first (expired ones only when asked)."""
    with translated_errors():
        return conn.execute(
            "SELECT address, source, class, reply, job_id, created_at, expires_at,"
            " (SELECT count(*) FROM suppression_holds h WHERE h.tenant_id = s.tenant_id"
            "  AND h.released_at IS NULL AND s.address = ANY(h.addresses)) AS held_jobs"
            " FROM suppressions s WHERE tenant_id = %s"
            " AND (%s OR expires_at IS NULL OR expires_at > clock_timestamp())"
            " ORDER BY created_at DESC, address",
            (tenant, expired),
        ).fetchall()


def add_entries(conn: Connection, tenant: str, lines: Sequence[ImportLine], *, source: str = "manual") -> int:
    """Add or replace entries (``manual`` or ``import``); returns how many."""
    with translated_errors(), conn.transaction():
        for line in lines:
            conn.execute(
                "INSERT INTO suppressions (tenant_id, address, source, reply, expires_at)"
                " VALUES (%s, lower(%s), %s, %s, %s)"
                " ON CONFLICT (tenant_id, address) DO UPDATE SET source = EXCLUDED.source,"
                " class = NULL, reply = EXCLUDED.reply, job_id = NULL, created_at = clock_timestamp(),"
                " expires_at = EXCLUDED.expires_at",
                (tenant, line.address, source, line.reply, line.expires_at),
            )
    return len(lines)


def remove_entries(conn: Connection, tenant: str, addresses: Sequence[str]) -> tuple[int, int]:
    """Remove entries and release the held jobs no other entry holds; returns (removed, released)."""
    keys = [a.lower() for a in addresses]
    with translated_errors(), conn.transaction():
        removed = conn.execute(
            "DELETE FROM suppressions WHERE tenant_id = %s AND address = ANY(%s)", (tenant, keys)
        ).rowcount
        free = [
            UUID(str(r["job_id"]))
            for r in conn.execute(
                "SELECT h.job_id FROM suppression_holds h WHERE h.tenant_id = %(tenant)s"
                " AND h.released_at IS NULL AND h.addresses && %(keys)s::text[]"
                " AND NOT EXISTS (SELECT 1 FROM suppressions s WHERE s.tenant_id = h.tenant_id"
                "   AND s.address = ANY(h.addresses)"
                "   AND (s.expires_at IS NULL OR s.expires_at > clock_timestamp()))",
                {"tenant": tenant, "keys": keys},
            )
        ]
        released = _release(conn, tenant, free)
    return removed, released


def release_held(
    conn: Connection, tenant: str, *, addresses: Sequence[str] = (), job_ids: Sequence[UUID] = ()
) -> int:
    """Send held jobs despite their entries: those naming ``addresses`` and those in ``job_ids``
    (all of the tenant's when both are empty). Returns how many were released."""
    keys = [a.lower() for a in addresses]
    every = not keys and not job_ids
    with translated_errors(), conn.transaction():
        jobs = [
            UUID(str(r["job_id"]))
            for r in conn.execute(
                "UPDATE suppression_holds SET released_at = clock_timestamp()"
                " WHERE tenant_id = %(tenant)s AND released_at IS NULL"
                " AND (%(every)s OR addresses && %(keys)s::text[] OR job_id = ANY(%(jobs)s::uuid[])) RETURNING job_id",
                {"tenant": tenant, "every": every, "keys": keys, "jobs": list(job_ids)},
            )
        ]
        return release_parked(conn, tenant=tenant, reason=Reason.SUPPRESSED, job_ids=jobs) if jobs else 0


def _release(conn: Connection, tenant: str, job_ids: list[UUID]) -> int:
    if not job_ids:
        return 0
    conn.execute("DELETE FROM suppression_holds WHERE job_id = ANY(%s)", (job_ids,))
    return release_parked(conn, tenant=tenant, reason=Reason.SUPPRESSED, job_ids=job_ids)


def parse_import(text: str) -> list[ImportLine]:
    """Addresses one per line, or the CSV ``postbote suppression export`` writes (``address`` and
    optionally ``expires_at`` and ``reply`` are read). ``ValueError`` names the line at fault."""
    rows = list(csv.reader(io.StringIO(text)))
    header = [c.strip().lower() for c in rows[0]] if rows else []
    if "address" in header:
        columns: dict[str, int] = {
            n: header.index(n) for n in ("address", "expires_at", "reply") if n in header
        }
        rows, first = rows[1:], 2
    else:
        columns, first = {"address": 0}, 1
    lines = []
    for number, row in enumerate(rows, start=first):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        lines.append(_import_line(row, columns, number))
    return lines


def _import_line(row: list[str], columns: dict[str, int], number: int) -> ImportLine:
    def cell(name: str) -> str | None:
        index = columns.get(name)
        value = row[index].strip() if index is not None and index < len(row) else ""
        return value or None

    raw = cell("address") or ""
    try:
        address = _ADDRESS.validate_python(raw)
    except ValidationError:
        raise ValueError(f"line {number}: {raw!r} is not an e-mail address") from None
    expires = cell("expires_at")
    try:
        expires_at = datetime.fromisoformat(expires) if expires else None
    except ValueError:
        raise ValueError(f"line {number}: expires_at {expires!r} is not an ISO 8601 time") from None
    if expires_at is not None and expires_at.tzinfo is None:
        raise ValueError(f"line {number}: expires_at {expires!r} needs an offset (+00:00)")
    return ImportLine(address, expires_at, cell("reply"))


def export_csv(entries: Iterable[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(EXPORT_COLUMNS)
    for e in entries:
        writer.writerow(
            [
                e["address"],
                e["source"],
                e["class"] or "",
                e["reply"] or "",
                e["job_id"] or "",
                e["created_at"].isoformat(),
                e["expires_at"].isoformat() if e["expires_at"] else "",
            ]
        )
    return out.getvalue()


__all__ = [
    "EXPORT_COLUMNS",
    "ImportLine",
    "add_entries",
    "export_csv",
    "list_entries",
    "parse_import",
    "release_held",
    "remove_entries",
]
