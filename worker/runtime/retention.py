"""Retention: the personal data of ended jobs is removed after a while; their metadata stays.

What is removed, and when:

* jobs that ended (sent, partial, failed, cancelled, expired) longer than ``retention_days`` ago:
  the sender, the message kept for a retry, every recipient address (a recipient row keeps its
  role, state and reply code as ``removed-<position>``), the addresses in replies and details,
  the addresses tried by each attempt, a parked copy of the job, its bounce reports and the
  addresses a suppression held it for;
* delivery events and failed webhook deliveries older than ``retention_days``: the addresses
  and replies in their payload;
* dead letters older than ``dead_letter_retention_days``: the stored message (body,
  attachments, addresses) and raw bytes; the entry stays listed, no longer replayable.

Kept: ids, tenant, document type and number, status, reason, Message-ID, attempts and times.
0 days keeps everything. Runs in batches, each its own transaction; a second run at the same
time (another host) skips the run instead of waiting.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from worker.db import Connection, translated_errors
from worker.settings import Settings
from worker.vocabulary import FINAL

BATCH = 500
REMOVED = "<removed>"
_ADDRESS = r"[^][\s<>\"'(),;:]+@[^][\s<>\"'(),;:]+"
"""What an address in a reply or a detail looks like, for ``regexp_replace``."""
_LOCK = "postbote.retention"
_OPTIONAL = frozenset({"bounce_reports", "suppression_holds"})
"""Tables of the bounce feature, touched where they exist."""


@dataclass
class RetentionReport:
    """How many rows each step changed (or, in a dry run, would change)."""

    counts: dict[str, int] = field(default_factory=dict)
    skipped: bool = False
    """Another retention run held the lock."""

    @property
    def total(self) -> int:
        return sum(self.counts.values())


_ENDED_LONG_AGO = (
    "redacted_at IS NULL AND status = ANY(%(final)s)"
    " AND created_at < now() - %(days)s * interval '1 day' AND updated_at < now() - %(days)s * interval '1 day'"
)
"""Jobs whose data retention removes; ``created_at`` is what the index orders by (it never changes)."""

_JOBS = (
    f"SELECT job_id FROM deliveries WHERE {_ENDED_LONG_AGO}"
    " ORDER BY created_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED"
)

_REDACT_JOBS = (
    (
        "delivery_recipients",
        "UPDATE delivery_recipients SET address = 'removed-' || position,"
        " reply_text = regexp_replace(reply_text, %(address)s, %(removed)s, 'g') WHERE job_id = ANY(%(jobs)s)",
    ),
    (
        "delivery_attempts",
        "UPDATE delivery_attempts SET reply = regexp_replace(reply, %(address)s, %(removed)s, 'g'),"
        " recipients = COALESCE((SELECT jsonb_agg(to_jsonb(%(removed)s::text))"
        " FROM jsonb_array_elements(recipients)), '[]'::jsonb) WHERE job_id = ANY(%(jobs)s)",
    ),
    ("parked_jobs", "DELETE FROM parked_jobs WHERE job_id = ANY(%(jobs)s)"),
    ("bounce_reports", "DELETE FROM bounce_reports WHERE job_id = ANY(%(jobs)s)"),
    ("suppression_holds", "UPDATE suppression_holds SET addresses = '{}' WHERE job_id = ANY(%(jobs)s)"),
    (
        "deliveries",
        "UPDATE deliveries SET sender = NULL, message = NULL, redacted_at = now(),"
        " smtp_reply = regexp_replace(smtp_reply, %(address)s, %(removed)s, 'g'),"
        " detail = regexp_replace(detail, %(address)s, %(removed)s, 'g') WHERE job_id = ANY(%(jobs)s)",
    ),
)

# A payload's recipients keep role and state; address and reply text go.
_PAYLOAD = """
{doc} || jsonb_build_object(
    'recipients', COALESCE((SELECT jsonb_agg(r || jsonb_build_object(
                      'address', %(removed)s::text,
                      'reply', regexp_replace(r->>'reply', %(address)s, %(removed)s, 'g')))
                   FROM jsonb_array_elements(CASE WHEN jsonb_typeof({doc}->'recipients') = 'array'
                                                  THEN {doc}->'recipients' ELSE '[]'::jsonb END) AS r),
                  '[]'::jsonb),
    'smtp_reply', regexp_replace({doc}->>'smtp_reply', %(address)s, %(removed)s, 'g'))
"""

_REDACT_EVENTS = f"""
WITH batch AS (
    SELECT id FROM events WHERE redacted_at IS NULL AND occurred_at < now() - %(days)s * interval '1 day'
    ORDER BY id LIMIT %(limit)s FOR UPDATE SKIP LOCKED
)
UPDATE events e SET redacted_at = now(), body = {_PAYLOAD.format(doc="e.body")}
FROM batch WHERE e.id = batch.id
"""

_REDACT_WEBHOOK_DELIVERIES = f"""
WITH batch AS (
    SELECT id FROM webhook_deliveries
    WHERE redacted_at IS NULL AND first_attempt_at < now() - %(days)s * interval '1 day'
    ORDER BY id LIMIT %(limit)s FOR UPDATE SKIP LOCKED
)
UPDATE webhook_deliveries w SET redacted_at = now(),
    last_error = regexp_replace(w.last_error, %(address)s, %(removed)s, 'g'),
    payload = ({_PAYLOAD.format(doc="w.payload::jsonb")})::text
FROM batch WHERE w.id = batch.id
"""

_REDACT_DEAD = """
WITH batch AS (
    SELECT id FROM dead_letters WHERE redacted_at IS NULL AND dead_at < now() - %(days)s * interval '1 day'
    ORDER BY dead_at LIMIT %(limit)s FOR UPDATE SKIP LOCKED
)
UPDATE dead_letters d SET message = NULL, raw_body = NULL, redacted_at = now(),
    smtp_reply = regexp_replace(d.smtp_reply, %(address)s, %(removed)s, 'g'),
    detail = regexp_replace(d.detail, %(address)s, %(removed)s, 'g') || ' [job data removed by retention]'
FROM batch WHERE d.id = batch.id
"""

_COUNTS = {
    "deliveries": f"SELECT count(*) AS n FROM deliveries WHERE {_ENDED_LONG_AGO}",
    "events": "SELECT count(*) AS n FROM events WHERE redacted_at IS NULL"
    " AND occurred_at < now() - %(days)s * interval '1 day'",
    "webhook_deliveries": "SELECT count(*) AS n FROM webhook_deliveries WHERE redacted_at IS NULL"
    " AND first_attempt_at < now() - %(days)s * interval '1 day'",
}
_COUNT_DEAD = "SELECT count(*) AS n FROM dead_letters WHERE redacted_at IS NULL AND dead_at < now() - %(days)s * interval '1 day'"


def run_retention(conn: Connection, settings: Settings, *, dry_run: bool = False) -> RetentionReport:
    """Remove what the retention settings say is due, or only count it (``dry_run``).

    ``conn`` must not be in a transaction (autocommit or idle); each batch commits on its own.

    Raises:
      DatabaseUnavailable: the database failed; what was committed stays done.
    """
    report = RetentionReport()
    with translated_errors():
        locked = conn.execute("SELECT pg_try_advisory_lock(hashtext(%s)) AS ok", (_LOCK,)).fetchone()
        if not conn.autocommit:
            conn.commit()
        if locked is None or not locked["ok"]:
            report.skipped = True
            return report
        try:
            if dry_run:
                _count(conn, settings, report)
            else:
                _redact(conn, settings, report)
        finally:
            conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (_LOCK,))
            if not conn.autocommit:
                conn.commit()
    return report


def _params(days: int) -> dict[str, object]:
    return {
        "days": days,
        "limit": BATCH,
        "final": [s.value for s in FINAL],
        "address": _ADDRESS,
        "removed": REMOVED,
    }


def _count(conn: Connection, settings: Settings, report: RetentionReport) -> None:
    if settings.retention_days > 0:
        params = _params(settings.retention_days)
        for table, query in _COUNTS.items():
            row = conn.execute(query, params).fetchone()
            report.counts[table] = int(row["n"]) if row else 0
    if settings.dead_letter_retention_days > 0:
        row = conn.execute(_COUNT_DEAD, _params(settings.dead_letter_retention_days)).fetchone()
        report.counts["dead_letters"] = int(row["n"]) if row else 0


def _redact(conn: Connection, settings: Settings, report: RetentionReport) -> None:
    if settings.retention_days > 0:
        params = _params(settings.retention_days)
        while True:
            with conn.transaction():
                jobs = [r["job_id"] for r in conn.execute(_JOBS, params)]
                if jobs:
                    for table, query in _REDACT_JOBS:
                        if table in _OPTIONAL and not _exists(conn, table):
                            continue
                        changed = conn.execute(query, {**params, "jobs": jobs}).rowcount
                        if table == "deliveries":
                            report.counts[table] = report.counts.get(table, 0) + max(changed, 0)
            if len(jobs) < BATCH:
                break
        _batches(conn, report, "events", _REDACT_EVENTS, params)
        _batches(conn, report, "webhook_deliveries", _REDACT_WEBHOOK_DELIVERIES, params)
    if settings.dead_letter_retention_days > 0:
        _batches(conn, report, "dead_letters", _REDACT_DEAD, _params(settings.dead_letter_retention_days))


def _batches(
    conn: Connection, report: RetentionReport, table: str, query: str, params: dict[str, object]
) -> None:
    while True:
        with conn.transaction():
            changed = max(conn.execute(query, params).rowcount, 0)
        report.counts[table] = report.counts.get(table, 0) + changed
        if changed < BATCH:
            return


def _exists(conn: Connection, table: str) -> bool:
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL AS ok", (table,)).fetchone()
    return bool(row and row["ok"])


__all__ = ["BATCH", "REMOVED", "RetentionReport", "run_retention"]
