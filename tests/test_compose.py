"""The composed message: headers, parts and encodings as a receiving mail system reads them."""

from __future__ import annotations

import base64
import email
from email import policy
from email.message import EmailMessage
from typing import Any

from schemas.job import Job
from worker.job.compose import compose_message
from worker.job.recipients import Recipient, Recipients, customer_recipients
from worker.job.senders import Sender
from worker.testbed.documents import make_job
from worker.vocabulary import Role

ANNA = Sender("anna@acme.example", "Anna Berg", None, None)


def envelope(job: Job, cc: tuple[str, ...] = (), internal: tuple[Recipient, ...] = ()) -> Recipients:
    own = customer_recipients(job)
    return Recipients((*own.cc, *cc), (*own.envelope, *internal))


def compose(sender: Sender = ANNA, cc: tuple[str, ...] = (), **job: Any) -> tuple[bytes, EmailMessage]:
    data = make_job("acme", "invoice", 1, user_id="u1", to="kunde@example.com")
    data.update(job)
    parsed = Job.model_validate(data)
    composed = compose_message(parsed, sender, envelope(parsed, cc))
    message = email.message_from_bytes(composed.data, policy=policy.default)
    assert isinstance(message, EmailMessage)
    return composed.data, message


def test_every_line_ends_in_crlf_and_fits_the_line_limit() -> None:
    raw, _ = compose(body={"text": "x" * 2000 + "\nkurz", "html": "<p>" + "y" * 3000 + "</p>"})
    lines = raw.split(b"\r\n")
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert max(len(line) for line in lines) <= 78


def test_mixed_line_ends_in_texts_and_signatures_leave_no_bare_cr_or_lf() -> None:
    sender = Sender("anna@acme.example", "Anna Berg", "Gruß\rAnna\n\rBerg", "<p>A\r\nB\rC</p>")
    mixed = "eins\rzwei\nDrei\r\n\r\rvier \r"
    raw, _ = compose(sender, body={"text": mixed, "html": f"<p>{mixed}</p>"})
    assert raw.count(b"\r") == raw.count(b"\n") == raw.count(b"\r\n")


def test_the_message_is_seven_bit() -> None:
    raw, _ = compose(subject="Rechnung für Müller", body={"text": "Grüße aus Köln"})
    assert raw.isascii()


def test_non_ascii_subject_name_and_filename_round_trip() -> None:
    attachment = {
        "filename": "Übersicht März.pdf",
        "content_type": "application/pdf",
        "content_base64": base64.b64encode(b"%PDF-1.4 data").decode(),
    }
    sender = Sender("anna@acme.example", "Änne Bärg", None, None)
    _, message = compose(
        sender, subject="Rechnung für Müller & Söhne " + "lang " * 20, attachments=[attachment]
    )
    assert message["Subject"] == "Rechnung für Müller & Söhne " + "lang " * 20
    assert message["From"].addresses[0].display_name == "Änne Bärg"
    [part] = list(message.iter_attachments())
    assert part.get_filename() == "Übersicht März.pdf"
    assert part.get_content() == b"%PDF-1.4 data"


def test_text_html_and_attachments_have_the_expected_structure() -> None:
    _, message = compose()
    assert message.get_content_type() == "multipart/mixed"
    assert [p.get_content_type() for p in message.walk()] == [
        "multipart/mixed",
        "multipart/alternative",
        "text/plain",
        "text/html",
        "application/pdf",
    ]
    assert (
        message.get_body(("plain",)).get_content().replace("\r\n", "\n").endswith("Mit freundlichen Grüßen\n")
    )


def test_a_text_only_job_is_a_single_part_message() -> None:
    _, message = compose(body={"text": "Nur Text"}, attachments=[])
    assert message.get_content_type() == "text/plain"
    assert message.get_content().strip() == "Nur Text"


def test_many_recipients_are_folded_between_addresses() -> None:
    to = [f"kunde{n:03d}@example.com" for n in range(12)]
    raw, message = compose(to=to)
    assert [a.addr_spec for a in message["To"].addresses] == to
    header = raw.split(b"\r\n\r\n")[0]
    assert max(len(line) for line in header.split(b"\r\n")) <= 78


def test_blind_recipients_are_in_the_envelope_only() -> None:
    data = make_job("acme", "invoice", 1, user_id="u1", to="kunde@example.com", bcc=["geheim@example.net"])
    job = Job.model_validate(data)
    composed = compose_message(
        job, ANNA, envelope(job, internal=(Recipient("archiv@acme.example", Role.ARCHIVE),))
    )
    assert composed.recipients == ("kunde@example.com", "geheim@example.net", "archiv@acme.example")
    assert composed.internal == {"archiv@acme.example"}
    assert b"geheim" not in composed.data and b"archiv" not in composed.data


def test_an_idn_domain_is_written_as_punycode() -> None:
    data = make_job("acme", "invoice", 1, user_id="u1", to="kunde@bücher.example")
    job = Job.model_validate(data)
    composed = compose_message(job, ANNA, customer_recipients(job))
    assert composed.recipients == ("kunde@xn--bcher-kva.example",)
    assert b"To: kunde@xn--bcher-kva.example" in composed.data


def test_a_non_ascii_local_part_needs_smtputf8() -> None:
    data = make_job("acme", "invoice", 1, user_id="u1", to="jürgen@example.com")
    job = Job.model_validate(data)
    assert compose_message(job, ANNA, customer_recipients(job)).smtputf8


def test_no_header_line_passes_998_characters_even_for_unbreakable_text() -> None:
    raw, message = compose(
        subject="x" * 998,
        attachments=[
            {
                "filename": "Rechnung-äöü-" * 18 + ".pdf",
                "content_type": "application/pdf",
                "content_base64": base64.b64encode(b"%PDF-1.4").decode(),
            }
        ],
    )
    header = raw.split(b"\r\n\r\n")[0]
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    assert max(len(line) for line in header.split(b"\r\n")) <= 998
    assert message["Subject"] == "x" * 998
    [attachment] = message.iter_attachments()
    assert attachment.get_filename() == "Rechnung-äöü-" * 18 + ".pdf"
