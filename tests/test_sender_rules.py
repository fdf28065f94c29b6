"""The settings page's sender rules, each proven through RabbitMQ → worker → SMTP."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest

from tests.support.ledger import recipient_states, wait_final
from tests.support.services import RunningWorker, postbote, send_jobs
from tests.support.smtp import received_messages
from worker.db import Connection
from worker.settings import Settings
from worker.testbed.documents import make_job
from worker.testbed.sink import Sink

ANNA = {
    "id": "u1",
    "email": "anna@acme.example",
    "name": "Anna Berg",
    "group": "sales",
    "signature_text": "Anna Berg\nVertrieb <Nord> & Süd",
}
BEN = {"id": "u2", "email": "ben@acme.example", "name": "Ben Kurz", "group": "accounting"}
CARLA = {
    "id": "u3",
    "email": "carla@acme.example",
    "name": "Carla Neu",
    "senders": ["auftraege@acme.example"],
}
GROUPS = [
    {"id": "sales", "senders": ["angebote@acme.example"]},
    {"id": "accounting", "senders": ["rechnung@acme.example"]},
]
SENDERS = {
    "offer": "angebote@acme.example",
    "order": "auftraege@acme.example",
    "invoice": "rechnung@acme.example",
}


@pytest.fixture
def acme(make_tenant: Any) -> Any:
    """A tenant like the settings page's example; keyword arguments override its settings."""

    def make(**settings: Any) -> str:
        fields = {
            "senders": SENDERS,
            "groups": GROUPS,
            "employees": [ANNA, BEN, CARLA],
            "archive_bcc": "archiv@acme.example",
            "use_user_mail_data": True,
            "cc_clerk": True,
        }
        fields.update(settings)
        return str(make_tenant(**fields))

    return make


@pytest.fixture
def deliver(settings: Settings, worker: RunningWorker, sink: Sink, db: Connection) -> Any:
    """Send one job through the pipeline; returns its ledger row (with ``roles``: each recipient's
    role and state) and, if sent, envelope and message."""

    def run(tenant: str, doc_type: str, user_id: str, **extra: Any) -> tuple[dict[str, Any], Any, Any]:
        before = len(sink.handler.received)
        job = make_job(tenant, doc_type, 1, user_id=user_id, to="kunde@example.com", **extra)
        [job_id] = send_jobs(settings, [job])
        row = {**wait_final(db, [job_id])[job_id], "roles": recipient_states(db, job_id)}
        if row["status"] != "sent":
            return row, None, None
        record, message = received_messages(sink, count=before + 1)[before]
        assert str(message["X-Postbote-Job"]) == job_id
        return row, record, message

    return run


def test_invoice_uses_the_invoice_sender_when_granted_through_the_group(acme: Any, deliver: Any) -> None:
    row, record, message = deliver(acme(), "invoice", "u2")
    assert record.mail_from == "rechnung@acme.example"
    assert message["From"].addresses[0].addr_spec == "rechnung@acme.example"
    assert row["sender"] == "rechnung@acme.example"


def test_order_uses_the_order_sender_when_granted_to_the_user_directly(acme: Any, deliver: Any) -> None:
    _, record, _ = deliver(acme(), "order", "u3")
    assert record.mail_from == "auftraege@acme.example"


def test_a_document_sender_not_granted_is_refused_and_nothing_is_sent(
    settings: Settings, acme: Any, deliver: Any, sink: Sink
) -> None:
    tenant = acme()
    row, record, _ = deliver(tenant, "invoice", "u1")
    assert record is None
    assert row["status"] == "failed"
    assert row["reason"] == "sender_not_permitted"
    assert "'u1'" in row["detail"] and "rechnung@acme.example" in row["detail"] and tenant in row["detail"]
    assert sink.handler.received == []
    status = json.loads(postbote(settings, "status", str(row["job_id"])).stdout)
    assert status["reason"] == "sender_not_permitted"
    assert status["sender"] == "rechnung@acme.example"
    assert [(r["address"], r["role"], r["state"]) for r in status["recipients"]] == [
        ("kunde@example.com", "to", "pending"),
        ("archiv@acme.example", "archive", "pending"),
    ]


def test_an_explicit_from_must_be_granted(acme: Any, deliver: Any) -> None:
    row, record, _ = deliver(acme(), "offer", "u1", **{"from": "chef@acme.example"})
    assert record is None
    assert row["reason"] == "sender_not_permitted"


def test_a_granted_explicit_from_wins_over_the_document_sender(acme: Any, deliver: Any) -> None:
    _, record, _ = deliver(acme(), "invoice", "u3", **{"from": "auftraege@acme.example"})
    assert record.mail_from == "auftraege@acme.example"


def test_the_users_own_address_is_always_allowed(acme: Any, deliver: Any) -> None:
    _, record, message = deliver(acme(), "other", "u3")
    assert record.mail_from == "carla@acme.example"
    assert str(message["From"]) == "Carla Neu <carla@acme.example>"


def test_an_explicit_from_of_the_users_own_address_needs_no_grant(acme: Any, deliver: Any) -> None:
    _, record, _ = deliver(acme(), "invoice", "u1", **{"from": "anna@acme.example"})
    assert record.mail_from == "anna@acme.example"


def test_dunning_letters_use_the_invoice_sender(acme: Any, deliver: Any) -> None:
    _, record, _ = deliver(acme(), "dunning", "u2")
    assert record.mail_from == "rechnung@acme.example"


def test_a_receipt_without_a_receipt_sender_uses_the_user_and_the_signature(acme: Any, deliver: Any) -> None:
    _, record, message = deliver(acme(), "receipt", "u1")
    assert record.mail_from == "anna@acme.example"
    text = message.get_body(("plain",)).get_content().replace("\r\n", "\n")
    assert text.endswith("-- \nAnna Berg\nVertrieb <Nord> & Süd\n")
    html = message.get_body(("html",)).get_content().replace("\r\n", "\n")
    assert "Anna Berg<br>\nVertrieb &lt;Nord&gt; &amp; Süd" in html
    assert html.rstrip().endswith("</body></html>")


def test_no_signature_when_the_tenant_does_not_load_the_users_mail_data(acme: Any, deliver: Any) -> None:
    _, _, message = deliver(acme(use_user_mail_data=False), "receipt", "u1")
    assert "Vertrieb" not in message.get_body(("plain",)).get_content()


def test_no_signature_when_a_document_sender_is_used(acme: Any, deliver: Any) -> None:
    _, _, message = deliver(acme(), "offer", "u1")
    assert "Vertrieb" not in message.get_body(("plain",)).get_content()


def test_the_clerk_is_cc_when_someone_else_sends(acme: Any, deliver: Any) -> None:
    row, record, message = deliver(acme(), "invoice", "u2", clerk_id="u1")
    assert message["Cc"] == "anna@acme.example"
    assert "anna@acme.example" in record.rcpt_tos
    assert row["roles"]["anna@acme.example"] == ("clerk", "accepted")


def test_no_clerk_cc_when_the_clerk_sends_the_document(acme: Any, deliver: Any) -> None:
    _, record, message = deliver(acme(), "offer", "u1", clerk_id="u1")
    assert message["Cc"] is None
    assert "anna@acme.example" not in record.rcpt_tos


def test_no_clerk_cc_when_the_setting_is_off(acme: Any, deliver: Any) -> None:
    _, _, message = deliver(acme(cc_clerk=False), "invoice", "u2", clerk_id="u1")
    assert message["Cc"] is None


def test_a_clerk_already_among_the_recipients_is_not_added_twice(acme: Any, deliver: Any) -> None:
    _, record, message = deliver(acme(), "invoice", "u2", clerk_id="u1", cc=["anna@ACME.example"])
    assert message["Cc"] == "anna@acme.example"
    assert [r.lower() for r in record.rcpt_tos].count("anna@acme.example") == 1


def test_the_archive_gets_a_blind_copy_that_no_header_shows(acme: Any, deliver: Any) -> None:
    row, record, message = deliver(acme(), "invoice", "u2", bcc=["steuerberater@example.net"])
    assert "archiv@acme.example" in record.rcpt_tos
    assert "steuerberater@example.net" in record.rcpt_tos
    assert row["roles"]["archiv@acme.example"] == ("archive", "accepted")
    assert row["roles"]["steuerberater@example.net"] == ("bcc", "accepted")
    raw = message.as_bytes().lower()
    assert b"archiv@acme.example" not in raw
    assert b"steuerberater" not in raw
    assert message["Bcc"] is None


def test_reply_to_message_id_date_and_document_header(acme: Any, deliver: Any) -> None:
    row, _, message = deliver(acme(), "invoice", "u2", reply_to="buchhaltung@acme.example")
    assert message["Reply-To"] == "buchhaltung@acme.example"
    assert message["Message-ID"] == f"<{row['job_id']}@acme.example>"
    assert message["Date"] is not None
    assert message["X-Postbote-Document"] == f"invoice {row['doc_number']}"


def test_an_unknown_user_is_refused(acme: Any, deliver: Any) -> None:
    row, record, _ = deliver(acme(), "invoice", "nobody")
    assert (record, row["reason"]) == (None, "unknown_user")


def test_an_unknown_tenant_is_refused(deliver: Any) -> None:
    row, record, _ = deliver(f"missing{uuid.uuid4().hex[:6]}", "invoice", "u1")
    assert (record, row["reason"]) == (None, "unknown_tenant")


def test_the_domain_compares_case_insensitively_but_the_local_part_exactly(acme: Any, deliver: Any) -> None:
    tenant = acme(
        senders={}, groups=[{"id": "sales", "senders": ["Angebote@ACME.example"]}, {"id": "accounting"}]
    )
    _, record, _ = deliver(tenant, "offer", "u1", **{"from": "Angebote@acme.example"})
    assert record.mail_from == "Angebote@acme.example"
    row, record, _ = deliver(tenant, "offer", "u1", **{"from": "angebote@acme.example"})
    assert (record, row["reason"]) == (None, "sender_not_permitted")


def test_a_new_grant_applies_to_the_next_job_without_a_restart(
    acme: Any, deliver: Any, make_tenant: Any
) -> None:
    tenant = acme()
    row, _, _ = deliver(tenant, "invoice", "u1")
    assert row["reason"] == "sender_not_permitted"
    granted = {**ANNA, "senders": ["rechnung@acme.example"]}
    acme(id=tenant, employees=[granted, BEN, CARLA])
    time.sleep(0.3)
    _, record, _ = deliver(tenant, "invoice", "u1")
    assert record.mail_from == "rechnung@acme.example"
