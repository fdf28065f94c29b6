"""`postbote dlq`: operators see every dead job with its reason, and replay it once the cause is fixed."""

from __future__ import annotations

import json
import uuid
from typing import Any

from tests.support.faults import dramatiq_message, publish_raw
from tests.support.ledger import wait_dead, wait_status
from tests.support.services import RunningWorker, postbote, send_jobs
from tests.support.smtp import received_messages
from worker.db import Connection
from worker.settings import Settings
from worker.testbed.documents import make_job
from worker.testbed.sink import Sink


def dead_invoice(settings: Settings, db: Connection, tenant: str) -> str:
    """An invoice for a tenant that does not exist yet: dead with reason unknown_tenant."""
    [job_id] = send_jobs(settings, [make_job(tenant, "invoice", 7, user_id="u1", to="kunde@example.com")])
    wait_dead(db, job_id)
    return job_id


def listed(settings: Settings, *args: str) -> list[dict[str, Any]]:
    result = postbote(settings, "dlq", "list", "--json", *args)
    assert result.returncode == 0, result.stderr
    entries: list[dict[str, Any]] = json.loads(result.stdout)
    return entries


def test_list_shows_job_tenant_document_reason_attempts_and_time(
    settings: Settings, worker: RunningWorker, db: Connection
) -> None:
    tenant = f"late{uuid.uuid4().hex[:8]}"
    job_id = dead_invoice(settings, db, tenant)
    [entry] = listed(settings, "--tenant", tenant)
    assert entry["job_id"] == job_id
    assert entry["document"] == "invoice RE-2026-00007"
    assert (entry["reason"], entry["attempts"]) == ("unknown_tenant", 1)
    assert entry["dead_at"]

    table = postbote(settings, "dlq", "list", "--tenant", tenant)
    assert table.returncode == 0
    header, row = table.stdout.splitlines()[:2]
    assert header.split() == ["ID", "TENANT", "DOCUMENT", "REASON", "ATTEMPTS", "DEAD", "FOR"]
    assert row.split()[:6] == [job_id, tenant, "invoice", "RE-2026-00007", "unknown_tenant", "1"]


def test_list_filters_by_reason_and_age(settings: Settings, worker: RunningWorker, db: Connection) -> None:
    tenant = f"late{uuid.uuid4().hex[:8]}"
    dead_invoice(settings, db, tenant)
    assert len(listed(settings, "--tenant", tenant, "--reason", "unknown_tenant")) == 1
    assert listed(settings, "--tenant", tenant, "--reason", "smtp_rejected") == []
    assert listed(settings, "--tenant", tenant, "--older-than", "1h") == []
    bad = postbote(settings, "dlq", "list", "--older-than", "yesterday")
    assert bad.returncode == 2
    assert "not a duration" in bad.stderr


def test_show_masks_secrets_and_summarizes_attachments(
    settings: Settings, worker: RunningWorker, db: Connection
) -> None:
    job = make_job("acme", "invoice", 1, user_id="u1", to="kunde@example.com", smtp_password="geheim")
    publish_raw(settings, dramatiq_message(settings, job))
    wait_dead(db, job["job_id"])
    result = postbote(settings, "dlq", "show", job["job_id"])
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["reason"] == "invalid_job"
    assert "smtp_password: Extra inputs are not permitted" in shown["detail"]
    assert shown["job"]["smtp_password"] == "***"
    assert "geheim" not in result.stdout
    [attachment] = shown["job"]["attachments"]
    assert "content_base64" not in attachment
    assert attachment["content"].startswith("<") and " bytes, sha256 " in attachment["content"]
    assert job["attachments"][0]["content_base64"][:40] not in result.stdout


def test_show_of_an_unknown_id_says_so(settings: Settings) -> None:
    result = postbote(settings, "dlq", "show", "no-such-id")
    assert result.returncode == 1
    assert "no dead job 'no-such-id'" in result.stderr


def test_a_replay_after_the_cause_is_fixed_sends_once_and_a_second_replay_sends_nothing(
    settings: Settings, worker: RunningWorker, sink: Sink, make_tenant: Any, db: Connection
) -> None:
    tenant = f"late{uuid.uuid4().hex[:8]}"
    job_id = dead_invoice(settings, db, tenant)
    make_tenant(id=tenant)

    dry = postbote(settings, "dlq", "replay", job_id, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"{job_id}: would replay" in dry.stdout
    assert wait_status(db, job_id, "failed")

    first = postbote(settings, "dlq", "replay", job_id)
    assert first.returncode == 0, first.stderr
    assert f"{job_id}: replayed" in first.stdout
    wait_status(db, job_id, "sent")
    assert listed(settings, "--tenant", tenant) == []

    second = postbote(settings, "dlq", "replay", job_id)
    assert second.returncode == 1
    assert "not found" in second.stdout
    # the original message sent again by hand: the ledger acknowledges it without sending
    send_jobs(settings, [make_job(tenant, "invoice", 7, user_id="u1", to="kunde@example.com", job_id=job_id)])
    assert [str(m["X-Postbote-Job"]) for _, m in received_messages(sink, timeout=3, count=2)] == [job_id]


def test_replay_by_reason_takes_every_matching_job(
    settings: Settings, worker: RunningWorker, make_tenant: Any, db: Connection
) -> None:
    tenant = f"late{uuid.uuid4().hex[:8]}"
    ids = [dead_invoice(settings, db, tenant) for _ in range(2)]
    make_tenant(id=tenant)
    result = postbote(settings, "dlq", "replay", "--reason", "unknown_tenant", "--tenant", tenant)
    assert result.returncode == 0, result.stderr
    for job_id in ids:
        wait_status(db, job_id, "sent")


def test_replay_wants_ids_or_a_selection_but_not_both(settings: Settings) -> None:
    assert postbote(settings, "dlq", "replay").returncode == 2
    assert postbote(settings, "dlq", "replay", "some-id", "--all").returncode == 2


def test_purge_refuses_without_yes_when_not_interactive_and_purges_with_it(
    settings: Settings, worker: RunningWorker, db: Connection
) -> None:
    tenant = f"late{uuid.uuid4().hex[:8]}"
    job_id = dead_invoice(settings, db, tenant)
    refused = postbote(settings, "dlq", "purge", "--tenant", tenant, input="")
    assert refused.returncode == 2
    assert "refusing to purge without --yes" in refused.stderr
    assert len(listed(settings, "--tenant", tenant)) == 1

    purged = postbote(settings, "dlq", "purge", "--tenant", tenant, "--yes", input="")
    assert purged.returncode == 0, purged.stderr
    assert "purged 1 dead job(s)" in purged.stdout
    assert listed(settings, "--tenant", tenant) == []
    assert wait_status(db, job_id, "failed")["reason"] == "unknown_tenant"
