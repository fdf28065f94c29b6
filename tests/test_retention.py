"""Retention: after the configured time the addresses, bodies and attachments of ended jobs are
gone from the ledger, the outbox and the dead-letter store; the metadata stays."""

from __future__ import annotations

import json
from typing import Any

from tests.support.ledger import wait_dead, wait_final
from tests.support.services import RunningWorker, postbote, send_jobs
from worker.db import Connection
from worker.settings import Settings
from worker.testbed.documents import make_job

CUSTOMER = "kunde.retention@example.com"


def age(db: Connection, job_ids: list[str], *, days: int, dead_days: int | None = None) -> None:
    """Make the jobs look as if they ended ``days`` ago (their dead letters ``dead_days`` ago)."""
    db.execute(
        "UPDATE deliveries SET created_at = now() - %s * interval '1 day', updated_at = now() - %s * interval '1 day'"
        " WHERE job_id = ANY(%s::uuid[])",
        (days, days, job_ids),
    )
    db.execute(
        "UPDATE events SET occurred_at = now() - %s * interval '1 day' WHERE job_id = ANY(%s::uuid[])",
        (days, job_ids),
    )
    db.execute(
        "UPDATE dead_letters SET dead_at = now() - %s * interval '1 day' WHERE job_id = ANY(%s::uuid[])",
        (dead_days if dead_days is not None else days, job_ids),
    )


def rows_of(db: Connection, job_id: str) -> str:
    """Everything stored about a job, as one text to search."""
    parts: list[Any] = []
    for table in ("deliveries", "delivery_recipients", "delivery_attempts", "events", "dead_letters"):
        parts += db.execute(f"SELECT * FROM {table} WHERE job_id = %s", (job_id,)).fetchall()  # noqa: S608
    return json.dumps(parts, default=lambda v: v.hex() if isinstance(v, bytes) else str(v))


def test_retention_removes_addresses_bodies_and_attachments_of_old_jobs_and_keeps_their_metadata(
    settings: Settings, worker: RunningWorker, make_tenant: Any, db: Connection
) -> None:
    tenant = make_tenant()
    sent, recent = (make_job(tenant, "invoice", n, user_id="u1", to=CUSTOMER) for n in (1, 2))
    refused = make_job(tenant, "invoice", 3, user_id="u1", to=CUSTOMER, **{"from": "fremd@evil.example"})
    young_dead = make_job(tenant, "invoice", 4, user_id="u1", to=CUSTOMER, **{"from": "fremd@evil.example"})
    ids = send_jobs(settings, [sent, recent, refused, young_dead])
    rows = wait_final(db, ids)
    assert [rows[i]["status"] for i in ids] == ["sent", "sent", "failed", "failed"]
    wait_dead(db, refused["job_id"])
    wait_dead(db, young_dead["job_id"])
    age(db, [sent["job_id"], refused["job_id"]], days=31, dead_days=91)
    age(db, [young_dead["job_id"]], days=31)
    db.execute(
        "UPDATE deliveries SET created_at = now() - interval '40 days' WHERE job_id = %s", (recent["job_id"],)
    )
    before = db.execute("SELECT * FROM deliveries WHERE job_id = %s", (sent["job_id"],)).fetchone()
    assert CUSTOMER in rows_of(db, sent["job_id"])

    dry = postbote(settings, "retention", "run", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would remove" in dry.stdout
    assert CUSTOMER in rows_of(db, sent["job_id"]), "a dry run changes nothing"

    result = postbote(settings, "retention", "run")
    assert result.returncode == 0, result.stderr
    for job_id in (sent["job_id"], refused["job_id"]):
        stored = rows_of(db, job_id)
        assert (
            CUSTOMER not in stored
            and "anna@acme.example" not in stored
            and "fremd@evil.example" not in stored
        )
        assert "JVBERi0" not in stored, "no attachment (base64 PDF) is left"
        assert "Sehr geehrte" not in stored, "no body is left"
    after = db.execute("SELECT * FROM deliveries WHERE job_id = %s", (sent["job_id"],)).fetchone()
    kept = (
        "job_id",
        "tenant_id",
        "doc_type",
        "doc_number",
        "status",
        "reason",
        "message_id",
        "attempts",
        "created_at",
    )
    assert {k: after[k] for k in kept} == {k: before[k] for k in kept}
    assert after["redacted_at"] is not None and after["sender"] is None
    recipient = db.execute(
        "SELECT address, role, state FROM delivery_recipients WHERE job_id = %s", (sent["job_id"],)
    ).fetchone()
    assert recipient == {"address": "removed-0", "role": "to", "state": "accepted"}
    dead = db.execute("SELECT * FROM dead_letters WHERE job_id = %s", (refused["job_id"],)).fetchone()
    assert dead is not None and dead["message"] is None and dead["raw_body"] is None
    assert (dead["tenant_id"], dead["reason"]) == (tenant, "sender_not_permitted")

    assert CUSTOMER in rows_of(db, recent["job_id"]), (
        "a job that ended recently keeps everything, though created long ago"
    )
    young = db.execute(
        "SELECT message FROM dead_letters WHERE job_id = %s", (young_dead["job_id"],)
    ).fetchone()
    assert young is not None and young["message"] is not None, "dead letters are kept longer"
    status = postbote(settings, "status", sent["job_id"])
    assert status.returncode == 0 and json.loads(status.stdout)["status"] == "sent"
    replay = postbote(settings, "dlq", "replay", refused["job_id"])
    assert (
        "not_replayable" in replay.stdout + replay.stderr or "not readable" in replay.stdout + replay.stderr
    )


def test_zero_days_keeps_everything(
    settings: Settings, worker: RunningWorker, make_tenant: Any, db: Connection
) -> None:
    tenant = make_tenant()
    [job_id] = send_jobs(settings, [make_job(tenant, "offer", 5, user_id="u1", to=CUSTOMER)])
    wait_final(db, [job_id])
    age(db, [job_id], days=400)
    result = postbote(settings, "retention", "run", retention_days=0, dead_letter_retention_days=0)
    assert result.returncode == 0, result.stderr
    assert CUSTOMER in rows_of(db, job_id)
