"""The job model rejects what must never reach a mail header or the queue."""

from __future__ import annotations

import base64
import binascii
import random
from typing import Any

import pytest
from pydantic import ValidationError

from schemas.job import Job, is_base64


def job(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "tenant": "acme",
        "document": {"type": "invoice", "number": "RE-2026-0001"},
        "user_id": "u1",
        "to": ["kunde@example.com"],
        "subject": "Rechnung RE-2026-0001",
        "body": {"text": "Guten Tag"},
    }
    data.update(changes)
    return data


def error_fields(data: dict[str, Any], **context: Any) -> list[str]:
    with pytest.raises(ValidationError) as info:
        Job.model_validate(data, context=context or None)
    return [".".join(str(p) for p in e["loc"]) for e in info.value.errors()]


def test_a_minimal_job_is_valid_and_gets_a_job_id() -> None:
    parsed = Job.model_validate(job())
    assert parsed.job_id is not None
    assert parsed.dump()["to"] == ["kunde@example.com"]


def test_an_address_with_a_smuggled_second_address_is_rejected() -> None:
    assert error_fields(job(to=["a@x.org)<b@y.org>"])) == ["to.0"]


@pytest.mark.parametrize(
    "address", ["a@x.org, b@y.org", "Anna <a@x.org>", "a@x.org\r\nBcc: b@y.org", "no-at-sign", ""]
)
def test_only_bare_addresses_are_accepted(address: str) -> None:
    assert error_fields(job(cc=[address])) == ["cc.0"]


def test_a_line_break_in_the_subject_is_rejected() -> None:
    assert error_fields(job(subject="Rechnung\r\nBcc: evil@example.com")) == ["subject"]


def test_a_line_break_in_the_document_number_is_rejected() -> None:
    assert error_fields(job(document={"type": "invoice", "number": "RE-1\nX: y"})) == ["document.number"]


def test_an_unknown_document_type_is_rejected() -> None:
    assert error_fields(job(document={"type": "letter", "number": "1"})) == ["document.type"]


def test_at_least_one_recipient_is_required() -> None:
    assert error_fields(job(to=[])) == ["to"]


def test_attachments_must_be_valid_base64() -> None:
    attachment = {"filename": "a.pdf", "content_type": "application/pdf", "content_base64": "not base64!"}
    assert error_fields(job(attachments=[attachment])) == ["attachments.0.content_base64"]


def test_the_base64_check_agrees_with_strict_decoding_except_for_surplus_padding() -> None:
    rng = random.Random(8)
    samples = ["", "AA==", "AAA=", "+/+/", "AAAA=", "AA=A", "=AAA", "AA\nAA==", "AAé="]
    samples += [base64.b64encode(rng.randbytes(rng.randint(0, 40))).decode() for _ in range(500)]
    samples += ["".join(rng.choice("AB+/=\n -") for _ in range(rng.randint(0, 12))) for _ in range(20_000)]
    for value in samples:
        try:
            binascii.a2b_base64(value, strict_mode=True)
        except ValueError:
            canonical = False
        else:
            data = value.rstrip("=")
            canonical = len(value) - len(data) == -len(data) % 4
        assert is_base64(value) == canonical, value


def test_a_filename_with_a_directory_is_rejected() -> None:
    attachment = {"filename": "../etc/passwd", "content_base64": ""}
    assert error_fields(job(attachments=[attachment])) == ["attachments.0.filename"]


def test_the_size_limit_counts_decoded_attachments_and_is_configurable() -> None:
    content = base64.b64encode(b"x" * 2000).decode()
    data = job(attachments=[{"filename": "a.bin", "content_base64": content}])
    Job.model_validate(data)
    assert error_fields(data, max_job_bytes=1000) == [""]


def test_unknown_fields_are_rejected() -> None:
    assert error_fields(job(prio="high")) == ["prio"]


def test_from_is_spelled_from_on_the_wire() -> None:
    parsed = Job.model_validate(job(**{"from": "rechnung@acme.example"}))
    assert parsed.from_ == "rechnung@acme.example"
    assert parsed.dump()["from"] == "rechnung@acme.example"


def test_an_idn_domain_is_accepted() -> None:
    parsed = Job.model_validate(job(to=["kunde@bücher.example"]))
    assert parsed.to == ["kunde@bücher.example"]
