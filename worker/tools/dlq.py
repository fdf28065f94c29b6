"""The dead-letter queue for operators: list, show, replay and purge dead jobs.

Dead jobs live in PostgreSQL (``dead_letters``) until purged; no broker TTL
applies. A replay puts the job back on its work queue with its attempts reset.
The ledger decides whether it may be sent: replay turns a ``failed`` ledger row
back into ``retrying`` in the same transaction that removes the dead entry, so
the job is sent at most once more, and a second replay of the same id finds
nothing to do.
"""

from __future__ import annotations

import base64
import hashlib
import re
import time
from dataclasses import dataclass
from typing import Any

from dramatiq.common import q_name

from producer import PublishError, publish_messages
from worker.db import Connection, translated_errors
from worker.job.deadletter import DeadJob
from worker.job.ledger import reopen_failed

_SUMMARY_COLUMNS = (
    "id, job_id, tenant_id AS tenant, doc_type, doc_number, reason, detail, attempts, smtp_reply,"
    " queue_name, dead_at"
)
_COLUMNS = f"{_SUMMARY_COLUMNS}, message, raw_body"
_SECRET_KEY = re.compile(r"pass|secret|token|private|credential|authorization|api.?key", re.IGNORECASE)
_DURATION = re.compile(r"^(\d+)(ms|s|m|h|d)$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
MASK = "***"


@dataclass(frozen=True)
class Filters:
    """Which dead jobs a command acts on; empty matches all."""

    tenant: str | None = None
    reason: str | None = None
    older_than_ms: int | None = None
    ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReplayResult:
    id: str
    outcome: str
    """``replayed``, ``would_replay``, ``already_sent``, ``not_replayable``, ``not_found`` or ``failed``."""
    detail: str = ""


def parse_duration(text: str) -> int:
    """``90s``, ``15m``, ``2h``, ``7d`` (or ``ms``) as milliseconds; ``ValueError`` otherwise."""
    match = _DURATION.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a duration like 30m, 2h or 7d")
    return int(match.group(1)) * _UNIT_MS[match.group(2)]


def list_dead(conn: Connection, filters: Filters, *, limit: int | None = None) -> list[DeadJob]:
    """Dead jobs matching ``filters``, oldest first, without their messages (``message`` and
    ``raw_body`` are ``None``; :func:`get_dead` has them)."""
    where, params = _where(filters)
    query = f"SELECT {_SUMMARY_COLUMNS} FROM dead_letters{where} ORDER BY dead_at, id"
    if limit is not None:
        query += f" LIMIT {int(limit)}"
    with translated_errors():
        return [_entry(row) for row in conn.execute(query.encode(), params)]


def count_dead(conn: Connection, filters: Filters) -> int:
    """How many dead jobs match ``filters``."""
    where, params = _where(filters)
    with translated_errors():
        row = conn.execute(f"SELECT count(*) AS n FROM dead_letters{where}".encode(), params).fetchone()
    return int(row["n"]) if row else 0


def get_dead(conn: Connection, entry_id: str) -> DeadJob | None:
    """One dead job by its id (the job id, or the broker message id for unreadable messages)."""
    with translated_errors():
        row = conn.execute(
            f"SELECT {_COLUMNS} FROM dead_letters WHERE id = %s".encode(), (entry_id,)
        ).fetchone()
    return _entry(row) if row else None


def describe(entry: DeadJob) -> dict[str, Any]:
    """Everything about a dead job for ``dlq show``: secrets masked, attachments summarized."""
    replayable = entry.replayable_message
    detail = {
        **entry.summary(),
        "detail": entry.detail,
        "smtp_reply": entry.smtp_reply,
        "queue": entry.queue_name,
        "replayable": replayable is not None,
    }
    if replayable is not None:
        message = mask_secrets(replayable)
        args = message.get("args") or []
        detail["job"] = args[0] if len(args) == 1 else args
        detail["message"] = {k: v for k, v in message.items() if k not in ("args", "kwargs")}
    if entry.raw_body is not None:
        detail["raw_body"] = {
            "bytes": len(entry.raw_body),
            "sha256": hashlib.sha256(entry.raw_body).hexdigest(),
            "start": entry.raw_body[:200].decode("utf-8", "replace"),
        }
    return detail


def mask_secrets(value: Any) -> Any:
    """A copy of JSON-like ``value`` with secret-looking keys masked and attachment contents
    replaced by their size and digest."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if key == "content_base64" and isinstance(item, str):
                out["content"] = _attachment_summary(item)
            elif _SECRET_KEY.search(str(key)) and item is not None:
                out[key] = MASK
            else:
                out[key] = mask_secrets(item)
        return out
    if isinstance(value, list):
        return [mask_secrets(item) for item in value]
    return value


def replay(conn: Connection, ids: list[str], *, broker_url: str, dry_run: bool = False) -> list[ReplayResult]:
    """Put dead jobs back on their work queues with attempts reset (``conn`` in autocommit mode).

    Each job is handled in its own transaction: the dead entry is locked, the
    ledger row reopened, the message published with broker confirmation, and the
    entry deleted; if publishing fails nothing changes.
    """
    return [_replay_one(conn, entry_id, broker_url=broker_url, dry_run=dry_run) for entry_id in ids]


def purge(conn: Connection, filters: Filters) -> int:
    """Delete the dead jobs matching ``filters``; returns how many. The ledger keeps their history."""
    where, params = _where(filters)
    with translated_errors():
        cursor = conn.execute(f"DELETE FROM dead_letters{where}".encode(), params)
        if not conn.autocommit:
            conn.commit()
    return cursor.rowcount


class _DryRun(Exception):
    """Rolls the replay's transaction back after the checks."""


class _NotPublished(Exception):
    """Rolls the replay's transaction back when the broker did not confirm."""


def _replay_one(conn: Connection, entry_id: str, *, broker_url: str, dry_run: bool) -> ReplayResult:
    try:
        with translated_errors(), conn.transaction():
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM dead_letters WHERE id = %s FOR UPDATE".encode(), (entry_id,)
            ).fetchone()
            if row is None:
                return ReplayResult(entry_id, "not_found", "not in the dead-letter queue (replayed already?)")
            entry = _entry(row)
            message = entry.replayable_message
            if message is None:
                return ReplayResult(
                    entry_id, "not_replayable", "the message was not readable; nothing to send"
                )
            status = reopen_failed(conn, entry.job_id) if entry.job_id else None
            if status is not None and status.delivered:
                conn.execute("DELETE FROM dead_letters WHERE id = %s", (entry_id,))
                return ReplayResult(
                    entry_id, "already_sent", f"the ledger says {status}; removed from the queue"
                )
            if dry_run:
                raise _DryRun
            try:
                publish_messages([fresh_message(message)], broker_url=broker_url)
            except PublishError as e:
                raise _NotPublished(str(e)) from e
            conn.execute("DELETE FROM dead_letters WHERE id = %s", (entry_id,))
            return ReplayResult(entry_id, "replayed", f"back on {q_name(entry.queue_name)}")
    except _DryRun:
        return ReplayResult(entry_id, "would_replay", f"would go back on {q_name(entry.queue_name)}")
    except _NotPublished as e:
        return ReplayResult(entry_id, "failed", f"not replayed: {e}")


def fresh_message(message: dict[str, Any]) -> dict[str, Any]:
    """The stored message as a new delivery: on its work queue, attempts and age reset."""
    return {
        **message,
        "queue_name": q_name(str(message["queue_name"])),
        "options": {},
        "message_timestamp": int(time.time() * 1000),
    }


def _where(filters: Filters) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if filters.tenant is not None:
        clauses.append("tenant_id = %s")
        params.append(filters.tenant)
    if filters.reason is not None:
        clauses.append("reason = %s")
        params.append(filters.reason)
    if filters.older_than_ms is not None:
        clauses.append("dead_at < now() - %s * interval '1 ms'")
        params.append(filters.older_than_ms)
    if filters.ids:
        clauses.append("id = ANY(%s)")
        params.append(list(filters.ids))
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def _attachment_summary(content_base64: str) -> str:
    try:
        data = base64.b64decode(content_base64)
    except ValueError:
        return f"<{len(content_base64)} characters, not valid base64>"
    return f"<{len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()[:16]}…>"


def _entry(row: dict[str, Any]) -> DeadJob:
    return DeadJob(
        id=str(row["id"]),
        job_id=row["job_id"],
        tenant=row["tenant"],
        doc_type=row["doc_type"],
        doc_number=row["doc_number"],
        reason=str(row["reason"]),
        detail=str(row["detail"]),
        attempts=int(row["attempts"]),
        smtp_reply=row["smtp_reply"],
        queue_name=str(row["queue_name"]),
        dead_at=row["dead_at"],
        message=row.get("message"),
        raw_body=bytes(row["raw_body"]) if row.get("raw_body") is not None else None,
    )


__all__ = [
    "Filters",
    "ReplayResult",
    "count_dead",
    "describe",
    "fresh_message",
    "get_dead",
    "list_dead",
    "mask_secrets",
    "parse_duration",
    "purge",
    "replay",
]
