"""Which job and recipient a report is about, from what it carries, never guessed.

A report names its job through the returned message's Message-ID (``<job id@domain>``) or
``X-Postbote-Job`` header (or, in a non-standard report, those lines in its text), the ENVID the
transaction gave, or the VERP return path it was sent to. All of these must name the same job,
which the ledger must know (and, when reading a tenant's mailbox, belong to that tenant); each
recipient must be one of that job's envelope recipients, by ``Final-Recipient`` or by
``Original-Recipient``. Anything else is no match.
"""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

from worker.bounces.parse import Finding, Report
from worker.db import Connection, translated_errors


@dataclass(frozen=True)
class Match:
    job_id: UUID
    tenant: str
    address: str
    """The recipient as the ledger has it."""
    matched_by: str
    """What named the job: ``message_id``, ``envid`` or ``verp`` (joined by ``+`` when several did)."""
    finding: Finding


def match_report(conn: Connection, report: Report, *, tenant: str | None = None) -> list[Match]:
    """The findings of ``report`` that belong to a recipient of the one job it names."""
    named = {"message_id": set(report.job_ids)}
    if report.envid is not None:
        named["envid"] = {report.envid}
    if report.verp is not None:
        named["verp"] = {report.verp}
    jobs = set().union(*named.values())
    if len(jobs) != 1:
        return []
    [job_id] = jobs
    with translated_errors():
        rows = conn.execute(
            "SELECT d.tenant_id, r.address FROM deliveries d"
            " JOIN delivery_recipients r ON r.job_id = d.job_id WHERE d.job_id = %s",
            (job_id,),
        ).fetchall()
    if not rows or (tenant is not None and rows[0]["tenant_id"] != tenant):
        return []
    recipients = {str(r["address"]).lower(): str(r["address"]) for r in rows}
    matched_by = "+".join(k for k, v in named.items() if v)
    found = []
    for finding in report.findings:
        address = recipients.get(finding.address.lower())
        if address is None and finding.original is not None:
            address = recipients.get(finding.original.lower())
        if address is not None:
            found.append(Match(job_id, str(rows[0]["tenant_id"]), address, matched_by, finding))
    return found


__all__ = ["Match", "match_report"]
