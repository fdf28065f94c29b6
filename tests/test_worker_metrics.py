"""/metrics adds up every worker process: postbote's counters, dramatiq's own series, bounded labels."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from schemas.constants import DRAMATIQ_MESSAGES, METRIC_MAILS_SENT, SEND_DOCUMENT_ACTOR, queue_name
from tests.support.ledger import wait_final
from tests.support.observe import http_get, sample, wait_for
from tests.support.services import RunningWorker, send_jobs
from worker.db import Connection
from worker.settings import Settings
from worker.testbed.documents import make_job


def _when_sent(port: int, tenant: str, count: int) -> str | None:
    text = http_get(port, "/metrics")[1]
    return text if sample(text, METRIC_MAILS_SENT, tenant=tenant) == count else None


def test_metrics_of_two_processes_add_up_and_include_dramatiqs_own(
    own_queues: Settings, make_tenant: Any, db: Connection
) -> None:
    tenant = make_tenant()
    running = RunningWorker(own_queues, processes=2, threads=2)
    try:
        jobs = [make_job(tenant, "invoice", n, user_id="u1", to=f"kunde{n}@example.com") for n in range(10)]
        ids = send_jobs(own_queues, jobs)
        wait_final(db, ids)
        text = wait_for(
            lambda: _when_sent(running.metrics_port, tenant, 10), what="10 sent mails in /metrics"
        )
    finally:
        running.stop()

    assert sample(text, "postbote_smtp_send_seconds_count", tenant=tenant) == 10
    assert sample(text, "postbote_smtp_connections_opened_total", tenant=tenant)
    documents = {"queue_name": queue_name(own_queues.queue_prefix, "documents")}
    assert sample(text, DRAMATIQ_MESSAGES, actor_name=SEND_DOCUMENT_ACTOR, **documents) == 10
    assert sample(text, "dramatiq_message_duration_milliseconds_count", **documents) == 10
    assert sample(text, "dramatiq_messages_inprogress", **documents) == 0


def test_no_label_carries_an_address_or_a_job_id(
    settings: Settings, worker: RunningWorker, make_tenant: Any, db: Connection
) -> None:
    tenant = make_tenant()
    job = make_job(tenant, "offer", 1, user_id="u1", to="kunde@example.com")
    refused = make_job(tenant, "offer", 2, user_id="u1", to="kunde@example.com", **{"from": "x@else.example"})
    ids = send_jobs(settings, [job, refused])
    wait_final(db, ids)
    dead = {"tenant": tenant, "reason": "sender_not_permitted"}

    def both_counted() -> str | None:
        text = _when_sent(worker.metrics_port, tenant, 1)
        return text if text and sample(text, "postbote_dead_lettered_total", **dead) == 1 else None

    text = wait_for(both_counted, what="the sent and the dead-lettered job in /metrics")

    values = {
        value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        for key, value in s.labels.items()
        if key != "le"
    }
    assert not [v for v in values if "@" in v or any(i in v for i in ids)]
