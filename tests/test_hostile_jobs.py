"""Jobs the worker cannot trust, published raw: they end sent once or dead with a reason, and the
lanes go on."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pika
import pytest

from tests.support.auth_sinks import PASSWORD, attempts, running, smtp_settings
from tests.support.faults import copies_received, dramatiq_message
from tests.support.hostile import assert_lanes_still_work, publish_raw_message
from tests.support.ledger import wait_dead, wait_final, wait_status
from tests.support.observe import metrics_when, sample, wait_for
from tests.support.services import RunningWorker, postbote, send_jobs
from worker.db import Connection
from worker.job.intake import job_id_for
from worker.settings import Settings
from worker.testbed.documents import make_job
from worker.testbed.sink import Sink


def without_job_id(job: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in job.items() if k != "job_id"}


def test_a_job_without_an_id_delivered_twice_is_sent_once_under_its_message_id(
    settings: Settings, worker: RunningWorker, sink: Sink, make_tenant: Any, db: Connection
) -> None:
    tenant = make_tenant()
    job = without_job_id(make_job(tenant, "invoice", 1, user_id="u1", to="kunde@example.com"))
    body = dramatiq_message(settings, job, message_id="erp-4711-rechnung")
    publish_raw_message(settings, body)
    publish_raw_message(settings, body)
    job_id = str(job_id_for("erp-4711-rechnung"))
    assert wait_final(db, [job_id])[job_id]["status"] == "sent"
    assert_lanes_still_work(settings, db, tenant)
    assert copies_received(sink.handler)[(job_id, "kunde@example.com")] == 1
    assert (
        db.execute("SELECT count(*) AS n FROM deliveries WHERE job_id = %s", (job_id,)).fetchone()["n"] == 1
    )


@pytest.mark.parametrize(
    ("case", "tenant_fields"),
    [
        ("helo", {"smtp_helo": "mäil.acme.example"}),
        ("sender", {"employee_email": "jürgen@acme.example"}),
    ],
)
def test_an_input_no_stage_foresaw_is_dead_lettered_not_left_claimed(
    case: str,
    tenant_fields: dict[str, str],
    settings: Settings,
    worker: RunningWorker,
    sink: Sink,
    make_tenant: Any,
    db: Connection,
) -> None:
    smtp = {"host": sink.host, "port": sink.port, "security": "none"}
    if "smtp_helo" in tenant_fields:
        smtp["helo"] = tenant_fields["smtp_helo"]
    email = tenant_fields.get("employee_email", "anna@acme.example")
    tenant = make_tenant(smtp=smtp, employees=[{"id": "u1", "email": email}])
    [job_id] = send_jobs(settings, [make_job(tenant, "invoice", 1, user_id="u1", to="kunde@example.com")])
    row = wait_final(db, [job_id])[job_id]
    if row["status"] == "sent":
        assert len(sink.handler.received) == 1, case
    else:
        assert row["reason"], row
        assert wait_dead(db, job_id)["reason"] == row["reason"]
    assert row["takeovers"] == 0
    healthy = make_tenant()
    assert_lanes_still_work(settings, db, healthy)


def test_only_the_tenants_publishers_may_send_for_it(
    settings: Settings, worker: RunningWorker, sink: Sink, make_tenant: Any, db: Connection
) -> None:
    guarded = make_tenant(publishers=["guest"])
    elsewhere = make_tenant(publishers=["erp-nord"])
    as_guest = pika.BasicProperties(user_id="guest")
    signed = make_job(guarded, "invoice", 1, user_id="u1", to="kunde@example.com")
    anonymous = make_job(guarded, "invoice", 2, user_id="u1", to="kunde@example.com")
    foreign = make_job(elsewhere, "invoice", 3, user_id="u1", to="kunde@example.com")
    publish_raw_message(settings, dramatiq_message(settings, signed), properties=as_guest)
    publish_raw_message(settings, dramatiq_message(settings, anonymous))
    publish_raw_message(settings, dramatiq_message(settings, foreign), properties=as_guest)
    rows = wait_final(db, [signed["job_id"], anonymous["job_id"], foreign["job_id"]])
    assert rows[signed["job_id"]]["status"] == "sent"
    for refused in (anonymous, foreign):
        assert rows[refused["job_id"]]["reason"] == "publisher_not_permitted"
        assert wait_dead(db, refused["job_id"])["reason"] == "publisher_not_permitted"
    assert_lanes_still_work(settings, db, make_tenant())


def test_a_job_for_an_unknown_tenant_is_counted_without_a_label_the_publisher_chose(
    settings: Settings, worker: RunningWorker, db: Connection
) -> None:
    invented = f"erfunden{uuid.uuid4().hex[:8]}"
    job = make_job(invented, "invoice", 1, user_id="u1", to="kunde@example.com")
    publish_raw_message(settings, dramatiq_message(settings, job))
    assert wait_dead(db, job["job_id"])["reason"] == "unknown_tenant"
    text = wait_for(
        lambda: metrics_when(
            worker.metrics_port,
            lambda t: bool(
                sample(t, "postbote_dead_lettered_total", tenant="unknown", reason="unknown_tenant")
            ),
        ),
        what="the unknown tenant's job in /metrics",
    )
    assert invented not in text


def test_a_refused_login_is_not_tried_again_for_every_queued_job(
    settings: Settings, worker: RunningWorker, make_tenant: Any, db: Connection, tmp_path: Path
) -> None:
    with running(tmp_path) as sink:
        tenant = make_tenant(
            smtp=smtp_settings(sink, security="none", password=PASSWORD + "-falsch", max_connections=1)
        )
        ids = send_jobs(
            settings, [make_job(tenant, "invoice", n, user_id="u1", to="kunde@example.com") for n in range(5)]
        )
        rows = {job_id: wait_status(db, job_id, "held") for job_id in ids}
        assert {r["reason"] for r in rows.values()} == {"login_failing"}
        assert len(attempts(sink)) == 1


def test_postbote_send_takes_json_with_a_unicode_line_separator_inside_a_string(
    settings: Settings, make_tenant: Any
) -> None:
    job = make_job(make_tenant(), "invoice", 1, user_id="u1", to="kunde@example.com")
    job["body"]["text"] = "Zeile 1\u2028Zeile 2"
    line = json.dumps(job, ensure_ascii=False)
    assert "\u2028" in line
    result = postbote(settings, "send", input=line + "\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == job["job_id"]
