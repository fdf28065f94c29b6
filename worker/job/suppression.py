"""The tenant's suppression list in the send path: a job to a suppressed address is held, not
dropped, unless the tenant's policy for its document type says ``send``.

Held, the job waits as ``held`` (reason ``suppressed``) with an event, so the ERP can send the
document on paper or fix the address; removing the entry (``postbote suppression remove``) or
releasing the job (``postbote suppression release``) sends it, once. Only a job no attempt has
reached SMTP for is checked: a retry, a replay or a job some recipients already have goes on as
it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from schemas.job import Job
from schemas.tenant import Suppression
from worker.db import Connection, translated_errors
from worker.errors import MustWait
from worker.job.recipients import customer_recipients
from worker.vocabulary import Reason, Status


@dataclass(frozen=True)
class Entry:
    address: str
    source: str
    """``bounce``, ``refusal``, ``manual`` or ``import``."""
    bounce_class: str | None
    reply: str | None

    def why(self) -> str:
        return ", ".join(p for p in (self.source, self.bounce_class, self.reply) if p)

    def describe(self) -> str:
        return f"{self.address} ({self.why()})"


def hold_if_suppressed(conn: Connection, job: Job) -> None:
    """Raise ``MustWait`` (held, reason ``suppressed``) when a customer-facing address of ``job`` is
    on its tenant's suppression list and the policy for its document type is ``hold``.

    The held addresses get the recipient state ``suppressed`` (with the entry's source and reply),
    so the ``held`` event names them; the job's first attempt, once released, replaces it.
    """
    customers = {r.address.lower(): (n, r) for n, r in enumerate(customer_recipients(job).envelope)}
    with translated_errors():
        row = conn.execute(
            "SELECT t.suppression AS policy,"
            " EXISTS (SELECT 1 FROM delivery_recipients r WHERE r.job_id = %(job)s"
            "         AND r.state <> 'suppressed') AS attempted,"
            " EXISTS (SELECT 1 FROM suppression_holds h WHERE h.job_id = %(job)s"
            "         AND h.released_at IS NOT NULL) AS released,"
            " (SELECT jsonb_agg(jsonb_build_object('address', s.address, 'source', s.source,"
            "                   'class', s.class, 'reply', s.reply) ORDER BY s.address)"
            "  FROM suppressions s WHERE s.tenant_id = t.id AND s.address = ANY(%(addresses)s)"
            "  AND (s.expires_at IS NULL OR s.expires_at > clock_timestamp())) AS entries"
            " FROM tenants t WHERE t.id = %(tenant)s",
            {"job": job.job_id, "addresses": list(customers), "tenant": job.tenant},
        ).fetchone()
    if row is None or not row["entries"] or row["attempted"] or row["released"]:
        return
    policy = Suppression.model_validate(row["policy"] or {})
    if getattr(policy, job.document.type.value) == "send":
        return
    entries = [_entry(e) for e in row["entries"]]
    with translated_errors(), conn.transaction():
        conn.execute(
            "INSERT INTO suppression_holds (job_id, tenant_id, addresses) VALUES (%s, %s, %s)"
            " ON CONFLICT (job_id) DO UPDATE SET addresses = EXCLUDED.addresses, held_at = EXCLUDED.held_at",
            (job.job_id, job.tenant, [e.address for e in entries]),
        )
        for entry in entries:
            position, recipient = customers[entry.address]
            conn.execute(
                "INSERT INTO delivery_recipients (job_id, address, position, role, state, reply_text)"
                " VALUES (%s, %s, %s, %s, 'suppressed', %s) ON CONFLICT (job_id, address) DO UPDATE"
                " SET state = 'suppressed', reply_text = EXCLUDED.reply_text, updated_at = clock_timestamp()",
                (job.job_id, recipient.address, position, recipient.role.value, f"suppressed: {entry.why()}"),
            )
    raise MustWait(
        "suppressed: " + "; ".join(e.describe() for e in entries),
        reason=Reason.SUPPRESSED,
        status=Status.HELD,
        wait_ms=None,
    )


def _entry(data: dict[str, Any]) -> Entry:
    return Entry(str(data["address"]), str(data["source"]), data.get("class"), data.get("reply"))


__all__ = ["Entry", "hold_if_suppressed"]
