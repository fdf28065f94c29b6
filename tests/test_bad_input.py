"""Whatever lands on the queue or comes through the edges, the worker keeps running and every bad
job is refused with a reason that names the problem."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import yaml

from tests.support.faults import dramatiq_message, publish_raw
from tests.support.ledger import wait_dead, wait_final
from tests.support.services import RunningWorker, postbote, send_jobs
from tests.support.smtp import received_messages
from worker.db import Connection
from worker.settings import Settings
from worker.testbed.documents import make_job
from worker.testbed.sink import Sink


def raw_id(body: bytes) -> str:
    return "raw-" + hashlib.sha256(body).hexdigest()[:32]


def a_job(tenant: str = "nobody", **changes: Any) -> dict[str, Any]:
    job = make_job(tenant, "invoice", 1, user_id="u1", to="kunde@example.com")
    job.update(changes)
    return job


def test_malformed_json_on_the_queue_is_dead_lettered_and_the_worker_keeps_running(
    settings: Settings, worker: RunningWorker, sink: Sink, make_tenant: Any, db: Connection
) -> None:
    body = b'{"queue_name": "oops", this is not JSON'
    publish_raw(settings, body)
    dead = wait_dead(db, raw_id(body))
    assert dead["reason"] == "malformed_json"
    assert bytes(dead["raw_body"]) == body

    [job_id] = send_jobs(settings, [a_job(make_tenant())])
    assert wait_final(db, [job_id])[job_id]["status"] == "sent"
    assert worker.process.poll() is None


def test_json_that_is_not_a_dramatiq_message_is_dead_lettered(
    settings: Settings, worker: RunningWorker, db: Connection
) -> None:
    body = json.dumps({"tenant": "acme", "subject": "hello"}).encode()
    publish_raw(settings, body)
    dead = wait_dead(db, raw_id(body))
    assert dead["reason"] == "not_a_dramatiq_message"
    assert "missing queue_name, actor_name" in dead["detail"]


def test_a_job_of_the_wrong_schema_is_dead_lettered_naming_the_fields(
    settings: Settings, worker: RunningWorker, db: Connection
) -> None:
    job_id = str(uuid.uuid4())
    publish_raw(settings, dramatiq_message(settings, {"job_id": job_id, "tenant": "acme", "colour": "blue"}))
    dead = wait_dead(db, job_id)
    assert dead["reason"] == "invalid_job"
    assert "document: Field required" in dead["detail"]
    assert "user_id: Field required" in dead["detail"]


def test_a_message_without_exactly_one_job_is_dead_lettered(
    settings: Settings, worker: RunningWorker, db: Connection
) -> None:
    body = dramatiq_message(settings, a_job(), a_job())
    publish_raw(settings, body)
    dead = wait_dead(db, json.loads(body)["message_id"])
    assert dead["reason"] == "not_a_job"


def test_a_message_naming_another_actor_is_handled_by_the_actor_of_its_queue(
    settings: Settings, worker: RunningWorker, sink: Sink, make_tenant: Any, db: Connection
) -> None:
    job = a_job(make_tenant())
    publish_raw(settings, dramatiq_message(settings, job, actor="launch_rockets"))
    assert wait_final(db, [job["job_id"]])[job["job_id"]]["status"] == "sent"


def test_a_line_break_in_the_subject_is_refused_on_the_queue(
    settings: Settings, worker: RunningWorker, db: Connection
) -> None:
    job = a_job(subject="Rechnung\r\nBcc: alle@example.com")
    publish_raw(settings, dramatiq_message(settings, job))
    dead = wait_dead(db, job["job_id"])
    assert dead["reason"] == "invalid_job"
    assert "subject: Value error, must not contain line breaks" in dead["detail"]


def test_a_smuggled_second_address_is_refused_on_the_queue_and_by_send(
    settings: Settings, worker: RunningWorker, db: Connection
) -> None:
    job = a_job(to=["a@x.org)<b@y.org>"])
    publish_raw(settings, dramatiq_message(settings, job))
    dead = wait_dead(db, job["job_id"])
    assert dead["reason"] == "invalid_job"
    assert "to.0" in dead["detail"]

    result = postbote(settings, "send", input=json.dumps(a_job(to=["a@x.org)<b@y.org>"])))
    assert result.returncode == 2
    assert "to.0" in result.stderr


def test_a_line_break_in_a_display_name_is_refused_by_tenants_apply(
    settings: Settings, tmp_path: Path
) -> None:
    tenant = {
        "id": "crlf",
        "smtp": {"host": "smtp.example.com"},
        "employees": [{"id": "u1", "email": "anna@acme.example", "name": "Anna\r\nBcc: alle@example.com"}],
    }
    path = tmp_path / "tenants.yaml"
    path.write_text(yaml.safe_dump({"tenants": [tenant]}))
    result = postbote(settings, "tenants", "apply", str(path))
    assert result.returncode == 2
    assert "name" in result.stderr
    assert "line breaks" in result.stderr


def test_an_empty_recipient_list_is_refused_on_the_queue(
    settings: Settings, worker: RunningWorker, db: Connection
) -> None:
    job = a_job(to=[])
    publish_raw(settings, dramatiq_message(settings, job))
    dead = wait_dead(db, job["job_id"])
    assert dead["reason"] == "invalid_job"
    assert "to: List should have at least 1 item" in dead["detail"]


def test_an_idn_domain_is_sent_as_punycode(
    settings: Settings, worker: RunningWorker, sink: Sink, make_tenant: Any, db: Connection
) -> None:
    [job_id] = send_jobs(settings, [a_job(make_tenant(), to=["kunde@bücher.example"])])
    assert wait_final(db, [job_id])[job_id]["status"] == "sent"
    [(record, message)] = received_messages(sink)
    assert record.rcpt_tos == ["kunde@xn--bcher-kva.example"]
    assert message["To"] == "kunde@xn--bcher-kva.example"


def test_a_non_ascii_local_part_without_smtputf8_is_a_clear_permanent_error(
    settings: Settings, worker: RunningWorker, sink: Sink, make_tenant: Any, db: Connection, tmp_path: Path
) -> None:
    plain = Sink(tmp_path / "ascii-only", enable_SMTPUTF8=False)
    try:
        smtp = {"host": plain.host, "port": plain.port, "security": "none"}
        [job_id] = send_jobs(settings, [a_job(make_tenant(smtp=smtp), to=["jörg@example.com"])])
        row = wait_final(db, [job_id])[job_id]
        assert (row["status"], row["reason"]) == ("failed", "smtputf8_unsupported")
        assert "does not offer SMTPUTF8" in row["detail"]
        assert wait_dead(db, job_id)["reason"] == "smtputf8_unsupported"
        assert plain.handler.received == []
    finally:
        plain.stop()

    # A server that offers SMTPUTF8 takes the same address.
    [job_id] = send_jobs(settings, [a_job(make_tenant(), to=["jörg@example.com"])])
    assert wait_final(db, [job_id])[job_id]["status"] == "sent"
    assert received_messages(sink)[0][0].rcpt_tos == ["jörg@example.com"]


def test_an_unknown_tenant_is_dead_lettered_with_its_name(
    settings: Settings, worker: RunningWorker, db: Connection
) -> None:
    [job_id] = send_jobs(settings, [a_job("no-such-tenant")])
    row = wait_final(db, [job_id])[job_id]
    assert row["reason"] == "unknown_tenant"
    assert "no-such-tenant" in wait_dead(db, job_id)["detail"]


def test_a_sender_that_is_not_granted_is_dead_lettered_and_nothing_is_sent(
    settings: Settings, worker: RunningWorker, sink: Sink, make_tenant: Any, db: Connection
) -> None:
    [job_id] = send_jobs(settings, [a_job(make_tenant(), **{"from": "chef@acme.example"})])
    row = wait_final(db, [job_id])[job_id]
    assert row["reason"] == "sender_not_permitted"
    assert "chef@acme.example" in wait_dead(db, job_id)["detail"]
    assert sink.handler.received == []


def test_the_same_job_id_with_another_payload_is_refused_and_reported(
    settings: Settings, worker: RunningWorker, sink: Sink, make_tenant: Any, db: Connection
) -> None:
    job = a_job(make_tenant())
    [job_id] = send_jobs(settings, [job])
    wait_final(db, [job_id])
    send_jobs(settings, [{**job, "subject": "Rechnung, geändert"}])
    dead = wait_dead(db, job_id)
    assert dead["reason"] == "job_id_conflict"
    assert wait_final(db, [job_id])[job_id]["status"] == "sent"
    assert len(received_messages(sink)) == 1
