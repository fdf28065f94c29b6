"""A matched report applied to the ledger in one transaction (``postbote_record_bounce``, migration
0012): the recipient's state and reply, the job's status, the event, the suppression entry."""

from __future__ import annotations

import json

from worker.bounces.classify import BounceClass, suppression_of
from worker.bounces.match import Match
from worker.db import Connection, translated_errors

OUTCOMES = ("bounced", "delayed", "duplicate", "unchanged", "unknown")
"""What recording a match did: ``duplicate`` when the same report was recorded before."""


def record_bounce(conn: Connection, report_key: str, match: Match, bounce_class: BounceClass) -> str:
    """Apply one matched finding; returns one of :data:`OUTCOMES`."""
    finding = match.finding
    params: dict[str, object] = {
        "report_key": report_key,
        "job_id": str(match.job_id),
        "address": match.address,
        "action": finding.action,
        "class": bounce_class.value,
        "status": finding.status,
        "code": finding.code,
        "reply": finding.reply,
        "text": _text(finding.reply, finding.code, finding.status),
        "matched_by": match.matched_by,
    }
    suppress, for_ms = suppression_of(bounce_class)
    if suppress:
        params["suppress_ms"] = for_ms
    with translated_errors(), conn.transaction():
        row = conn.execute(
            "SELECT postbote_record_bounce(%s::jsonb) AS outcome", (json.dumps(params),)
        ).fetchone()
    assert row is not None
    return str(row["outcome"])


def _text(reply: str, code: int | None, status: str | None) -> str:
    """The reply without its leading code and status, which the ledger keeps in their own columns."""
    rest = reply
    for prefix in (str(code) if code else None, status):
        if prefix and rest.startswith(prefix):
            rest = rest[len(prefix) :].lstrip(" -")
    return rest or reply


__all__ = ["OUTCOMES", "record_bounce"]
