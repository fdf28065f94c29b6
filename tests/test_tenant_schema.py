"""The tenant file model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from schemas.tenant import TenantFile

SPEC_EXAMPLE = """
tenants:
  - id: acme
    smtp: {host: smtp.acme.example, port: 587, security: starttls,
           user: mailer@acme.example, password_file: /run/secrets/acme_smtp,
           helo: mail.acme.example}
    series: {batch_size: 50, pause_ms: 1000}
    archive_bcc: archiv@acme.example
    senders: {offer: angebote@acme.example, order: auftraege@acme.example,
              invoice: rechnung@acme.example, receipt: kasse@acme.example}
    use_user_mail_data: true
    cc_clerk: true
    dkim: {domain: acme.example, selector: s2026, private_key_file: /run/secrets/acme_dkim.pem}
    groups:
      - {id: sales, senders: [angebote@acme.example, auftraege@acme.example]}
    employees:
      - {id: u1, email: anna@acme.example, name: Anna Berg, group: sales,
         signature_text: "Anna Berg\\nVertrieb", senders: [rechnung@acme.example]}
"""


def test_the_example_of_the_specification_is_valid(tmp_path: Path) -> None:
    from worker.tools.tenant_file import read_tenant_file

    path = tmp_path / "tenants.yaml"
    path.write_text(SPEC_EXAMPLE)
    tenant = read_tenant_file(path).tenants[0]
    assert tenant.series.batch_size == 50
    assert tenant.employees[0].signature_text == "Anna Berg\nVertrieb"
    assert tenant.smtp.password_file == Path("/run/secrets/acme_smtp")


def minimal(**changes: Any) -> dict[str, Any]:
    tenant: dict[str, Any] = {"id": "acme", "smtp": {"host": "smtp.acme.example"}}
    tenant.update(changes)
    return {"tenants": [tenant]}


def test_an_employee_must_name_an_existing_group() -> None:
    with pytest.raises(ValidationError, match="group 'sales', which is not defined"):
        TenantFile.model_validate(
            minimal(employees=[{"id": "u1", "email": "a@acme.example", "group": "sales"}])
        )


def test_password_and_password_file_are_exclusive() -> None:
    with pytest.raises(ValidationError, match="either password or password_file"):
        TenantFile.model_validate(minimal(smtp={"host": "h", "password": "x", "password_file": "/f"}))


def test_security_must_be_one_of_the_three_modes() -> None:
    with pytest.raises(ValidationError, match="smtp.security"):
        TenantFile.model_validate(minimal(smtp={"host": "h", "security": "tls"}))


def test_secrets_are_not_shown_in_the_model_repr() -> None:
    tenant = TenantFile.model_validate(minimal(smtp={"host": "h", "password": "hunter2"}))
    assert "hunter2" not in repr(tenant)
